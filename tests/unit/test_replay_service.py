"""The replay and eviction services' logic on the in-memory doubles (no database, broker or model)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from echolm.domain import ChatMessage, Example, GenerationParams, GenerationResult
from echolm.eviction_service import EvictionBudget, EvictionService, plan_tenant
from echolm.history.example_stats_store import (
    EvictionCandidate,
    ExampleStats,
    ExampleUsage,
    UsagePolicy,
    fold_usages,
    no_feedback,
)
from echolm.judging.judge import (
    Judgement,
    JudgeTask,
    LlmPairwiseJudge,
    ReferenceBook,
    TaskReference,
    VerifierJudge,
)
from echolm.judging.pairwise import PairwiseJudge
from echolm.policy.eviction import decayed_value
from echolm.policy.replay import GainTracker, ReplayPlanner
from echolm.protocols import ExampleCandidate
from echolm.replay import (
    CompletenessReplayJudge,
    PairwiseReplayJudge,
    ReplayConfig,
    ReplayService,
    VerifierReplayJudge,
    select_judge,
)
from echolm.testing import InMemoryExampleStatsStore, InMemoryHistoryStore

POLICY = UsagePolicy(tier_costs={"small": 1 / 3, "large": 1.0}, smoothing=0.2, default_quality=0.5,
                     bad_quality_below=0.45)
NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)


class ScriptedGenerator:
    """Answers from a script, in order; records every prompt it was given."""

    def __init__(self, answers: Sequence[str], finish_reason: str = "stop") -> None:
        self._answers = itertools.cycle(answers)
        self.finish_reason = finish_reason
        self.prompts: list[str] = []

    @property
    def model_name(self) -> str:
        return "scripted-large"

    async def generate(self, messages: Sequence[ChatMessage], params: GenerationParams, *,
                       request_id: str) -> GenerationResult:
        self.prompts.append(messages[-1].content)
        text = next(self._answers)
        return GenerationResult(text, "scripted-large", 10, len(text.split()), self.finish_reason, 0.01)

    async def aclose(self) -> None:
        return None


class Load:
    """A load probe returning scripted values, then the last one forever."""

    def __init__(self, *values: float) -> None:
        self.values = list(values)
        self.reads = 0

    async def __call__(self) -> float:
        self.reads += 1
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]


def candidate(source: str, prompt: str, response: str, tenant: str = "acme") -> ExampleCandidate:
    vector = np.random.default_rng(abs(hash(source)) % 2**32).standard_normal(8).astype(np.float32)
    return ExampleCandidate(tenant=tenant, source_request_id=source, prompt=prompt, response=response,
                            model="large-model", tier="large", embedding=vector / np.linalg.norm(vector))


async def stores_with(*examples: tuple[str, str]) -> tuple[InMemoryHistoryStore, InMemoryExampleStatsStore, list[int]]:
    history = InMemoryHistoryStore()
    ids = await history.admit_examples([candidate(f"src{i}", p, r) for i, (p, r) in enumerate(examples)])
    return history, InMemoryExampleStatsStore(history), ids


async def use(stats: InMemoryExampleStatsStore, example_id: int, times: int, quality: float, tier: str = "small",
              prefix: str = "") -> None:
    """Record ``times`` offloaded uses of ``example_id`` with this quality and settle them."""
    usages = [ExampleUsage(f"{prefix}{example_id}-{n}", "acme", tier, (example_id,), tier != "large")
              for n in range(times)]
    await stats.record_usages(usages)

    async def quality_of(recorded: Sequence[ExampleUsage]) -> dict[str, float]:
        return {u.request_id: quality for u in recorded}

    await stats.settle_usages(POLICY, quality_of, settle_after=timedelta(0))


def service(history, stats, generator, load, *, judge=None, planner=None, **config) -> ReplayService:
    judges = select_judge("auto", llm=None, verifier=None, fallback=judge)
    return ReplayService(history, stats, generator, judges, planner or ReplayPlanner(samples_per_replay=2),
                         load, ReplayConfig(tier="large", samples=2, **config))


# ------------------------------------------------------------------ usage statistics


def test_fold_usages_follows_the_gain_tracker_and_counts_good_offloads_only() -> None:
    tenants = {1: "acme", 2: "acme"}
    usages = [
        (ExampleUsage("r1", "acme", "small", (1, 2), True), 0.6),
        (ExampleUsage("r2", "acme", "small", (1,), True), None),  # no feedback: default 0.5
        (ExampleUsage("r3", "acme", "small", (1,), True), 0.1),  # a bad answer: not a successful offload
        (ExampleUsage("r4", "acme", "large", (2,), False), 0.9),  # not offloaded
        (ExampleUsage("r5", "acme", "small", (7,), True), 0.9),  # unknown example: ignored
    ]
    stats = fold_usages(usages, {}, tenants, POLICY, NOW)

    tracker = GainTracker(smoothing=0.2)
    for example_id, quality, cost in [(1, 0.6, 1 / 3), (2, 0.6, 1 / 3), (1, 0.5, 1 / 3), (1, 0.1, 1 / 3),
                                      (2, 0.9, 1.0)]:
        tracker.observe_use(example_id, quality, cost)
    assert set(stats) == {1, 2}
    assert stats[1].gain == pytest.approx(tracker.gains[1].gain) and stats[1].uses == 3
    assert stats[2].gain == pytest.approx(tracker.gains[2].gain) and stats[2].uses == 2
    assert stats[1].offload_value == pytest.approx(2.0)  # r1 and r2; r3 was bad
    assert stats[2].offload_value == pytest.approx(1.0)  # r1 only; r4 was served by the large tier


def test_offload_value_decays_by_point_nine_per_hour_before_a_new_offload() -> None:
    before = {1: ExampleStats(1, "acme", uses=1, gain=0.1, offload_value=3.0,
                              offload_updated_at=NOW - timedelta(hours=2))}
    after = fold_usages([(ExampleUsage("r", "acme", "small", (1,), True), 0.8)], before, {1: "acme"}, POLICY, NOW)
    assert after[1].offload_value == pytest.approx(3.0 * 0.9**2 + 1.0)
    assert after[1].offload_updated_at == NOW


async def test_redelivered_usages_are_counted_once() -> None:
    history, stats, [example_id] = await stores_with(("q", "a"))
    usage = ExampleUsage("req-1", "acme", "small", (example_id,), True)
    assert await stats.record_usages([usage]) == 1
    assert await stats.record_usages([usage, usage]) == 0
    first = await stats.settle_usages(POLICY, no_feedback, settle_after=timedelta(0))
    again = await stats.settle_usages(POLICY, no_feedback, settle_after=timedelta(0))
    assert (first.usages, again.usages) == (1, 0)
    assert stats.stats[example_id].uses == 1


async def test_usages_wait_for_feedback_before_they_settle() -> None:
    history, stats, [example_id] = await stores_with(("q", "a"))
    await stats.record_usages([ExampleUsage("req-1", "acme", "small", (example_id,), True)])
    assert (await stats.settle_usages(POLICY, no_feedback, settle_after=timedelta(minutes=1))).usages == 0
    later = datetime.now(UTC) + timedelta(minutes=2)
    assert (await stats.settle_usages(POLICY, no_feedback, settle_after=timedelta(minutes=1), now=later)).usages == 1


# ------------------------------------------------------------------ replay


async def test_replay_picks_the_highest_gain_example_and_writes_a_new_version() -> None:
    history, stats, ids = await stores_with(("q low", "fine answer"), ("q high", "bad"), ("q mid", "meh"))
    await use(stats, ids[0], 3, quality=0.9)
    await use(stats, ids[1], 3, quality=0.0)
    await use(stats, ids[2], 3, quality=0.4)
    generator = ScriptedGenerator(["a much longer and complete answer"])
    replay = service(history, stats, generator, Load(0.0), examples_per_round=1)

    report = await replay.run_round()

    assert [o.example_id for o in report.outcomes] == [ids[1]]
    outcome = report.outcomes[0]
    assert outcome.status == "upgraded" and outcome.judge == "heuristic"
    assert generator.prompts == ["q high", "q high"]  # two samples of the chosen example only
    [new] = await history.examples_by_id([outcome.new_example_id])
    assert new.response == "a much longer and complete answer" and new.version == 2
    assert history._examples[ids[1]].status == "superseded"
    assert history._examples[new.id].parent_id == ids[1]
    events = await history.cache_events_since(3)
    assert [(e.op, e.example.id) for e in events] == [("remove", ids[1]), ("add", new.id)]
    assert stats.stats[new.id].replay_rounds == 1 and stats.stats[new.id].uses == 0


async def test_replay_stops_at_the_cut_off() -> None:
    history, stats, ids = await stores_with(("q1", "a"), ("q2", "b"))
    await use(stats, ids[0], 4, quality=0.0)  # G = 1/3, G * uses = 1.33: pays
    await use(stats, ids[1], 1, quality=0.8)  # G = 0.067, G * uses = 0.067 < 2 * 0.05: does not pay
    replay = service(history, stats, ScriptedGenerator(["a longer answer than before"]), Load(0.0))

    report = await replay.run_round()

    assert [o.example_id for o in report.outcomes] == [ids[0]]
    assert report.skipped_cutoff == 1 and report.considered == 2


async def test_an_example_is_replayed_at_most_five_times() -> None:
    history, stats, [example_id] = await stores_with(("q", "the best answer there is, long and complete"))
    generator = ScriptedGenerator(["short"])  # never better: every round keeps the current answer
    replay = service(history, stats, generator, Load(0.0))
    rounds = []
    for n in range(7):
        await use(stats, example_id, 2, quality=0.0, prefix=f"round{n}-")
        report = await replay.run_round()
        rounds.append([o.status for o in report.outcomes])
    assert rounds == [["kept"]] * 5 + [[], []]
    assert stats.stats[example_id].replay_rounds == 5
    assert report.skipped_cap == 1
    assert len(generator.prompts) == 5 * 2


async def test_never_starts_while_busy_and_yields_when_load_rises_between_samples() -> None:
    history, stats, [example_id] = await stores_with(("q", "bad"))
    await use(stats, example_id, 3, quality=0.0)
    generator = ScriptedGenerator(["a better and longer answer"])

    busy = await service(history, stats, generator, Load(0.9)).run_round()
    assert busy.outcomes == [] and not busy.idle and generator.prompts == []

    # idle for the round and the first sample, busy before the second sample
    report = await service(history, stats, generator, Load(0.0, 0.0, 0.9)).run_round()
    assert [o.status for o in report.outcomes] == ["yielded"]
    assert len(generator.prompts) == 1
    assert history._examples[example_id].status == "active"  # nothing written
    assert stats.stats[example_id].replay_rounds == 0  # a yield does not count as a round


async def test_dry_run_plans_without_generating() -> None:
    history, stats, [example_id] = await stores_with(("q", "bad"))
    await use(stats, example_id, 3, quality=0.0)
    generator = ScriptedGenerator(["x"])
    report = await service(history, stats, generator, Load(0.0)).run_round(dry_run=True)
    assert [(o.example_id, o.status) for o in report.outcomes] == [(example_id, "planned")]
    assert generator.prompts == [] and stats.stats[example_id].replay_rounds == 0


async def test_verifier_judge_upgrades_a_wrong_answer_and_stores_its_quality() -> None:
    history, stats, [example_id] = await stores_with(("What is 6 times 7?", "It is 41."))
    await use(stats, example_id, 3, quality=0.0)
    verifier = VerifierReplayJudge(ReferenceBook({"What is 6 times 7?": TaskReference("numeric", "42")}))
    judges = select_judge("auto", llm=None, verifier=verifier)
    replay = ReplayService(history, stats, ScriptedGenerator(["6 x 7 = 43", "The answer is 42."]), judges,
                           ReplayPlanner(samples_per_replay=2), Load(0.0), ReplayConfig(tier="large", samples=2))

    [outcome] = (await replay.run_round()).outcomes

    assert outcome.status == "upgraded" and outcome.judge == "verifier"
    assert (outcome.score_before, outcome.score_best, outcome.score_after) == (0.0, 1.0, 1.0)
    [new] = await history.examples_by_id([outcome.new_example_id])
    assert new.response == "The answer is 42." and new.quality == 1.0


async def test_an_answer_the_verifier_already_passes_is_kept_without_generating() -> None:
    history, stats, [right_id, wrong_id] = await stores_with(("What is 6 times 7?", "The answer is 42."),
                                                             ("What is 5 times 5?", "The answer is 24."))
    await use(stats, right_id, 5, quality=0.0)  # its uses went wrong for other reasons: highest gain
    await use(stats, wrong_id, 3, quality=0.0)
    verifier = VerifierReplayJudge(ReferenceBook({"What is 6 times 7?": TaskReference("numeric", "42"),
                                                  "What is 5 times 5?": TaskReference("numeric", "25")}))
    generator = ScriptedGenerator(["The answer is 25."])
    replay = ReplayService(history, stats, generator, select_judge("auto", llm=None, verifier=verifier),
                           ReplayPlanner(samples_per_replay=2), Load(0.0), ReplayConfig(tier="large", samples=2))

    first, second = (await replay.run_round()).outcomes

    assert (first.example_id, first.status, first.samples, first.score_before) == (right_id, "kept", 0, 1.0)
    assert first.score_after == 1.0 and first.score_best is None
    assert generator.prompts == ["What is 5 times 5?"] * 2  # only the wrong entry cost samples
    assert (second.example_id, second.status) == (wrong_id, "upgraded")
    [kept] = [s for s in await stats.gain_candidates(10) if s.example_id == right_id] or [None]
    assert kept is None or kept.replay_rounds == 1  # counted as a round: not planned again at once


async def test_the_verifier_scores_the_current_answer_once_per_replay() -> None:
    class CountingVerifier(VerifierJudge):
        def __init__(self) -> None:
            super().__init__()
            self.candidates: list[str] = []

        async def judge(self, task: JudgeTask) -> Judgement:
            self.candidates.append(task.candidate)
            return await super().judge(task)

    history, stats, [example_id] = await stores_with(("What is 6 times 7?", "It is 41."))
    await use(stats, example_id, 3, quality=0.0)
    counting = CountingVerifier()
    verifier = VerifierReplayJudge(ReferenceBook({"What is 6 times 7?": TaskReference("numeric", "42")}), counting)
    replay = ReplayService(history, stats, ScriptedGenerator(["6 x 7 = 43", "The answer is 42."]),
                           select_judge("auto", llm=None, verifier=verifier), ReplayPlanner(samples_per_replay=2),
                           Load(0.0), ReplayConfig(tier="large", samples=2))

    [outcome] = (await replay.run_round()).outcomes

    assert outcome.status == "upgraded" and outcome.score_before == 0.0
    assert counting.candidates == ["It is 41.", "6 x 7 = 43", "The answer is 42."]


async def test_pairwise_judge_compares_each_sample_with_the_current_answer() -> None:
    asked: list[str] = []

    async def judge_model(messages: list[ChatMessage]) -> str:
        prompt = messages[-1].content
        asked.append(prompt)
        # Prefers whichever response says "good", in either position: +2 if B is it, -2 if A is.
        a_part = prompt.split("[Response A]\n")[1].split("\n\n")[0]
        b_part = prompt.split("[Response B]\n")[1].split("\n\n")[0]
        return "Score: 2" if "good" in b_part else ("Score: -2" if "good" in a_part else "Score: 0")

    example = Example(1, "acme", "q", "bad answer", "m", "large")
    samples = [GenerationResult(t, "m", 1, 1, "stop", 0.0) for t in ("another bad one", "a good one")]
    judge = PairwiseReplayJudge(LlmPairwiseJudge(PairwiseJudge(judge_model), "judge-model"))
    current, scored = await judge.judge(example, samples)
    assert current.score == 0.0
    assert [s.score for s in scored] == [0.0, 2.0]
    assert scored[1].quality == pytest.approx((2 + 3) / 6)
    assert len(asked) == 4  # both orders for each sample


async def test_heuristic_judge_prefers_complete_answers() -> None:
    example = Example(1, "acme", "q", "a fairly long cached answer", "m", "large")
    samples = [GenerationResult("an even longer answer that was cut off in the mid", "m", 1, 1, "length", 0.0),
               GenerationResult("short but complete", "m", 1, 1, "stop", 0.0)]
    current, scored = await CompletenessReplayJudge().judge(example, samples)
    assert scored[0].score == 0.0 and scored[1].score == len("short but complete")
    assert current.score == len("a fairly long cached answer")


def test_judge_selection_order(tmp_path) -> None:
    path = tmp_path / "refs.jsonl"
    path.write_text('{"prompt": "What is  2+2?", "reference": "4"}\n{"prompt": "f", "reference": "assert f()", '
                    '"kind": "python"}\n')
    verifier = VerifierReplayJudge(ReferenceBook.load(path))
    llm = PairwiseReplayJudge(LlmPairwiseJudge(PairwiseJudge(lambda m: None), "m"))  # type: ignore[arg-type,return-value]
    with_ref, without_ref = Example(1, "t", "What is 2+2?", "", "m", "l"), Example(2, "t", "other", "", "m", "l")
    assert select_judge("auto", llm=llm, verifier=verifier)(with_ref) is llm
    assert select_judge("auto", llm=None, verifier=verifier)(with_ref) is verifier
    assert select_judge("auto", llm=None, verifier=verifier)(without_ref).name == "heuristic"
    with pytest.raises(ValueError):
        select_judge("verifier", llm=None, verifier=verifier)(without_ref)


# ------------------------------------------------------------------ eviction


def brute_force_best_kept_value(items: list[EvictionCandidate], budget: int, now: datetime) -> float:
    best = 0.0
    for r in range(len(items) + 1):
        for subset in itertools.combinations(items, r):
            if sum(c.size_bytes for c in subset) <= budget:
                best = max(best, sum(decayed_value(c.offload_value, c.value_at.timestamp(), now.timestamp())
                                     for c in subset))
    return best


def test_plan_tenant_keeps_the_knapsack_optimum_and_protects_new_examples() -> None:
    old = NOW - timedelta(days=1)
    rng = np.random.default_rng(7)
    items = [EvictionCandidate(i, int(rng.integers(100, 1000)), float(rng.integers(0, 10)),
                               old + timedelta(hours=int(rng.integers(0, 20))), old) for i in range(1, 10)]
    new_example = EvictionCandidate(99, 500, 0.0, NOW, NOW - timedelta(minutes=5))
    budget = EvictionBudget(max_bytes=2500, protect_new=timedelta(hours=1))

    decision = plan_tenant(items + [new_example], budget, NOW, "acme")

    assert 99 not in decision.evict and decision.protected == 1
    kept = [c for c in items if c.example_id not in decision.evict]
    assert sum(c.size_bytes for c in kept) <= 2500 - 500
    assert decision.kept_value == pytest.approx(brute_force_best_kept_value(items, 2000, NOW))
    assert decision.evicted_bytes == sum(c.size_bytes for c in items if c.example_id in decision.evict)


def test_row_budget_keeps_the_most_valuable_rows() -> None:
    old = NOW - timedelta(days=1)
    items = [EvictionCandidate(i, 100, float(v), old, old) for i, v in enumerate([5, 1, 3, 0, 4], start=1)]
    decision = plan_tenant(items, EvictionBudget(max_examples=3, protect_new=timedelta(0)), NOW)
    assert decision.evict == [2, 4]


def test_without_recorded_offloads_only_the_excess_is_evicted_oldest_first() -> None:
    items = [EvictionCandidate(i, 100, 0.0, NOW - timedelta(days=10 - i), NOW - timedelta(days=10 - i))
             for i in range(1, 6)]
    decision = plan_tenant(items, EvictionBudget(max_bytes=350, protect_new=timedelta(0)), NOW)
    assert decision.evict == [1, 2] and decision.evicted_bytes == 200
    assert plan_tenant(items, EvictionBudget(max_bytes=500, protect_new=timedelta(0)), NOW).evict == []


async def test_eviction_service_marks_the_chosen_examples_evicted_per_tenant() -> None:
    history = InMemoryHistoryStore()
    ids = await history.admit_examples([candidate(f"a{i}", f"prompt {i}", "x" * 100) for i in range(4)]
                                       + [candidate("b0", "prompt b", "y", tenant="globex")])
    stats = InMemoryExampleStatsStore(history)
    for example_id, times in zip(ids[:4], [3, 0, 1, 2], strict=True):
        if times:
            await use(stats, example_id, times, quality=0.9)
    budget = EvictionBudget(max_examples=2, protect_new=timedelta(0))

    planned = await EvictionService(history, stats, budget).run(dry_run=True)
    assert [d.evict for d in planned] == [[ids[1], ids[2]], []] and planned[0].evicted == []
    assert await history.count_examples("acme") == 4

    decisions = await EvictionService(history, stats, budget).run()
    assert decisions[0].evicted == [ids[1], ids[2]]
    assert await history.count_examples("acme") == 2 and await history.count_examples("globex") == 1
    removed = [e.example.id for e in await history.cache_events_since(0) if e.op == "remove"]
    assert removed == [ids[1], ids[2]]
    assert await EvictionService(history, stats, EvictionBudget()).run() == []  # no budget: nothing to do


async def test_replay_waits_until_every_load_estimate_says_idle() -> None:
    from echolm.replay import highest_load
    from echolm.routing.load import LoadBoard, LoadReport
    from streams.replay_stage import _reported_load

    assert await highest_load(Load(0.1), Load(0.5), Load(0.0))() == 0.5

    board = LoadBoard(half_life_s=5.0, stale_after_s=5.0)
    reported = _reported_load(board, "large")
    assert await reported() == 0.0  # no generate worker has reported: no news
    now = time.time()
    board.observe(LoadReport(tier="large", worker="w1", queue=3, in_flight=1, capacity=2, at=now - 2), now=now - 2)
    assert await reported() == pytest.approx(2.0)
    board.observe(LoadReport(tier="large", worker="w1", queue=0, in_flight=0, capacity=2, at=now - 1), now=now - 1)
    assert await reported() == pytest.approx(2.0 * 2 ** (-1 / 5))  # the EMA lets a burst fade, not vanish
    board._reports.clear()  # noqa: SLF001 - reports gone stale
    assert await reported() == 0.0
