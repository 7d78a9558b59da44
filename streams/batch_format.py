"""The OpenAI Batch file format (as ``vllm run-batch`` uses it), line by line. Pure functions.

Input line:  {"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {"messages", ...}}
             plus EchoLM's optional top-level "tenant".
Output line: {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}
          or {"id", "custom_id", "response": null, "error": {"code", "message"}}

Each line's ``id`` is derived from its content, so a re-run recognises what is already done.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from echolm.domain import ErrorCode
from streams.records import RequestRecord, ResponseRecord, describe_validation_error

SUPPORTED_URLS = ("/v1/chat/completions",)


@dataclass(frozen=True, slots=True)
class ParsedLine:
    line_no: int
    request: RequestRecord


@dataclass(frozen=True, slots=True)
class RejectedLine:
    line_no: int
    request_id: str
    custom_id: str | None
    code: ErrorCode
    message: str


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:24]


def parse_line(line_no: int, raw: str, default_tenant: str, seen_custom_ids: set[str]) -> ParsedLine | RejectedLine:
    """One input line -> a request, or a rejection that still gets its own output line."""

    def reject(message: str, custom_id: str | None = None, code: ErrorCode = ErrorCode.INVALID_REQUEST) -> RejectedLine:
        return RejectedLine(line_no, "line-" + _digest(str(line_no), raw), custom_id, code, f"line {line_no}: {message}")

    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        return reject(f"not valid JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(data, dict):
        return reject("expected a JSON object")
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return reject("missing or empty 'custom_id' (a string)")
    if custom_id in seen_custom_ids:
        return reject(f"duplicate custom_id {custom_id!r}", custom_id)
    url = data.get("url", "/v1/chat/completions")
    if url not in SUPPORTED_URLS:
        return reject(f"unsupported url {url!r}; supported: {', '.join(SUPPORTED_URLS)}", custom_id)
    method = data.get("method", "POST")
    if method != "POST":
        return reject(f"unsupported method {method!r}; only POST", custom_id)
    body = data.get("body")
    if not isinstance(body, dict):
        return reject("missing 'body' object", custom_id)
    tenant = data.get("tenant", default_tenant)
    request_id = "req-" + _digest(str(tenant), custom_id, json.dumps(body, sort_keys=True))
    try:
        request = RequestRecord(
            request_id=request_id, tenant=tenant, custom_id=custom_id, messages=body.get("messages"),
            max_tokens=body.get("max_tokens", body.get("max_completion_tokens")),
            temperature=body.get("temperature"), top_p=body.get("top_p"), stop=_stop_list(body.get("stop")),
            seed=body.get("seed"),
        )
    except ValidationError as exc:
        return reject(describe_validation_error(exc), custom_id)
    seen_custom_ids.add(custom_id)
    return ParsedLine(line_no, request)


def undecodable_line(line_no: int, raw: bytes, exc: UnicodeDecodeError) -> RejectedLine:
    return RejectedLine(line_no, "line-" + hashlib.sha256(b"%d\0" % line_no + raw).hexdigest()[:24], None,
                        ErrorCode.INVALID_REQUEST, f"line {line_no}: not valid UTF-8 (byte {exc.start})")


def _stop_list(stop: Any) -> Any:
    return [stop] if isinstance(stop, str) else stop


def output_id(request_id: str) -> str:
    return f"batch_req_{request_id}"


def rejected_output(rejected: RejectedLine) -> dict[str, Any]:
    return {
        "id": output_id(rejected.request_id), "custom_id": rejected.custom_id, "response": None,
        "error": {"code": rejected.code.value, "message": rejected.message},
    }


def response_output(response: ResponseRecord) -> dict[str, Any]:
    if response.error is not None:
        return {
            "id": output_id(response.request_id), "custom_id": response.custom_id, "response": None,
            "error": {"code": response.error.code.value, "message": response.error.message,
                      "stage": response.error.stage},
        }
    body = {
        "id": f"chatcmpl-{response.request_id}",
        "object": "chat.completion",
        "created": int(response.finished_at),
        "model": response.model,
        "choices": [{
            "index": 0, "message": {"role": "assistant", "content": response.text},
            "finish_reason": response.finish_reason or "stop",
        }],
        "usage": {
            "prompt_tokens": response.prompt_tokens or 0, "completion_tokens": response.completion_tokens or 0,
            "total_tokens": (response.prompt_tokens or 0) + (response.completion_tokens or 0),
            # OpenAI's field for prompt tokens served from the prefix cache instead of prefilled.
            "prompt_tokens_details": {"cached_tokens": response.cached_prompt_tokens or 0},
        },
        # Provenance: which tier answered, helped by which cached examples, and why.
        "echolm": {
            "tier": response.tier,
            "examples": [{"id": e.id, "similarity": round(e.similarity, 4)} for e in response.examples],
            # The router's full context (mu_i, S_i, loads, ...) goes to the history, not into every output line.
            "route": response.route.model_dump(exclude={"context"}) if response.route else None,
            "timings": {k: round(v, 4) for k, v in response.timings.items()},
            "latency_s": round(response.finished_at - response.submitted_at, 4),
        },
    }
    return {
        "id": output_id(response.request_id), "custom_id": response.custom_id,
        "response": {"status_code": 200, "request_id": response.request_id, "body": body}, "error": None,
    }


def done_ids(output_lines: list[str]) -> set[str]:
    """Ids already written by an earlier run of the same job (unreadable lines are ignored)."""
    ids = set()
    for line in output_lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            ids.add(record["id"])
    return ids
