"""Log formats of EchoLM processes: human text, or one JSON object per line for log pipelines.

``ECHOLM_LOG_FORMAT=json`` makes every record one line such as::

    {"ts": "2026-11-24T13:58:46.364Z", "level": "WARNING", "logger": "streams.stages",
     "message": "history unavailable ...", "stage": "log", "request_ids": ["r-1"], "retry_in_s": 0.2}

Fields given with ``extra=`` (``request_id``, ``stage``, ``request_ids``, ...) become top-level keys,
so a log pipeline can follow one request through every stage by its id.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ts (UTC, ISO 8601), level, logger, message, extras.

    Exceptions and stacks go into ``exc`` / ``stack`` as strings, newlines escaped, so a record
    never spans lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_") and key not in document:
                document[key] = _jsonable(value)
        if record.exc_info:
            document["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            document["exc"] = record.exc_text
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        return json.dumps(document, ensure_ascii=False)


def formatter(log_format: LogFormat) -> logging.Formatter:
    """The formatter of a log format name."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"unknown log format {log_format!r}; choose text or json")


def configure_logging(level: str, log_format: LogFormat = "text", *, quiet_loggers: Iterable[str] = ()) -> None:
    """Root logging to stderr at ``level`` in ``log_format``; ``quiet_loggers`` log warnings and up only.

    In JSON mode Python warnings become log records and Hugging Face progress bars are off, so
    stderr carries nothing but JSON lines.
    """
    chosen = formatter(log_format)  # fail on a bad name before touching the configuration
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format=TEXT_FORMAT)
    root = logging.getLogger()
    for handler in root.handlers:
        if getattr(handler, "stream", None) is sys.stderr:  # ours, not a test runner's capture handler
            handler.setFormatter(chosen)
    if log_format == "json":
        logging.captureWarnings(True)
        # Read by huggingface_hub when transformers is first imported (after this, lazily).
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in quiet_loggers:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
