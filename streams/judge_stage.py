"""The ``judge`` stage: the autorater on live traffic, off the critical path.

It reads the responses topic with its own consumer group (``<consumer_group>-judge``, a plain aiokafka
consumer in a task, even inside an ``all`` worker), so a slow judgement never holds back the log stage
or answers to requesters. For each answer:

* a selective-feedback comparison (request id ``<id>~vs~<tier>``, sent by the bandit router) is judged
  pairwise against the original answer, looked up in the history;
* otherwise, if the request is in the sample (``should_sample(request_id, learning.judge_sample_rate)``):
  with a verifier reference for its text (``learning.references_path``) the answer is verified; else an
  offloaded answer (any tier but the reference tier) is judged pairwise against the reference tier's
  answer to the same request, generated here (the paper's selective feedback: the large model answers
  only the sampled requests). Answers of the reference tier itself have nothing to be compared with.

Verdicts are stored as feedback (source "judge", kind "pairwise" or "verifier"), with ids derived from
what was judged, so a redelivered answer is not judged twice. A judgement that fails (no score, a
timeout) is logged and counted; the answer is then skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import Counter

from echolm.domain import EchoLMError, GenerationParams, request_text
from echolm.history.feedback_store import Feedback, FeedbackStore
from echolm.judging.judge import CascadeJudge, Judge, JudgeTask, LlmPairwiseJudge, ReferenceBook, VerifierJudge
from echolm.judging.pairwise import JudgeError, should_sample
from echolm.protocols import Generator, ResponseLog
from echolm.routing.comparison import split_comparison_id
from echolm.settings import Settings
from streams.app import _Wiring, register_stage
from streams.records import ResponseRecord

log = logging.getLogger(__name__)

JUDGED = Counter("echolm_judged_total", "Answers judged by the judge stage", ["kind", "outcome"])

REFERENCE_EXCERPT_CHARS = 4000


def judge_feedback_id(request_id: str, tier: str | None, other_tier: str | None, kind: str) -> str:
    return f"judge:{kind}:{request_id}:{tier or '-'}:{other_tier or '-'}"


class JudgeStage:
    """Judges sampled answers and comparisons; stores the verdicts as feedback."""

    name = "judge"

    def __init__(self, settings: Settings, store: FeedbackStore, judge: Judge, *,
                 reference_generator: Callable[[], Any] | None = None,
                 original_lookup: Callable[[str], Any] | None = None,
                 references: ReferenceBook | None = None, wait_for_original_s: float = 30.0) -> None:
        self._settings = settings
        self._store = store
        self._judge = judge
        self._reference_generator = reference_generator
        self._original_lookup = original_lookup
        self._references = references or ReferenceBook()
        self._reference_tier = settings.learning.reference_tier or settings.largest_tier.name
        self._wait_for_original_s = wait_for_original_s

    async def process(self, responses: Sequence[ResponseRecord]) -> list[Feedback]:
        stored: list[Feedback] = []
        for response in responses:
            if not response.ok or not response.text or not response.tier:
                continue
            try:
                verdicts = await self._judge_one(response)
            except (JudgeError, EchoLMError, asyncio.TimeoutError) as exc:
                JUDGED.labels("none", "failed").inc()
                log.warning("judging %s failed: %s", response.request_id, exc)
                continue
            if verdicts:
                await self._store_with_retry(verdicts)
                stored.extend(verdicts)
        return stored

    async def _judge_one(self, response: ResponseRecord) -> list[Feedback]:
        comparison = split_comparison_id(response.request_id)
        if comparison is not None:
            return await self._judge_comparison(response, comparison[0])
        if not should_sample(response.request_id, self._settings.learning.judge_sample_rate):
            return []
        text = request_text([m.to_domain() for m in response.messages])
        reference = self._references.lookup(text)
        if reference is not None:
            feedback_id = judge_feedback_id(response.request_id, response.tier, None, "verifier")
            if await self._already_judged(response.request_id, feedback_id):
                return []
            verdict = await VerifierJudge().judge(JudgeTask(text, response.text or "", reference=reference))
            JUDGED.labels("verifier", "passed" if verdict.detail.get("passed") else "failed_check").inc()
            return [Feedback(feedback_id, response.request_id, "verifier", "judge", verdict.score, verdict.quality,
                             tenant=response.tenant, tier=response.tier,
                             detail={"judge": verdict.judge, **verdict.detail})]
        if response.tier == self._reference_tier or self._reference_generator is None:
            return []
        feedback_id = judge_feedback_id(response.request_id, response.tier, self._reference_tier, "pairwise")
        if await self._already_judged(response.request_id, feedback_id):
            return []
        reference_answer, reference_model = await self._reference_answer(response)
        verdict = await self._judge.judge(JudgeTask(text, response.text or "", reference_answer=reference_answer))
        JUDGED.labels("pairwise", verdict.detail.get("outcome", "scored")).inc()
        return [Feedback(feedback_id, response.request_id, "pairwise", "judge", verdict.score, verdict.quality,
                         tenant=response.tenant, tier=response.tier, other_tier=self._reference_tier,
                         detail={"judge": verdict.judge, **verdict.detail, "reference_model": reference_model,
                                 "reference_answer": reference_answer[:REFERENCE_EXCERPT_CHARS]})]

    async def _reference_answer(self, response: ResponseRecord) -> tuple[str, str]:
        assert self._reference_generator is not None
        generator: Generator = await self._reference_generator()
        tier = self._settings.tier(self._reference_tier)
        params = GenerationParams(max_tokens=tier.max_tokens, temperature=self._settings.temperature)
        result = await asyncio.wait_for(
            generator.generate([m.to_domain() for m in response.messages], params,
                               request_id=f"{response.request_id}#reference"),
            tier.timeout_s + 5)
        if not result.text.strip():
            raise JudgeError(f"the reference tier {self._reference_tier} gave an empty answer")
        return result.text, result.model

    async def _judge_comparison(self, response: ResponseRecord, original_id: str) -> list[Feedback]:
        original = await self._original(original_id)
        if original is None or not original.response or not original.tier or original.tier == response.tier:
            log.info("comparison %s: no usable original answer %s; skipped", response.request_id, original_id)
            return []
        feedback_id = judge_feedback_id(original_id, response.tier, original.tier, "pairwise")
        if await self._already_judged(original_id, feedback_id):
            return []
        text = request_text([m.to_domain() for m in response.messages])
        verdict = await self._judge.judge(JudgeTask(text, response.text or "", reference_answer=original.response,
                                                    reference=self._references.lookup(text)))
        JUDGED.labels("comparison", verdict.detail.get("outcome", "scored")).inc()
        if verdict.kind != "pairwise":
            # A verifier scored the comparison answer alone: it is about that tier's answer only.
            return [Feedback(judge_feedback_id(original_id, response.tier, None, "verifier"), original_id, "verifier",
                             "judge", verdict.score, verdict.quality, tenant=response.tenant, tier=response.tier,
                             detail={"judge": verdict.judge, **verdict.detail, "comparison": True})]
        return [Feedback(feedback_id, original_id, "pairwise", "judge", verdict.score, verdict.quality,
                         tenant=response.tenant, tier=response.tier, other_tier=original.tier,
                         detail={"judge": verdict.judge, **verdict.detail, "comparison": True})]

    async def _original(self, request_id: str) -> ResponseLog | None:
        """The original answer from the history; the log stage may still be writing it, so wait a bit."""
        if self._original_lookup is None:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_for_original_s
        delay = 0.2
        while True:
            found = await asyncio.wait_for(self._original_lookup(request_id), 10)
            if found is not None or loop.time() > deadline:
                return found
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _already_judged(self, request_id: str, feedback_id: str) -> bool:
        existing = await asyncio.wait_for(self._store.feedback_about([request_id]), 10)
        return any(f.feedback_id == feedback_id for f in existing)

    async def _store_with_retry(self, items: list[Feedback], max_backoff_s: float = 10.0) -> None:
        delay = 0.2
        while True:
            try:
                await self._store.record_feedback(items)
                return
            except Exception as exc:
                log.warning("history unavailable (%s: %s); retrying judge verdicts in %.1fs", type(exc).__name__,
                            exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_backoff_s)


async def build_judge_stage(settings: Settings, services: Any) -> JudgeStage:
    """The stage over the worker's services: the judge model, the reference tier, the history."""
    from echolm.generation.factory import make_generator
    from echolm.history.store import SqlHistoryStore

    history = await services.history()
    assert isinstance(history, SqlHistoryStore), "the judge stage needs the SQL history store"
    learning = settings.learning
    if learning.judge_model is not None:
        judge_generator = make_generator(learning.judge_model, settings)
        start = getattr(judge_generator, "start", None)
        if start is not None:
            await start()
    else:
        judge_generator = await services.generator(learning.judge_tier or settings.largest_tier.name)
    llm = LlmPairwiseJudge.over(judge_generator, max_tokens=learning.judge_max_tokens, timeout_s=learning.judge_timeout_s)
    reference_tier = learning.reference_tier or settings.largest_tier.name

    async def original(request_id: str) -> ResponseLog | None:
        found = await history.responses_for([request_id])
        return found[0] if found else None

    return JudgeStage(settings, FeedbackStore(history), CascadeJudge([VerifierJudge(), llm]),
                      reference_generator=lambda: services.generator(reference_tier), original_lookup=original,
                      references=ReferenceBook.load(learning.references_path))


