"""Quality signal and learning on the real things: feedback through the topic into the table (Tansu,
a worker process), the helpfulness proxy and the bandit router trained from a logged history
(SQLite and PostgreSQL, the real MiniLM embedder), and generate workers' load reports."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from echolm.domain import ChatMessage
from echolm.feedback import FeedbackInput
from echolm.history.feedback_store import Feedback, FeedbackStore
from echolm.history.migrate import upgrade
from echolm.history.store import SqlHistoryStore
from echolm.learning import calibrate_router, fit_router, fit_selector
from echolm.model_store import ROUTER_MODEL, ModelStore
from echolm.protocols import ExampleCandidate, ResponseLog, RoutingContext
from echolm.retrieval.embedder import SentenceTransformerEmbedder
from echolm.routing.bandit_router import BanditRouterService, LoadAwareBanditRouter, RouterState
from echolm.selection import StageTwo
from echolm.settings import Settings, TierSettings, TopicSettings
from streams.broker import EmbeddedBroker
from streams.kafka_io import create_topics
from streams.records import InFlightRequest, Message, RequestRecord
from streams.worker import WorkerProcess

pytestmark = pytest.mark.integration

ECHO_TIERS = [
    TierSettings(name="small", backend="echo", model="echo-small", relative_cost=1.0, use_examples=True),
    TierSettings(name="large", backend="echo", model="echo-large", relative_cost=3.0, use_examples=False,
                 simulated_latency_s=0.5),
]


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with EmbeddedBroker(tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture(scope="module")
def embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder("all-MiniLM-L6-v2", num_threads=1)


def settings_for(tmp_path: Path, bootstrap: str | None = None, **overrides) -> Settings:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    values = dict(data_dir=tmp_path / "state", kafka_bootstrap=bootstrap, topics=TopicSettings(prefix=prefix, partitions=2),
                  consumer_group=prefix, tiers=ECHO_TIERS, admit_from_tiers=["large"], log_level="WARNING",
                  bandit={"epsilon": 0.0, "policy": "argmax", "compare_rate": 0.0})
    values.update(overrides)
    return Settings(**values)


# ---------------------------------------------------------------------------------------------- feedback


async def wait_for(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.3)


def test_feedback_sent_to_the_topic_is_stored_once_by_the_feedback_stage(tmp_path, broker):
    from echolm.cli_learning import send_feedback

    settings = settings_for(tmp_path, broker.bootstrap)
    asyncio.run(create_topics(settings))
    asyncio.run(upgrade(settings.resolved_database_url))
    worker = WorkerProcess(settings, stage="feedback", log_path=tmp_path / "worker.log")
    worker.start()
    items = [FeedbackInput(request_id="r1", rating="up"),
             FeedbackInput(request_id="r1", tier_a="large", tier_b="small", preferred="b"),
             FeedbackInput(request_id_a="r2", request_id_b="r3", score=-1.0),
             FeedbackInput(request_id="r4", score=3, score_min=1, score_max=5)]

    async def scenario() -> list[Feedback]:
        await send_feedback(settings, items)
        await send_feedback(settings, items[:2])  # sent again: stored once
        history = SqlHistoryStore(settings.resolved_database_url)
        store = FeedbackStore(history)
        try:
            async def stored():
                return len(await store.recent_feedback()) >= len(items) and await store.recent_feedback()
            await wait_for(stored, 90, "the feedback rows")
            await asyncio.sleep(2)  # give the duplicates time to arrive
            return await store.recent_feedback()
        finally:
            await history.aclose()

    try:
        rows = asyncio.run(scenario())
    finally:
        worker.stop()
    assert len(rows) == len(items), worker.tail()
    by_kind = {(r.kind, r.request_id): r for r in rows}
    assert by_kind[("thumbs", "r1")].quality == 1.0
    assert by_kind[("pairwise", "r1")].tier == "small" and by_kind[("pairwise", "r1")].other_tier == "large"
    assert by_kind[("pairwise", "r3")].other_request_id == "r2"
    assert by_kind[("score", "r4")].quality == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------- learning

MATH = [f"What is {a} plus {b}? Answer with the number." for a, b in
        [(12, 30), (7, 8), (101, 5), (45, 45), (3, 99), (60, 13), (28, 14), (9, 91), (250, 250), (31, 17), (64, 36),
         (15, 27), (80, 19), (44, 11), (5, 6), (123, 321), (70, 7), (18, 2), (33, 66), (49, 51)]]
POEMS = [f"Write a short poem about {thing}." for thing in
         ["the sea", "autumn leaves", "a lost dog", "city lights", "the moon", "winter rain", "an old house",
          "a mountain lake", "first love", "a thunderstorm", "the desert", "a lighthouse", "spring flowers",
          "a train at night", "the stars", "a quiet forest", "a busy market", "the river", "a summer morning",
          "the harbour"]]
EXAMPLE_MATH = ["What is 10 plus 20? Answer with the number.", "What is 4 plus 5? Answer with the number."]
EXAMPLE_POEMS = ["Write a short poem about the ocean.", "Write a short poem about falling leaves."]


def log_row(request_id: str, prompt: str, tier: str, at: datetime, example_ids=(), similarities=(),
            completion_tokens: int = 20) -> ResponseLog:
    """An answer whose generation took exactly prefill + decode time at the tier's planted token rates."""
    per_prefill, per_decode = (0.001, 0.02) if tier == "small" else (0.003, 0.06)
    prompt_tokens = len(prompt) // 4 + 12 + 90 * len(example_ids)  # hints lengthen the prompt
    seconds = per_prefill * prompt_tokens + per_decode * completion_tokens
    return ResponseLog(request_id, "default", None, [ChatMessage("user", prompt)], prompt, "an answer", tier, f"m-{tier}",
                       list(example_ids), list(similarities), "test", 0.5, {"embed": 0.01, "generate": seconds},
                       prompt_tokens, completion_tokens, None, None, at, at + timedelta(seconds=seconds))


