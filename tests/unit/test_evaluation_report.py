"""Reading curves: Pareto frontier, throughput at a win rate, dominance; the results section writer."""

from __future__ import annotations

import pytest

from echolm.evaluation.evaluate import RESULTS_BEGIN, RESULTS_END, write_results_section
from echolm.evaluation.report import SystemPoint, dominance, frontier, throughput_at_win_rate, win_rate_at_throughput


def point(ratio: float, win: float, name: str = "s") -> SystemPoint:
    return SystemPoint(workload="w", system=name, knob="", knob_value=None, requests=10, accuracy=win, win_rate=win,
                       wins=0, ties=10, losses=0, throughput_rps=ratio, throughput_ratio=ratio,
                       measured_throughput_ratio=ratio, small_share=0.0, cache_hit_share=0.0, mean_cost_s=1 / ratio)


def test_frontier_keeps_only_undominated_points() -> None:
    points = [point(1.0, 0.5), point(1.2, 0.55), point(1.3, 0.45), point(1.1, 0.4), point(2.0, 0.3)]
    assert [(p.throughput_ratio, p.win_rate) for p in frontier(points)] == [(1.2, 0.55), (1.3, 0.45), (2.0, 0.3)]


def test_throughput_at_and_win_rate_at() -> None:
    points = [point(1.0, 0.5), point(1.4, 0.5), point(1.6, 0.42)]
    assert throughput_at_win_rate(points, 0.5).throughput_ratio == 1.4
    assert throughput_at_win_rate(points, 0.6) is None
    assert win_rate_at_throughput(points, 1.5) == 0.42
    assert win_rate_at_throughput(points, 1.7) is None


def test_dominance_counts_the_others_frontier_points_matched() -> None:
    ours = [point(1.0, 0.5), point(1.5, 0.5), point(2.0, 0.4)]
    theirs = [point(1.0, 0.5), point(1.3, 0.45), point(2.5, 0.2)]
    assert dominance(ours, theirs) == (1, 2)  # nothing of ours reaches 2.5x
    # Only their points at a win rate worth having: the 2.5x point at 0.2 is not a target then.
    assert dominance(ours, theirs, min_win_rate=0.4) == (1, 1)


def test_results_section_is_replaced_between_markers(tmp_path) -> None:
    path = tmp_path / "evaluation.md"
    path.write_text(f"intro\n{RESULTS_BEGIN}\nold\n{RESULTS_END}\noutro\n")
    write_results_section(path, f"{RESULTS_BEGIN}\nnew\n{RESULTS_END}\n")
    assert path.read_text() == f"intro\n{RESULTS_BEGIN}\nnew\n{RESULTS_END}\noutro\n"
    fresh = tmp_path / "fresh.md"
    write_results_section(fresh, f"{RESULTS_BEGIN}\nnew\n{RESULTS_END}\n")
    assert "new" in fresh.read_text()


def test_served_charges_only_the_prompt_tokens_no_kept_prompt_shares() -> None:
    """The scorer replays the tier's prefix cache in arrival order: a repeat and a request sharing a prefix
    are charged less prefill, and a system's pass starts with an empty cache."""
    from types import SimpleNamespace

    from echolm.datasets import TaskItem
    from echolm.evaluation.efficiency import CostModel, TierCostModel
    from echolm.evaluation.prefix_reuse import KvFootprint, PrefixCredit, TierPrefixCache
    from echolm.evaluation.report import WorkloadScorer
    from echolm.evaluation.systems import Arm, Choice

    a = TaskItem("a", "g1", "aaaaaaaaaa", "", "1", (), "en")
    b = TaskItem("b", "g2", "aaaaabbbbb", "", "1", (), "en")

    class Run:
        workload = SimpleNamespace(traffic=[a, b, a], unique_traffic=[a, b], verifier="numeric", name="w")

        def arm_for(self, item, name):  # type: ignore[no-untyped-def]
            return Arm(name, "small")

        def generation(self, item, arm):  # type: ignore[no-untyped-def]
            return SimpleNamespace(text="1", prompt_tokens=10, completion_tokens=5, latency_s=2.0)

        def job(self, item, arm):  # type: ignore[no-untyped-def]
            return SimpleNamespace(key=f"{item.id}/{arm.name}", messages=(item.prompt,))

    verdicts = SimpleNamespace(verify=lambda item, text, verifier: SimpleNamespace(passed=True))
    costs = CostModel({"small": TierCostModel("small", 0.0, 0.1, 0.2, 3, 0, 0.0)})  # 10 + 5 tokens: 2.0 s
    credit = PrefixCredit({"small": TierPrefixCache(10**6, KvFootprint(1), lambda messages: [ord(c) for c in messages[0]])})
    scorer = WorkloadScorer(Run(), verdicts, costs, credit)  # type: ignore[arg-type]
    choices = {"a": Choice(arm="small"), "b": Choice(arm="small")}

    served = scorer.served(choices)
    assert [(item.id, reused) for item, _, _, reused in served] == [("a", 0), ("b", 5), ("a", 9)]
    assert [round(cost, 6) for _, _, cost, _ in served] == [2.0, 1.5, 1.1]  # 0.1 s per prefilled token
    assert [reused for *_, reused in scorer.served(choices)] == [0, 5, 9]  # a new pass starts cold
    assert WorkloadScorer(Run(), verdicts, costs).served(choices)[2][2] == 2.0  # no credit configured


