"""What each stage does with a batch of records: decode, call ``echolm``, encode the next record.

These handlers know nothing of faust: they take decoded records and return ``Outgoing`` messages,
so they are tested without a broker. ``streams.app`` feeds them from topics. A handler never
raises for one bad request: that request becomes an error ``ResponseRecord`` and the batch goes on.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from pydantic import ValidationError

from echolm.affinity import affinity_partition
from echolm.domain import (
    ChatMessage,
    EchoLMError,
    ErrorCode,
    Example,
    GenerationResult,
    RetrievedExample,
    RouteDecision,
    request_text,
)
from echolm.prompting import build_messages, select_within_budget
from echolm.protocols import (
    AdmissionHook,
    Embedder,
    ExampleCandidate,
    Generator,
    HistoryStore,
    ResponseLog,
    Router,
    RoutingContext,
)
from echolm.retrieval.example_cache import ExampleCache
from echolm.routing.comparison import comparison_request_id
from echolm.routing.reuse import REUSE_TIER, reusable_example
from echolm.routing.route_context import describe_route
from echolm.selection import StageTwo
from echolm.settings import Settings, TierSettings
from streams import metrics
from streams.records import (
    DeadLetterRecord,
    ErrorInfo,
    ExampleRef,
    InFlightRequest,
    RequestRecord,
    ResponseRecord,
    RouteInfo,
    decode_vector,
    describe_validation_error,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    key: str
    value: bytes
    partition: int | None = None  # None: the key's partition (see echolm.affinity for the exception)


def error_response(request: RequestRecord, stage: str, error: EchoLMError,
                   timings: dict[str, float] | None = None) -> ResponseRecord:
    return ResponseRecord(
        request_id=request.request_id, tenant=request.tenant, custom_id=request.custom_id,
        messages=request.messages, timings=timings or {},
        error=ErrorInfo(code=error.code, message=error.message, stage=stage),
        submitted_at=request.submitted_at,
    )


def undecodable_response(key: str | None, raw: bytes, stage: str, problem: str) -> ResponseRecord:
    """The answer to bytes that are not a valid record: the key is all we can tie it to."""
    return ResponseRecord(
        request_id=key or f"undecodable-{time.time_ns()}", tenant="unknown", custom_id=None, messages=[],
        error=ErrorInfo(code=ErrorCode.INVALID_REQUEST, message=problem, stage=stage),
        submitted_at=time.time(),
    )


def dead_letter(topic: str, response: ResponseRecord, raw: bytes | None = None) -> Outgoing:
    assert response.error is not None, "only failed requests are dead-lettered"
    record = DeadLetterRecord(
        request_id=response.request_id, tenant=response.tenant, stage=response.error.stage,
        code=response.error.code, reason=response.error.message,
        raw_b64=base64.b64encode(raw).decode("ascii") if raw is not None else None,
    )
    return Outgoing(topic, response.request_id, record.model_dump_json().encode())


def failure_outputs(settings: Settings, response: ResponseRecord, raw: bytes | None = None) -> list[Outgoing]:
    """A failed request: its error response for the requester, and a dead-letter record for operators."""
    return [_respond(settings, response), dead_letter(settings.topics.dead_letter, response, raw)]


class Decoder:
    """Turns raw topic bytes into records, or into failure outputs (error response + dead letter)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def request(self, key: str | None, raw: bytes, stage: str) -> RequestRecord | list[Outgoing]:
        try:
            return RequestRecord.model_validate_json(raw)
        except ValidationError as exc:
            problem = describe_validation_error(exc)
        except UnicodeDecodeError:
            problem = "invalid request: not UTF-8"
        return self._reject(key, raw, stage, problem)

    def in_flight(self, key: str | None, raw: bytes, stage: str) -> InFlightRequest | list[Outgoing]:
        try:
            return InFlightRequest.model_validate_json(raw)
        except (ValidationError, UnicodeDecodeError) as exc:
            return self._reject(key, raw, stage, f"corrupt in-flight record: {exc}"[:500])

    def _reject(self, key: str | None, raw: bytes, stage: str, problem: str) -> list[Outgoing]:
        log.warning("rejecting undecodable record key=%s at %s: %s", key, stage, problem,
                    extra={"request_id": key, "stage": stage})
        return failure_outputs(self._settings, undecodable_response(key, raw, stage, problem), raw)