async def plant_history(url: str, embedder) -> list[int]:
    """Math requests answered well by the small tier with math examples, poems badly with poem examples;
    the judge compared each with the large tier's answer. Returns the example ids (math, then poems)."""
    t0 = datetime.now(UTC) + timedelta(minutes=1)  # after the examples were admitted
    history = SqlHistoryStore(url)
    store = FeedbackStore(history)
    try:
        prompts = EXAMPLE_MATH + EXAMPLE_POEMS
        vectors = embedder.embed(prompts)
        ids = await history.admit_examples([ExampleCandidate("default", f"seed{i}", p, "a good answer", "m-large",
                                                             "large", v) for i, (p, v) in enumerate(zip(prompts, vectors))])
        await history.record_responses([log_row(f"seed{i}", p, "large", t0 - timedelta(days=1))
                                        for i, p in enumerate(prompts)])
        logs, verdicts = [], []
        rng = np.random.default_rng(0)
        for kind, texts, example_ids, example_vecs, score in (
                ("math", MATH, ids[:2], vectors[:2], 1.0), ("poem", POEMS, ids[2:], vectors[2:], -2.5)):
            request_vecs = embedder.embed(texts)
            for i, (text, vector) in enumerate(zip(texts, request_vecs)):
                request_id = f"{kind}{i}"
                sims = [float(np.dot(vector, e)) for e in example_vecs]
                at = t0 + timedelta(minutes=i)
                logs.append(log_row(request_id, text, "small", at, example_ids, sims,
                                    completion_tokens=int(rng.integers(5, 60))))
                verdicts.append(Feedback(f"judge:{request_id}", request_id, "pairwise", "judge", score, (score + 3) / 6,
                                         tier="small", other_tier="large"))
                # The reference tier answered a few directly too (its costs get measured).
                if i % 4 == 0:
                    logs.append(log_row(f"{request_id}-large", text, "large", at,
                                        completion_tokens=int(rng.integers(5, 60))))
        await history.record_responses(logs)
        assert await store.record_feedback(verdicts) == len(verdicts)
        return ids
    finally:
        await history.aclose()


