"""The generation cache: stable keys, persistence across processes, only missing jobs generated."""

from __future__ import annotations

from echolm.domain import ChatMessage, GenerationParams
from echolm.evaluation.generation_cache import (
    CachedGeneration,
    GenerationCache,
    GenerationJob,
    generate_missing,
    generation_key,
    missing_jobs,
)
from echolm.settings import Settings, TierSettings

MESSAGES = (ChatMessage("user", "hello"),)
PARAMS = GenerationParams(max_tokens=16, temperature=0.0)


def test_key_depends_on_model_messages_and_sampling_only() -> None:
    key = generation_key("m", MESSAGES, PARAMS)
    assert key == generation_key("m", list(MESSAGES), GenerationParams(max_tokens=16, temperature=0.0))
    assert key != generation_key("m2", MESSAGES, PARAMS)
    assert key != generation_key("m", (ChatMessage("user", "hello!"),), PARAMS)
    assert key != generation_key("m", MESSAGES, GenerationParams(max_tokens=16, temperature=0.7))
    assert key != generation_key("m", (ChatMessage("system", "hello"),), PARAMS)


def test_put_get_survive_reopening(tmp_path) -> None:
    job = GenerationJob("small", "m", MESSAGES, PARAMS)
    cache = GenerationCache(tmp_path)
    assert missing_jobs([job, job], cache) == [job]
    cache.put(job, CachedGeneration(job.key, "m", "hi", 5, 1, "stop", 0.5, 1.0, None))
    cache.close()
    again = GenerationCache(tmp_path)
    assert again.get(job.key).text == "hi"
    assert missing_jobs([job], again) == []
    assert again.measured() == [("m", 5, 1, 0.5, 1.0)]
    again.close()


def test_generate_missing_runs_only_what_is_not_cached(tmp_path) -> None:
    settings = Settings(tiers=[TierSettings(name="small", backend="echo", model="echo-s", relative_cost=1.0),
                               TierSettings(name="large", backend="echo", model="echo-l", relative_cost=3.0)])
    jobs = [GenerationJob("small", "echo-s", (ChatMessage("user", f"q{i}"),), PARAMS) for i in range(3)]
    cache = GenerationCache(tmp_path)
    assert generate_missing(jobs[:2], settings, cache, progress=False) == 2
    assert generate_missing(jobs, settings, cache, progress=False) == 1
    assert generate_missing(jobs, settings, cache, progress=False) == 0
    assert cache.get(jobs[2].key).text == "echo: q2"
    cache.close()


def test_calibration_times_each_job_repeatedly_and_keeps_the_fastest(tmp_path) -> None:
    from echolm.evaluation.generation_cache import calibrate_costs

    settings = Settings(tiers=[TierSettings(name="small", backend="echo", model="echo-s", relative_cost=1.0,
                                            simulated_latency_s=0.01),
                               TierSettings(name="large", backend="echo", model="echo-l", relative_cost=3.0)])
    jobs = [GenerationJob("small", "echo-s", (ChatMessage("user", f"q{i}"),), PARAMS) for i in range(2)]
    cache = GenerationCache(tmp_path)
    assert calibrate_costs(jobs, settings, cache, repeats=2, progress=False) == 4
    assert calibrate_costs(jobs, settings, cache, repeats=2, progress=False) == 0
    assert calibrate_costs(jobs, settings, cache, repeats=3, progress=False) == 2
    fastest = cache.fastest_timings(None)
    assert sorted(row[4] for row in fastest) == [3, 3]
    assert all(row[0] == "small" and row[3] >= 0.01 for row in fastest)
    assert len(cache) == 0  # timings never stand in for answers
    cache.close()


def test_shared_cpu_run_times_the_tiers_alone_then_together(tmp_path) -> None:
    from echolm.evaluation.evaluate import shared_cpu
    from echolm.evaluation.generation_cache import measure_shared_cpu

    # Echo tiers wait on the event loop, so running together costs nothing: the fitted slowdown is 1.
    settings = Settings(tiers=[TierSettings(name="small", backend="echo", model="echo-s", relative_cost=1.0,
                                            simulated_latency_s=0.1),
                               TierSettings(name="large", backend="echo", model="echo-l", relative_cost=3.0,
                                            simulated_latency_s=0.2)])
    jobs = [GenerationJob(tier, f"echo-{tier[0]}", (ChatMessage("user", f"q{i}"),), PARAMS)
            for tier in ("small", "large") for i in range(4)]
    cache = GenerationCache(tmp_path)
    assert shared_cpu(cache, settings) is None
    assert measure_shared_cpu(jobs[:4], settings, cache) is None  # one tier: nothing to overlap
    alone, together = measure_shared_cpu(jobs, settings, cache, per_tier=3)
    assert alone["small"] >= 3 * 0.1 and alone["large"] >= 3 * 0.2
    assert together < alone["large"] + 0.5 * alone["small"]  # the small tier's waits overlap the large one's
    measured = shared_cpu(cache, settings)
    assert len(measured["runs"]) == 1 and measured["runs"][0]["together_s"] == together
    assert 1.0 <= measured["slowdown"] < 1.3
    assert len(cache) == 0  # timings never stand in for answers
    cache.close()