def _respond(settings: Settings, response: ResponseRecord) -> Outgoing:
    return Outgoing(settings.topics.responses, response.request_id, response.model_dump_json().encode())


class EmbedStage:
    name = "embed"

    def __init__(self, settings: Settings, embedder: Embedder) -> None:
        self._settings = settings
        self._embedder = embedder

    async def process(self, requests: Sequence[RequestRecord]) -> list[Outgoing]:
        out: list[Outgoing] = []
        accepted: list[RequestRecord] = []
        for request in requests:
            chars = sum(len(m.content) for m in request.messages)
            if chars > self._settings.max_prompt_chars:
                error = EchoLMError(ErrorCode.PROMPT_TOO_LONG,
                                    f"prompt has {chars} characters; the limit is {self._settings.max_prompt_chars}")
                out.extend(failure_outputs(self._settings, error_response(request, self.name, error)))
            else:
                accepted.append(request)
        if not accepted:
            return out
        started = time.perf_counter()
        texts = [request_text(r.domain_messages()) for r in accepted]
        vectors = await asyncio.to_thread(self._embedder.embed, texts)
        per_request = (time.perf_counter() - started) / len(accepted)
        for request, vector in zip(accepted, vectors, strict=True):
            record = InFlightRequest(request=request, timings={self.name: per_request}).with_embedding(vector)
            out.append(Outgoing(self._settings.topics.embedded, request.request_id,
                                record.model_dump_json().encode()))
        return out


class RetrieveStage:
    name = "retrieve"

    def __init__(self, settings: Settings, cache: ExampleCache, stage_two: StageTwo | None = None) -> None:
        self._settings = settings
        self._cache = cache
        # Stage 2 (helpfulness); without a history it is the cold-start rule (similarity threshold).
        self._stage_two = stage_two or StageTwo(settings)

    async def process(self, records: Sequence[InFlightRequest]) -> list[Outgoing]:
        out = []
        by_tenant: dict[str, list[InFlightRequest]] = {}
        for record in records:
            by_tenant.setdefault(record.request.tenant, []).append(record)
        for tenant, group in by_tenant.items():
            started = time.perf_counter()
            vectors = np.stack([r.embedding() for r in group])
            found = self._cache.search(tenant, vectors, self._settings.retrieve_top_k,
                                       self._settings.min_similarity)
            found = await self._stage_two.select_batch(vectors, found)
            per_request = (time.perf_counter() - started) / len(group)
            for record, hits in zip(group, found, strict=True):
                refs = [_example_ref(hit) for hit in hits]
                updated = record.model_copy(update={
                    "examples": refs, "timings": {**record.timings, self.name: per_request}})
                out.append(Outgoing(self._settings.topics.retrieved, record.request.request_id,
                                    updated.model_dump_json().encode()))
        return out


def _example_ref(hit: RetrievedExample) -> ExampleRef:
    e = hit.example
    return ExampleRef(id=e.id, similarity=hit.similarity, prompt=e.prompt, response=e.response,
                      model=e.model, helpfulness=hit.helpfulness, quality=e.quality)


def _retrieved(ref: ExampleRef, tenant: str) -> RetrievedExample:
    example = Example(id=ref.id, tenant=tenant, prompt=ref.prompt, response=ref.response,
                      model=ref.model, tier="", quality=ref.quality)
    return RetrievedExample(example=example, similarity=ref.similarity, helpfulness=ref.helpfulness)