def route_context(embedder, prompt: str, examples=()) -> RoutingContext:
    return RoutingContext("new", "default", len(prompt), list(examples), embedder.embed([prompt])[0])


async def test_feedback_moves_the_router_and_calibration_turns_the_knob(database_url, embedder, tmp_path):
    # lambda0 5: the bias may outweigh the amplified quality-gap penalty of the poems (offload at any cost).
    settings = settings_for(tmp_path, database_url=database_url,
                            bandit={"epsilon": 0.0, "policy": "argmax", "compare_rate": 0.0, "lambda0": 5.0})
    await plant_history(database_url, embedder)
    new_math, new_poem = "What is 14 plus 29? Answer with the number.", "Write a short poem about a snowy field."

    history = SqlHistoryStore(database_url)
    store, models = FeedbackStore(history), ModelStore(history)
    try:
        service = BanditRouterService(settings, history=history)  # a route worker's router; no broker, no load source
        await service.refresh()
        assert not service.trained, "no router stored yet: cold start"
        before = {p: service.route(route_context(embedder, p)).tier for p in (new_math, new_poem)}
        assert before == {new_math: "large", new_poem: "large"}  # no close examples: the similarity rule

        fit = await fit_router(store, models, embedder, settings, epochs=120)
        assert fit.version == 1 and fit.samples == 80 and fit.requests == 40
        assert set(fit.rates) == {"small", "large"}
        assert fit.rates["large"]["decode_s_per_token"] == pytest.approx(0.06, rel=0.05)

        await service.refresh(force=True)  # a worker polls every learning.model_poll_interval_s
        assert service.trained
        after = {p: service.route(route_context(embedder, p)).tier for p in (new_math, new_poem)}
        assert after == {new_math: "small", new_poem: "large"}, "feedback moved the router"
        assert service.state is not None and service.state.costs.decode_s_per_token["small"] == pytest.approx(0.02, rel=0.05)

        calibration = await calibrate_router(store, models, embedder, settings, target_offload=0.9)
        assert calibration.reached and calibration.chosen.offload >= 0.9 and calibration.version == 2
        assert calibration.chosen.threshold < 0, "an idle history needs a permanent bias for 90% offload"
        await service.refresh(force=True)
        assert service.route(route_context(embedder, new_poem)).tier == "small", "the knob trades quality for offload"
        # Math offloaded wins, poems offloaded lose, the reference tier ties: all-small would be 0.5.
        quality = await calibrate_router(store, models, embedder, settings, target_win_rate=0.6, save=False)
        assert quality.reached and quality.chosen.win_rate is not None and quality.chosen.win_rate >= 0.6
        assert 0.5 <= quality.chosen.offload < calibration.chosen.offload and quality.version is None
    finally:
        await history.aclose()


