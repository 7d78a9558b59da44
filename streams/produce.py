"""``echolm produce``: JSONL requests from a file or stdin onto the requests topic."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable

from pydantic import ValidationError

from echolm.settings import Settings
from streams.batch_format import ParsedLine, parse_line
from streams.kafka_io import RequestProducer, create_topics
from streams.records import RequestRecord, describe_validation_error


def parse_request_line(line_no: int, raw: str, settings: Settings, seen: set[str]) -> RequestRecord | str:
    """An EchoLM request record (has 'request_id') or an OpenAI batch line; a string says why not."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    if isinstance(data, dict) and "request_id" in data:
        data.setdefault("tenant", settings.default_tenant)
        try:
            return RequestRecord.model_validate(data)
        except ValidationError as exc:
            return describe_validation_error(exc)
    parsed = parse_line(line_no, raw, settings.default_tenant, seen)
    return parsed.request if isinstance(parsed, ParsedLine) else parsed.message


async def produce_lines(settings: Settings, lines: Iterable[str], *, raw: bool = False) -> tuple[int, list[tuple[int, str]]]:
    """Returns (records sent, [(line number, reason)] for lines not sent)."""
    await create_topics(settings)
    rejected: list[tuple[int, str]] = []
    seen: set[str] = set()
    sent = 0
    async with RequestProducer(settings) as producer:
        pending = []
        for line_no, line in enumerate(lines, start=1):
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            if raw:
                pending.append(await producer.send_raw(None, text.encode("utf-8", "surrogateescape")))
                continue
            item = parse_request_line(line_no, text, settings, seen)
            if isinstance(item, str):
                rejected.append((line_no, item))
            else:
                pending.append(await producer.send(item))
        await asyncio.gather(*pending)
        sent = len(pending)
    return sent, rejected