class RouteStage:
    name = "route"

    def __init__(self, settings: Settings, router: Router) -> None:
        self._settings = settings
        self._router = router

    async def process(self, records: Sequence[InFlightRequest]) -> list[Outgoing]:
        out = []
        refresh = getattr(self._router, "refresh", None)
        if refresh is not None:  # learned routers reload their state and load between batches
            try:
                await refresh()
            except Exception:  # routing goes on with the state it has
                log.exception("router refresh failed", extra={"stage": self.name})
        for record in records:
            started = time.perf_counter()
            request = record.request
            examples = [_retrieved(ref, request.tenant) for ref in record.examples or []]
            context = RoutingContext(
                request_id=request.request_id, tenant=request.tenant,
                prompt_chars=sum(len(m.content) for m in request.messages),
                examples=examples, embedding=record.embedding(),
            )
            reused = reusable_example(examples, self._settings.reuse_min_similarity, self._settings.reuse_min_quality)
            if reused is not None:
                out.append(_respond(self._settings, self._reuse(record, reused, started)))
                continue
            decision = self._router.route(context)
            route = RouteInfo(tier=decision.tier, score=decision.score, reason=decision.reason,
                              use_examples=decision.use_examples, scores=decision.scores,
                              context=describe_route(context, decision, self._settings.router_policy))
            updated = record.model_copy(update={
                "route": route, "timings": {**record.timings, self.name: time.perf_counter() - started}})
            out.append(Outgoing(self._settings.topics.generate(decision.tier), request.request_id,
                                updated.model_dump_json().encode(), self._partition(decision, record)))
            if decision.compare_with and decision.compare_with != decision.tier:
                out.extend(self._comparison(updated, decision.compare_with))
        return out

    def _partition(self, decision: RouteDecision, record: InFlightRequest) -> int | None:
        """The generate partition when requests are kept with their first example's worker (``echolm.affinity``)."""
        if self._settings.generate_affinity == "request" or not decision.use_examples:
            return None
        tier = next((t for t in self._settings.tiers if t.name == decision.tier), None)
        if tier is None or not tier.use_examples:
            return None
        # In prompt order (echolm.prompting.order_examples): most similar first, ties by id.
        in_prompt_order = sorted(record.examples or [], key=lambda ref: (-ref.similarity, ref.id))
        return affinity_partition([ref.id for ref in in_prompt_order], self._settings.topics.partitions,
                                  self._settings.generate_affinity)

    def _reuse(self, record: InFlightRequest, reused: RetrievedExample, started: float) -> ResponseRecord:
        """The request answered with ``reused``'s cached answer, verbatim: a repeat needs no generation."""
        request = record.request
        ref = next(ref for ref in record.examples or [] if ref.id == reused.example.id)
        route = RouteInfo(tier=REUSE_TIER, score=reused.similarity, use_examples=False,
                          reason=(f"verbatim reuse of example {ref.id}: similarity {reused.similarity:.3f} >= "
                                  f"{self._settings.reuse_min_similarity}"))
        return ResponseRecord(
            request_id=request.request_id, tenant=request.tenant, custom_id=request.custom_id,
            messages=request.messages, text=ref.response, tier=REUSE_TIER, model=ref.model, examples=[ref],
            route=route, prompt_tokens=0, completion_tokens=0, finish_reason="stop",
            timings={**record.timings, self.name: time.perf_counter() - started},
            embedding_b64=record.embedding_b64, submitted_at=request.submitted_at,
        )

    def _comparison(self, record: InFlightRequest, tier_name: str) -> list[Outgoing]:
        """Selective feedback: the same request on a second tier, under its own id, for the judge."""
        comparison_id = comparison_request_id(record.request.request_id, tier_name)
        if comparison_id is None or record.route is None:
            return []
        tier = self._settings.tier(tier_name)
        request = record.request.model_copy(update={"request_id": comparison_id, "custom_id": None})
        route = RouteInfo(tier=tier_name, score=record.route.scores.get(tier_name, 0.0),
                          reason=f"selective feedback: compared with {record.route.tier}",
                          use_examples=tier.use_examples and bool(record.examples), scores=record.route.scores,
                          context=record.route.context)  # the decision's context: the twin's outcome trains on it
        twin = record.model_copy(update={"request": request, "route": route})
        return [Outgoing(self._settings.topics.generate(tier_name), comparison_id, twin.model_dump_json().encode())]