def test_the_route_context_lands_in_the_history_and_router_fit_trains_on_it(database_url, embedder, broker, tmp_path):
    """The bandit router in a real worker (every stage, Tansu, the real history): each answer's row keeps
    what the router saw and computed; `router fit` then reads those contexts instead of rebuilding them."""
    from echolm.learning import load_training_data, router_training_set
    from echolm.policy.bandit import context_vector
    from echolm.routing.bandit_router import new_state
    from streams.local import run_local_batch

    settings = settings_for(tmp_path, broker.bootstrap, database_url=database_url, router_policy="bandit")
    example_ids = set(asyncio.run(plant_history(database_url, embedder)))

    async def with_stores(work):
        history = SqlHistoryStore(database_url)
        try:
            return await work(history, FeedbackStore(history), ModelStore(history))
        finally:
            await history.aclose()

    first = asyncio.run(with_stores(lambda h, store, models: fit_router(store, models, embedder, settings, epochs=120)))
    assert first.version == 1 and first.logged_contexts == 0, "planted rows have no logged context: all rebuilt"

    prompts = {"m1": "What is 14 plus 29? Answer with the number.", "m2": "What is 8 plus 16? Answer with the number.",
               "p1": "Write a short poem about a snowy field.", "p2": "Write a short poem about a windy beach."}
    source = tmp_path / "requests.jsonl"
    source.write_text("".join(json.dumps({"custom_id": key, "method": "POST", "url": "/v1/chat/completions",
                                          "body": {"messages": [{"role": "user", "content": text}]}}) + "\n"
                              for key, text in prompts.items()))
    summary = run_local_batch(settings, source, tmp_path / "out.jsonl", workers=1, progress=False, stall_timeout_s=180)
    assert summary.answered == 4 and summary.errors == 0
    outputs = {r["custom_id"]: r["response"]["request_id"]
               for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}

    async def served():
        return {key: row for key, row in zip(outputs, await with_stores(
            lambda h, store, models: h.responses_for(list(outputs.values()))), strict=True)}

    rows = asyncio.run(served())
    assert {key: row.tier for key, row in rows.items()} == {"m1": "small", "m2": "small", "p1": "large", "p2": "large"}
    for key, row in rows.items():
        context = row.route_context
        assert context is not None, f"{key}: no route context logged"
        assert (context.policy, context.policy_version, context.tier, context.explore) == ("bandit", 1, row.tier, False)
        assert set(context.utilities) == set(context.scores) == set(context.costs) == {"small", "large"}
        assert context.scores[row.tier] == pytest.approx(row.route_score)
        assert context.load_tier == "large" and context.load is not None and context.load >= 0.0
        assert context.features.count == len(context.examples) and {e.id for e in context.examples} <= example_ids
        assert context.prompt_chars == len(prompts[key])
    assert all(rows[k].route_context.features.count > 0 for k in ("m1", "m2")), "math found the math examples"

    async def refit():
        async def work(history, store, models):
            await store.record_feedback([Feedback(f"user:{row.request_id}", row.request_id, "thumbs", "user", 1.0, 1.0)
                                         for row in rows.values()])
            state = new_state(settings, embedder.dimension)
            training = await router_training_set(store, models, embedder, settings, state,
                                                 await load_training_data(store))
            return training, await fit_router(store, models, embedder, settings, epochs=60, save=False)
        return await with_stores(work)

    training, second = asyncio.run(refit())
    assert training.logged_contexts == 4 and second.logged_contexts == 4 and second.requests == 44
    vectors = dict(zip(prompts, embedder.embed(list(prompts.values())), strict=True))
    for key, row in rows.items():
        x = training.contexts[training.request_ids.index(row.request_id)]
        expected = context_vector(vectors[key], row.route_context.features, embedder.dimension)
        np.testing.assert_allclose(x, expected, atol=1e-5, err_msg=f"{key}: the logged features were not used")


async def test_the_learn_stage_adapts_the_router_to_new_feedback(database_url, embedder, tmp_path):
    from streams.learn_stage import LearnerState, learn_step

    settings = settings_for(tmp_path, database_url=database_url)
    example_ids = await plant_history(database_url, embedder)
    learner = LearnerState(next_selector_fit=float("inf"))
    assert await learn_step(settings, embedder, learner) == {"router": {"rows": 40, "samples": 0, "version": None}}, \
        "nothing to adapt before `router fit`"
    history = SqlHistoryStore(database_url)
    store, models = FeedbackStore(history), ModelStore(history)
    try:
        await fit_router(store, models, embedder, settings, epochs=120)
        router = LoadAwareBanditRouter(settings, RouterState.from_dict((await models.load(ROUTER_MODEL)).state))
        probe = route_context(embedder, "Write a short poem about a snowy field.")

        def small_margin(r: LoadAwareBanditRouter) -> float:
            scores = r.route(probe).scores
            return scores["small"] - scores["large"]

        before = small_margin(router)
        # New verdicts: the small tier now writes poems as well as the large one (e.g. after a model upgrade).
        poems = [f"Write a short poem about {t}." for t in ("a red kite", "the old pier", "a foggy valley", "the tide")]
        at = datetime.now(UTC) + timedelta(minutes=5)
        vectors = embedder.embed(poems)
        example_vecs = embedder.embed(EXAMPLE_POEMS)
        await history.record_responses([log_row(f"new{i}", p, "small", at, example_ids[2:],
                                                [float(np.dot(v, e)) for e in example_vecs])
                                        for i, (p, v) in enumerate(zip(poems, vectors))])
        await store.record_feedback([Feedback(f"judge:new{i}", f"new{i}", "pairwise", "judge", 2.0, 5 / 6, tier="small",
                                              other_tier="large") for i in range(len(poems))])
        report = await learn_step(settings, embedder, learner)
        assert report["router"]["rows"] == 4 and report["router"]["samples"] == 8 and report["router"]["version"] == 2
        stored = await models.load(ROUTER_MODEL)
        assert stored.metrics["online"]["from_version"] == 1
        after = small_margin(LoadAwareBanditRouter(settings, RouterState.from_dict(stored.state)))
        assert after > before, "new feedback moved the router towards the small tier for poems"
        assert await learn_step(settings, embedder, learner) == {}, "feedback is learned from once"
    finally:
        await history.aclose()