def test_a_system_mixing_tiers_is_charged_their_overlap() -> None:
    """Each tier has its own queue: a mix of tiers finishes sooner than one server would when the tiers
    slow each other by less than 2x (the measured ``shared_cpu_slowdown``)."""
    from dataclasses import replace
    from types import SimpleNamespace

    from echolm.datasets import TaskItem
    from echolm.evaluation.efficiency import CostModel, TierCostModel
    from echolm.evaluation.report import WorkloadScorer
    from echolm.evaluation.systems import Arm, Choice

    a = TaskItem("a", "g1", "first", "", "1", (), "en")
    b = TaskItem("b", "g2", "second", "", "1", (), "en")

    class Run:
        workload = SimpleNamespace(traffic=[a, b], unique_traffic=[a, b], verifier="numeric", name="w")

        def arm_for(self, item, name):  # type: ignore[no-untyped-def]
            return Arm(name, name)

        def generation(self, item, arm):  # type: ignore[no-untyped-def]
            return SimpleNamespace(text="1", prompt_tokens=10, completion_tokens=5, latency_s=2.0)

    verdicts = SimpleNamespace(verify=lambda item, text, verifier: SimpleNamespace(passed=True))
    one_server = CostModel({"small": TierCostModel("small", 0.0, 0.1, 0.2, 3, 0, 0.0),    # 2 s a request
                            "large": TierCostModel("large", 0.0, 0.2, 0.4, 3, 0, 0.0)})   # 4 s a request
    mixed = {"a": Choice(arm="small"), "b": Choice(arm="large")}
    serial = WorkloadScorer(Run(), verdicts, one_server).evaluate("mix", mixed, uses_retrieval=False)  # type: ignore[arg-type]
    assert serial.throughput_ratio == pytest.approx(8.0 / 6.0)
    overlapped = WorkloadScorer(Run(), verdicts, replace(one_server, shared_cpu_slowdown=1.5))  # type: ignore[arg-type]
    point = overlapped.evaluate("mix", mixed, uses_retrieval=False)
    assert point.throughput_ratio == pytest.approx(8.0 / (1.5 * 2.0 + 2.0))
    assert point.throughput_rps == pytest.approx(2 / 5.0)
    assert point.service_times == [("small", 2.0), ("large", 4.0)]
    # Always-large is one tier: the slowdown does not touch it.
    assert overlapped.evaluate("large", {"a": Choice(arm="large"), "b": Choice(arm="large")},
                               uses_retrieval=False).throughput_ratio == pytest.approx(1.0)