class GenerateStage:
    """Generates for one tier; examples are prepended only when the route offloaded with examples."""

    def __init__(self, settings: Settings, tier: TierSettings, generator: Generator) -> None:
        self._settings = settings
        self._tier = tier
        self._generator = generator
        self._slots = asyncio.Semaphore(tier.concurrency)
        self.name = f"generate.{tier.name}"

    async def process(self, records: Sequence[InFlightRequest]) -> list[Outgoing]:
        responses = await asyncio.gather(*(self._one(record) for record in records))
        out: list[Outgoing] = []
        for response in responses:
            out.extend(failure_outputs(self._settings, response) if response.error else
                       [_respond(self._settings, response)])
        return out

    def _prompt(self, record: InFlightRequest) -> tuple[list[ChatMessage], list[ExampleRef]]:
        messages = record.request.domain_messages()
        use_examples = bool(record.route and record.route.use_examples and self._tier.use_examples)
        if not use_examples or not record.examples:
            return messages, []
        budget = self._settings.max_examples_prompt_chars
        chosen = select_within_budget([_retrieved(ref, record.request.tenant) for ref in record.examples], budget)
        prompt = build_messages(messages, chosen, budget_chars=budget, layout=self._settings.prompt_layout)
        # Provenance lists the examples that made it into the prompt (the budget may drop some).
        chosen_ids = {c.example.id for c in chosen}
        used = [ref for ref in record.examples if ref.id in chosen_ids]
        return prompt, used

    async def _one(self, record: InFlightRequest) -> ResponseRecord:
        request = record.request
        params = request.generation_params(self._tier.max_tokens, self._settings.temperature)
        async with self._slots:
            started = time.perf_counter()
            try:
                prompt, used = self._prompt(record)
                result = await self._generator.generate(prompt, params, request_id=request.request_id)
            except EchoLMError as error:
                log.warning("request %s ended with %s: %s", request.request_id, error.code.value, error.message,
                            extra={"request_id": request.request_id, "stage": self.name})
                timings = {**record.timings, "generate": time.perf_counter() - started}
                return error_response(request, self.name, error, timings).model_copy(
                    update={"tier": self._tier.name, "route": record.route})
            except Exception as exc:  # a backend bug must still end the request explicitly
                log.exception("generation failed for %s", request.request_id,
                              extra={"request_id": request.request_id, "stage": self.name})
                error = EchoLMError(ErrorCode.GENERATION_FAILED, f"{type(exc).__name__}: {exc}"[:500])
                timings = {**record.timings, "generate": time.perf_counter() - started}
                return error_response(request, self.name, error, timings).model_copy(
                    update={"tier": self._tier.name, "route": record.route})
        return self._response(record, result, used)

    def _response(self, record: InFlightRequest, result: GenerationResult,
                  used: list[ExampleRef]) -> ResponseRecord:
        request = record.request
        metrics.PROMPT_TOKENS.labels(self._tier.name).inc(result.prompt_tokens)
        metrics.PROMPT_TOKENS_REUSED.labels(self._tier.name).inc(result.cached_prompt_tokens)
        return ResponseRecord(
            request_id=request.request_id, tenant=request.tenant, custom_id=request.custom_id,
            messages=request.messages, text=result.text, tier=self._tier.name, model=result.model,
            examples=used, route=record.route, prompt_tokens=result.prompt_tokens,
            cached_prompt_tokens=result.cached_prompt_tokens,
            completion_tokens=result.completion_tokens, finish_reason=result.finish_reason,
            timings={**record.timings, "generate": result.latency_s, **result.split_timings()},
            embedding_b64=record.embedding_b64, submitted_at=request.submitted_at,
        )