async def test_selector_fit_learns_which_examples_help_and_retrievers_reload_it(database_url, embedder, tmp_path):
    settings = settings_for(tmp_path, database_url=database_url, learning={"selection_threshold": 0.3})
    example_ids = await plant_history(database_url, embedder)
    history = SqlHistoryStore(database_url)
    try:
        stage_two = StageTwo(settings, history)
        await stage_two.refresh()
        assert not stage_two.selector.learned

        fit = await fit_selector(FeedbackStore(history), ModelStore(history), embedder, settings, min_samples=20)
        assert fit.fitted and fit.pairs == 80 and fit.helped == 40 and fit.version == 1
        assert fit.threshold is not None

        await stage_two.refresh(force=True)
        assert stage_two.selector.learned and stage_two.selector.version == 1
        examples = await history.examples_by_id(example_ids)
        math_q, poem_q = "What is 8 plus 16? Answer with the number.", "Write a short poem about a windy beach."
        vectors = embedder.embed([math_q, poem_q])
        example_vecs = embedder.embed([e.prompt for e in examples])
        from echolm.domain import RetrievedExample

        def candidates(vector, kind):  # stage 1 finds the examples of the same kind
            return [RetrievedExample(e, float(np.dot(vector, v))) for e, v in zip(examples, example_vecs)
                    if e.prompt in kind]

        kept = await stage_two.select_batch(vectors, [candidates(vectors[0], EXAMPLE_MATH),
                                                      candidates(vectors[1], EXAMPLE_POEMS)])
        assert kept[0], "math examples helped math requests: stage 2 keeps them"
        assert kept[1] == [], "poem examples did not help poems: stage 2 drops them"
    finally:
        await history.aclose()


# ---------------------------------------------------------------------------------------------- load


def test_generate_workers_report_their_backlog_and_the_router_sees_it_rise(tmp_path, broker):
    from echolm.routing.load import KafkaLoadSource, LoadBoard

    settings = settings_for(tmp_path, broker.bootstrap, bandit={"load_report_interval_s": 0.5})
    asyncio.run(create_topics(settings))
    worker = WorkerProcess(settings, stage="generate", tiers=("large",), log_path=tmp_path / "generate.log")
    worker.start()

    async def scenario() -> tuple[float, float]:
        source = KafkaLoadSource(settings.kafka_bootstrap, settings.topics.load, LoadBoard(half_life_s=1.0))
        source.start()
        try:
            await wait_for(lambda: _true(source.reports_seen > 0), 90, "a first load report")
            idle = source.loads().get("large", 0.0)
            # 12 requests of 0.5 s each straight onto the large tier's topic: a backlog of ~6 s.
            from aiokafka import AIOKafkaProducer

            producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
            await producer.start()
            try:
                for i in range(12):
                    record = InFlightRequest(request=RequestRecord(request_id=f"load{i}",
                                                                   messages=[Message(role="user", content="hi")]))
                    await producer.send_and_wait(settings.topics.generate("large"), key=f"load{i}".encode(),
                                                 value=record.model_dump_json().encode())
            finally:
                await producer.stop()
            peak = await wait_for(lambda: _true(source.loads().get("large", 0.0) > 2.0 and source.loads()["large"]),
                                  30, "the large tier's load to rise")
            return idle, peak
        finally:
            await source.aclose()

    try:
        idle, peak = asyncio.run(scenario())
    finally:
        worker.stop()
    assert idle < 0.5 and peak > 2.0, worker.tail()