def _popular_and_rare_scorer(traffic: str, passes: set[tuple[str, str]]):  # type: ignore[no-untyped-def]
    """A scorer over requests "p" and "r" (``traffic`` spells their order, repeats included), arms
    large, small and small+nearest; an answer passes where (request, arm) is in ``passes``."""
    from types import SimpleNamespace

    from echolm.datasets import TaskItem
    from echolm.evaluation.efficiency import CostModel, TierCostModel
    from echolm.evaluation.harness import MissingGenerations
    from echolm.evaluation.report import WorkloadScorer
    from echolm.evaluation.systems import Arm

    items = {rid: TaskItem(rid, f"g-{rid}", rid, "", "1", (), "en") for rid in "pr"}

    class Run:
        workload = SimpleNamespace(traffic=[items[rid] for rid in traffic],
                                   unique_traffic=[items[rid] for rid in dict.fromkeys(traffic)],
                                   cache=[SimpleNamespace(id="cache-r"), SimpleNamespace(id="cache-p")],
                                   verifier="numeric", name="w")
        table = SimpleNamespace(best=lambda request_id: (1, 0.9) if request_id == "p" else (0, 0.4))

        def arm_for(self, item, name):  # type: ignore[no-untyped-def]
            if name not in ("large", "small", "small+nearest"):
                raise MissingGenerations(name)
            return Arm(name, "large" if name == "large" else "small")

        def generation(self, item, arm):  # type: ignore[no-untyped-def]
            text = "pass" if (item.id, arm.name) in passes else "fail"
            return SimpleNamespace(text=text, prompt_tokens=10, completion_tokens=5, latency_s=1.0)

    verdicts = SimpleNamespace(verify=lambda item, text, verifier: SimpleNamespace(passed=text == "pass"))
    costs = CostModel({t: TierCostModel(t, 0.0, 0.1, 0.2, 3, 0, 0.0) for t in ("small", "large")})
    return WorkloadScorer(Run(), verdicts, costs)  # type: ignore[arg-type]


def test_small_model_lift_counts_repeats_over_the_traffic_and_each_request_once_over_distinct_ones() -> None:
    """A popular request the examples fix moves the traffic's lift more than the distinct requests'."""
    from echolm.evaluation.report import lift_table, small_model_lifts

    # Every other (request, arm) fails, the large model's answers too.
    lifts = small_model_lifts(_popular_and_rare_scorer("pppr", {("p", "small+nearest")}))

    assert list(lifts) == ["nearest examples"]  # no trained or replayed arm generated
    assert lifts["nearest examples"]["traffic"].points == pytest.approx(37.5)  # 3 of 4 requests: a win, not a tie
    assert lifts["nearest examples"]["distinct"].points == pytest.approx(25.0)
    assert lifts["nearest examples"]["distinct"].requests == 2
    assert "| nearest examples | +37.5 [" in lift_table(lifts)


def test_small_model_findings_give_the_parity_headroom_and_the_most_requested_requests_first() -> None:
    """Tying the large model bounds what copying its answers can lift; the popular table ranks by count."""
    from echolm.evaluation.report import small_model_findings

    # The large model passes the popular request, the small one alone only the rare one (a win there).
    passes = {("p", "large"), ("r", "small"), ("p", "small+nearest"), ("r", "small+nearest")}
    findings = small_model_findings(_popular_and_rare_scorer("rppp", passes), top=1)

    # Alone: 3 losses and 1 win over the traffic (win rate 0.25), a loss and a win over the distinct ones.
    assert findings.headroom["traffic"] == pytest.approx(25.0)
    assert findings.headroom["distinct"] == pytest.approx(0.0)
    # With examples it ties the popular request and still wins the rare one: past the headroom, which
    # only answers better than the large model's can do.
    assert findings.lifts["nearest examples"]["traffic"].points == pytest.approx(37.5)
    [row] = findings.popular
    assert (row.request_id, row.count, row.share) == ("p", 3, 0.75)
    assert (row.nearest_entry, row.nearest_similarity) == ("cache-p", 0.9)
    assert row.passed == {"large": True, "small": False, "small+nearest": True}
    text = "\n".join(findings.markdown())
    assert "| p | 3 | 75.0% | cache-p (0.90) | pass | fail | pass |" in text
    assert "lift the small model by +25.0 points over the traffic (+0.0 over the distinct requests)" in text
    assert findings.as_dict()["popular_requests"][0]["passed"] == {"large": True, "small": False,
                                                                  "small+nearest": True}