async def run_judge_consumer(settings: Settings, build: Callable[[], Any], *, max_records: int = 4) -> None:
    """Consume the responses topic in the judge's own group until cancelled; commit after each batch."""
    from aiokafka import AIOKafkaConsumer

    assert settings.kafka_bootstrap, "the judge stage needs a broker"
    # A batch may take a reference generation and two judge calls per answer.
    per_answer_s = 3 * settings.learning.judge_timeout_s + 30
    consumer = AIOKafkaConsumer(
        settings.topics.responses, bootstrap_servers=settings.kafka_bootstrap,
        client_id=f"{settings.kafka_client_id}-judge", group_id=f"{settings.consumer_group}-judge",
        enable_auto_commit=False, auto_offset_reset="earliest",
        session_timeout_ms=int(settings.session_timeout_s * 1000),
        heartbeat_interval_ms=int(settings.heartbeat_interval_s * 1000),
        rebalance_timeout_ms=int(settings.rebalance_timeout_s * 1000),
        max_poll_interval_ms=int(max(300.0, per_answer_s * max_records) * 1000),
    )
    await asyncio.wait_for(consumer.start(), 60)
    try:
        stage: JudgeStage = await build()
        while True:
            batches = await consumer.getmany(timeout_ms=1000, max_records=max_records)
            records = []
            for messages in batches.values():
                for message in messages:
                    try:
                        records.append(ResponseRecord.model_validate_json(message.value))
                    except Exception:
                        log.warning("judge: skipping an undecodable response record (key %r)", message.key)
            if records:
                await stage.process(records)
            if batches:
                await consumer.commit()
    finally:
        await consumer.stop()


@register_stage("judge")
def wire(w: _Wiring) -> None:
    @w.app.task
    async def judge_responses() -> None:
        delay = 1.0
        while True:
            try:
                await run_judge_consumer(w.settings, lambda: w._stage(  # noqa: SLF001 - built once per worker
                    "judge", lambda: build_judge_stage(w.settings, w.services)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("judge consumer stopped (%s); restarting in %.0fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
