"""The JSON log format: one object per line, extras as top-level keys, nothing else on stderr."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from datetime import datetime

import pytest

from echolm.log_format import TEXT_FORMAT, JsonFormatter, formatter


def record(message: str, *args: object, level: int = logging.WARNING, exc_info: object = None,
           **extra: object) -> logging.LogRecord:
    made = logging.getLogger("streams.stages").makeRecord(
        "streams.stages", level, __file__, 10, message, args, exc_info, extra=extra or None)
    return made


def test_a_record_is_one_json_object_with_its_extras() -> None:
    line = JsonFormatter().format(record("rejecting %s at %s", "bad-1", "embed", request_id="bad-1", stage="embed"))
    document = json.loads(line)
    assert document["message"] == "rejecting bad-1 at embed"
    assert document["level"] == "WARNING" and document["logger"] == "streams.stages"
    assert document["request_id"] == "bad-1" and document["stage"] == "embed"
    assert datetime.fromisoformat(document["ts"].replace("Z", "+00:00")).tzinfo is not None
    assert "args" not in document and "msg" not in document and "levelno" not in document  # no LogRecord noise


def test_exceptions_stay_on_one_line() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        line = JsonFormatter().format(record("failed", level=logging.ERROR, exc_info=sys.exc_info(),
                                             request_ids=["a", "b"]))
    assert "\n" not in line
    document = json.loads(line)
    assert "ValueError: boom" in document["exc"] and "Traceback" in document["exc"]
    assert document["request_ids"] == ["a", "b"]


def test_values_json_cannot_hold_are_written_as_text() -> None:
    class Opaque:
        def __str__(self) -> str:
            return "opaque-thing"

    document = json.loads(JsonFormatter().format(record("x", thing=Opaque(), nested={"k": (1, Opaque())},
                                                         unicode="héllo")))
    assert document["thing"] == "opaque-thing"
    assert document["nested"] == {"k": [1, "opaque-thing"]}
    assert document["unicode"] == "héllo"


def test_formatter_by_name() -> None:
    assert isinstance(formatter("json"), JsonFormatter)
    text = formatter("text")
    assert text._fmt == TEXT_FORMAT  # noqa: SLF001
    with pytest.raises(ValueError, match="unknown log format"):
        formatter("yaml")  # type: ignore[arg-type]


def test_configured_json_logging_writes_only_json_lines_to_stderr() -> None:
    program = (
        "import logging, warnings\n"
        "from echolm.log_format import configure_logging\n"
        "configure_logging('INFO', 'json', quiet_loggers=['noisy'])\n"
        "logging.getLogger('streams.stages').warning('retrying in %.1fs', 0.2, extra={'stage': 'log'})\n"
        "logging.getLogger('noisy').info('hidden')\n"
        "warnings.warn('careful')\n"
        "try:\n"
        "    1 / 0\n"
        "except ZeroDivisionError:\n"
        "    logging.getLogger('x').exception('divide', extra={'request_id': 'r-7'})\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True)
    documents = [json.loads(line) for line in done.stderr.splitlines()]
    assert [d["message"] for d in documents][0] == "retrying in 0.2s"
    assert documents[0]["stage"] == "log"
    assert not any(d["message"] == "hidden" for d in documents)  # quiet loggers log warnings and up only
    assert any(d["logger"] == "py.warnings" and "careful" in d["message"] for d in documents)
    divide = next(d for d in documents if d["message"] == "divide")
    assert divide["request_id"] == "r-7" and "ZeroDivisionError" in divide["exc"]