def accept_all(candidate: ExampleCandidate) -> ExampleCandidate | None:
    """The default admission hook: keep every non-empty answer."""
    return candidate if candidate.response.strip() else None


class LogStage:
    """Writes every final record to the history and admits good large-tier answers as examples.

    Database writes are retried until they succeed: the batch is not acknowledged before, so a
    database outage stalls the partition instead of losing records.
    """

    name = "log"

    def __init__(self, settings: Settings, history: HistoryStore, admission: AdmissionHook = accept_all,
                 max_backoff_s: float = 10.0) -> None:
        self._settings = settings
        self._history = history
        self._admission = admission
        self._max_backoff_s = max_backoff_s

    async def process(self, responses: Sequence[ResponseRecord]) -> list[Outgoing]:
        # Redelivery after a crash can repeat a request inside one batch: keep the last.
        unique = list({r.request_id: r for r in responses}.values())
        logs = [to_response_log(r) for r in unique]
        candidates = [c for c in (self._candidate(r) for r in unique) if c is not None]
        # Examples first: a request found in the history then has its example admitted too. Batch jobs
        # stop their worker once every request is logged; the other order could lose the admission.
        if candidates:
            await self._with_retry("admit examples", self._history.admit_examples, candidates)
        await self._with_retry("record responses", self._history.record_responses, logs)
        return []

    def _candidate(self, response: ResponseRecord) -> ExampleCandidate | None:
        if not response.ok or response.tier not in self._settings.admit_from_tiers:
            return None
        if response.embedding_b64 is None or not response.text:
            return None
        candidate = ExampleCandidate(
            tenant=response.tenant, source_request_id=response.request_id,
            prompt=request_text([m.to_domain() for m in response.messages]), response=response.text,
            model=response.model or "", tier=response.tier or "",
            embedding=decode_vector(response.embedding_b64),
        )
        return self._admission(candidate)

    async def _with_retry(self, what: str, call, arg) -> None:  # type: ignore[no-untyped-def]
        delay = 0.2
        ids = [getattr(item, "request_id", None) or getattr(item, "source_request_id", None) for item in arg]
        while True:
            try:
                await call(arg)
                return
            except Exception as exc:
                log.warning("history unavailable (%s: %s); retrying %s in %.1fs", type(exc).__name__, exc,
                            what, delay, extra={"stage": self.name, "request_ids": ids, "retry_in_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff_s)


def to_response_log(response: ResponseRecord) -> ResponseLog:
    messages = [m.to_domain() for m in response.messages]
    return ResponseLog(
        request_id=response.request_id, tenant=response.tenant, custom_id=response.custom_id,
        messages=messages, prompt_text=request_text(messages) if messages else "",
        response=response.text, tier=response.tier, model=response.model,
        example_ids=[e.id for e in response.examples],
        example_similarities=[e.similarity for e in response.examples],
        route_reason=response.route.reason if response.route else None,
        route_score=response.route.score if response.route else None,
        route_context=response.route.context if response.route else None,
        timings=response.timings, prompt_tokens=response.prompt_tokens,
        cached_prompt_tokens=response.cached_prompt_tokens, completion_tokens=response.completion_tokens,
        error_code=response.error.code.value if response.error else None,
        error_message=response.error.message if response.error else None,
        submitted_at=datetime.fromtimestamp(response.submitted_at, UTC),
        finished_at=datetime.fromtimestamp(response.finished_at, UTC),
    )


__all__ = [
    "Decoder", "EmbedStage", "GenerateStage", "LogStage", "Outgoing", "RetrieveStage", "RouteStage",
    "accept_all", "error_response", "to_response_log",
]
