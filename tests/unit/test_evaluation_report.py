"""Reading curves: Pareto frontier, throughput at a win rate, dominance; the results section writer."""

from __future__ import annotations

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


def test_results_section_is_replaced_between_markers(tmp_path) -> None:
    path = tmp_path / "evaluation.md"
    path.write_text(f"intro\n{RESULTS_BEGIN}\nold\n{RESULTS_END}\noutro\n")
    write_results_section(path, f"{RESULTS_BEGIN}\nnew\n{RESULTS_END}\n")
    assert path.read_text() == f"intro\n{RESULTS_BEGIN}\nnew\n{RESULTS_END}\noutro\n"
    fresh = tmp_path / "fresh.md"
    write_results_section(fresh, f"{RESULTS_BEGIN}\nnew\n{RESULTS_END}\n")
    assert "new" in fresh.read_text()
