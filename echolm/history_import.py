"""Loading historical request/response logs into the history store and the example cache.

Accepted lines (JSONL):
  {"prompt": str, "response": str, "model"?: str, "tenant"?: str, "request_id"?: str, "tier"?: str}
  {"custom_id", "body": {"messages": [...]}, "response": str | <batch output response object>, ...}
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from echolm.domain import ChatMessage, request_text
from echolm.protocols import Embedder, ExampleCandidate, HistoryStore, ResponseLog
from echolm.settings import Settings

IMPORT_BATCH = 256


@dataclass(frozen=True, slots=True)
class HistoricalRecord:
    request_id: str
    tenant: str
    custom_id: str | None
    messages: list[ChatMessage]
    response: str
    model: str
    tier: str


@dataclass
class ImportReport:
    imported: int = 0
    admitted: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {"imported": self.imported, "admitted_examples": self.admitted, "rejected": len(self.rejected)}


def _response_text(response: Any) -> str | None:
    if isinstance(response, str):
        return response
    if isinstance(response, dict):  # an OpenAI batch output line's "response" object
        try:
            return str(response["body"]["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            return None
    return None


def parse_history_line(raw: str, default_tenant: str, default_model: str) -> HistoricalRecord | str:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg})"
    if not isinstance(data, dict):
        return "expected a JSON object"
    if isinstance(data.get("prompt"), str):
        messages = [ChatMessage("user", data["prompt"])]
    elif isinstance(data.get("body"), dict) and isinstance(data["body"].get("messages"), list):
        try:
            messages = [ChatMessage(str(m["role"]), str(m["content"])) for m in data["body"]["messages"]]
        except (KeyError, TypeError):
            return "body.messages must be a list of {role, content}"
    else:
        return "needs 'prompt' (string) or 'body.messages'"
    response = _response_text(data.get("response"))
    if not response or not response.strip():
        return "needs a non-empty 'response'"
    if not any(m.content.strip() for m in messages):
        return "empty prompt"
    tenant = str(data.get("tenant") or default_tenant)
    model = str(data.get("model") or (data.get("body") or {}).get("model") or default_model)
    custom_id = data.get("custom_id")
    digest = hashlib.sha256(json.dumps([tenant, request_text(messages), response]).encode()).hexdigest()[:24]
    return HistoricalRecord(
        request_id=str(data.get("request_id") or f"imp-{digest}"), tenant=tenant,
        custom_id=str(custom_id) if custom_id is not None else None, messages=messages, response=response,
        model=model, tier=str(data.get("tier") or "imported"),
    )


async def import_records(records: list[HistoricalRecord], embedder: Embedder, history: HistoryStore,
                         *, admit: bool) -> int:
    """Writes one chunk; returns the number of examples admitted."""
    now = datetime.now(UTC)
    texts = [request_text(r.messages) for r in records]
    vectors = await asyncio.to_thread(embedder.embed, texts) if admit else None
    await history.record_responses([
        ResponseLog(
            request_id=r.request_id, tenant=r.tenant, custom_id=r.custom_id, messages=r.messages,
            prompt_text=text, response=r.response, tier=r.tier, model=r.model, example_ids=[],
            example_similarities=[], route_reason="imported", route_score=None, timings={},
            prompt_tokens=None, completion_tokens=None, error_code=None, error_message=None,
            submitted_at=now, finished_at=now,
        ) for r, text in zip(records, texts, strict=True)
    ])
    if vectors is None:
        return 0
    ids = await history.admit_examples([
        ExampleCandidate(tenant=r.tenant, source_request_id=r.request_id, prompt=text, response=r.response,
                         model=r.model, tier=r.tier, embedding=vector)
        for r, text, vector in zip(records, texts, vectors, strict=True)
    ])
    return len(ids)


async def import_logs(settings: Settings, path: Path, *, admit: bool = True,
                      default_model: str = "imported") -> ImportReport:
    from echolm.history.store import SqlHistoryStore
    from echolm.retrieval.embedder import SentenceTransformerEmbedder

    report = ImportReport()
    embedder = SentenceTransformerEmbedder(settings.embedder_model, batch_size=settings.embed_batch_size,
                                           num_threads=settings.embedder_threads, dtype=settings.embedder_dtype)
    history = SqlHistoryStore(settings.resolved_database_url)
    await history.start()
    try:
        chunk: list[HistoricalRecord] = []
        with path.open(encoding="utf-8", errors="replace") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                parsed = parse_history_line(line, settings.default_tenant, default_model)
                if isinstance(parsed, str):
                    report.rejected.append((line_no, parsed))
                    continue
                chunk.append(parsed)
                if len(chunk) >= IMPORT_BATCH:
                    report.admitted += await import_records(chunk, embedder, history, admit=admit)
                    report.imported += len(chunk)
                    chunk = []
        if chunk:
            report.admitted += await import_records(chunk, embedder, history, admit=admit)
            report.imported += len(chunk)
    finally:
        await history.aclose()
    return report