async def _true(value):
    return value


# ---------------------------------------------------------------------------------------------- judge

SMOLLM = "smollm2-135m-instruct"


@pytest.mark.slow
def test_judge_stage_stores_a_verdict_for_a_sampled_offloaded_request(tmp_path, broker):
    """SmolLM2 serves both tiers; the judge model is Qwen2.5-Coder-0.5B (SmolLM2 gives no parsable score)."""
    from streams.kafka_io import RequestProducer

    tiers = [TierSettings(name="small", model=SMOLLM, relative_cost=1.0, n_ctx=2048, max_tokens=16, use_examples=True),
             TierSettings(name="large", model=SMOLLM, relative_cost=3.0, n_ctx=2048, max_tokens=16, use_examples=False)]
    judge = TierSettings(name="judge", model="qwen2.5-coder-0.5b-instruct", relative_cost=1.0, n_ctx=2048,
                         max_tokens=32, n_threads=2)
    settings = settings_for(tmp_path, broker.bootstrap, tiers=tiers, router_policy="always-small",
                            learning={"judge_sample_rate": 1.0, "judge_model": judge.model_dump(), "judge_max_tokens": 32})
    asyncio.run(upgrade(settings.resolved_database_url))
    asyncio.run(create_topics(settings))
    worker = WorkerProcess(settings, log_path=tmp_path / "worker.log")  # every stage, the judge included
    worker.start()
    request = RequestRecord(request_id="judged-1", messages=[Message(role="user", content="What is the capital of France?")])

    async def scenario() -> list[Feedback]:
        async with RequestProducer(settings) as producer:
            await producer.send_all([request])
        history = SqlHistoryStore(settings.resolved_database_url)
        store = FeedbackStore(history)
        try:
            async def judged():
                rows = await store.feedback_about(["judged-1"])
                return [r for r in rows if r.source == "judge"]
            return await wait_for(judged, 300, "the judge's verdict")
        finally:
            await history.aclose()

    try:
        verdicts = asyncio.run(scenario())
    finally:
        worker.stop()
    assert len(verdicts) == 1, worker.tail()
    verdict = verdicts[0]
    assert (verdict.kind, verdict.tier, verdict.other_tier) == ("pairwise", "small", "large")
    assert -3 <= verdict.score <= 3 and verdict.quality == pytest.approx((verdict.score + 3) / 6)
    assert verdict.detail is not None and verdict.detail["judge"] == "llm:qwen2.5-coder-0.5b-instruct"
    assert verdict.detail["reference_answer"].strip() and verdict.detail["reference_model"] == SMOLLM


def test_cli_feedback_direct_reports_bad_lines_and_router_fit_needs_labels(tmp_path):
    import os
    import subprocess
    import sys

    from streams.worker import settings_env

    settings = settings_for(tmp_path)
    env = {**os.environ, **settings_env(settings)}
    lines = "\n".join([json.dumps({"request_id": "r1", "rating": "up"}),
                       json.dumps({"request_id": "r1", "rating": "up"}),  # a duplicate: stored once
                       json.dumps({"request_id_a": "r1", "preferred": "a"})])
    done = subprocess.run([sys.executable, "-m", "echolm.cli", "feedback", "-", "--direct"], input=lines, text=True,
                          capture_output=True, env=env, timeout=120)
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"accepted": 2, "stored_new": 1, "rejected": 1}
    assert "rejected line 3: a preference between two requests needs both request_id_a and request_id_b" in done.stderr
    fit = subprocess.run([sys.executable, "-m", "echolm.cli", "router", "fit", "--dry-run"], text=True,
                         capture_output=True, env=env, timeout=300)
    assert fit.returncode == 1 and "no labelled answers yet" in fit.stderr
