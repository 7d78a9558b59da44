"""The vllm backend on the real vLLM engine: ``VllmEngineGenerator`` alone and as a pipeline tier.

Runs wherever vLLM imports: on a CUDA GPU (``echolm[gpu]``) or on vLLM's CPU build, the same
``AsyncLLM`` engine (``make test-vllm``, which CI runs). The model is SmolLM2-135M-Instruct exported
from EchoLM's own GGUF file (``echolm models export-hf``), so no model hub is needed; point
ECHOLM_TEST_VLLM_MODEL at another checkpoint to try that instead.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
import pytest_asyncio

from echolm.domain import ChatMessage, EchoLMError, ErrorCode, GenerationParams
from echolm.settings import Settings, TierSettings
from streams.local import run_local_batch
from tests.integration.test_pipeline import (  # noqa: F401  (broker: the module's embedded broker)
    PARAPHRASES,
    QUESTIONS,
    batch_line,
    broker,
    make_settings,
    read_output,
    write_lines,
)
from tests.integration.vllm_support import CPU_KV_CACHE_BYTES, on_gpu, skip_without_vllm

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.vllm]

skip_without_vllm()

from echolm.generation.hf_checkpoint import export_hf_checkpoint  # noqa: E402
from echolm.generation.vllm_engine import VllmEngineGenerator  # noqa: E402  (after the skip: imports vLLM)

REGISTRY_MODEL = "smollm2-135m-instruct"


ENGINE_OPTIONS = ({"gpu_memory_utilization": 0.3, "enforce_eager": True} if on_gpu()
                  else {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES, "enforce_eager": True})


@pytest.fixture(scope="module")
def model() -> str:
    """The tier's model: the registry name (its export is made once and found by the generator)."""
    if os.environ.get("ECHOLM_TEST_VLLM_MODEL"):
        return os.environ["ECHOLM_TEST_VLLM_MODEL"]
    export_hf_checkpoint(REGISTRY_MODEL, Settings().model_cache_dir)
    return REGISTRY_MODEL


def tier(model: str, **overrides) -> TierSettings:
    values = dict(name="tiny", backend="vllm", model=model, relative_cost=1.0, concurrency=16,
                  n_ctx=1024, max_tokens=32, timeout_s=120.0, engine_options=ENGINE_OPTIONS)
    values.update(overrides)
    return TierSettings(**values)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def generator(model: str):
    gen = VllmEngineGenerator(tier(model), cache_dir=Settings().model_cache_dir)
    started = time.monotonic()
    await gen.start()
    print(f"\nvLLM engine for {model} started in {time.monotonic() - started:.1f} s")
    yield gen
    await gen.aclose()


# One engine (one model load) for these tests, so one event loop for them too: the engine's output
# handler task lives in the loop that built it.
in_the_engine_s_loop = pytest.mark.asyncio(loop_scope="module")


@in_the_engine_s_loop
async def test_the_export_is_what_the_engine_loads(model: str, generator: VllmEngineGenerator):
    if model != REGISTRY_MODEL:
        pytest.skip("ECHOLM_TEST_VLLM_MODEL names another checkpoint")
    loaded = Path(generator._engine_kwargs["model"])
    assert loaded == export_hf_checkpoint(REGISTRY_MODEL, Settings().model_cache_dir)
    assert (loaded / "model.safetensors").is_file() and (loaded / "tokenizer.json").is_file()
    assert generator.model_name == REGISTRY_MODEL  # responses name the tier's model, not the path


@in_the_engine_s_loop
async def test_many_concurrent_requests_are_answered_by_continuous_batching(generator: VllmEngineGenerator):
    questions = [f"What is {i} + {i}? Answer with a number." for i in range(16)]
    started = time.monotonic()
    results = await asyncio.gather(*(
        generator.generate([ChatMessage("user", q)], GenerationParams(max_tokens=16), request_id=f"req-{i}")
        for i, q in enumerate(questions)))
    elapsed = time.monotonic() - started
    completion_tokens = sum(r.completion_tokens for r in results)
    print(f"\nvLLM: 16 concurrent requests in {elapsed:.2f} s, {completion_tokens / elapsed:.0f} completion tokens/s")
    assert all(r.text.strip() and 0 < r.completion_tokens <= 16 and r.prompt_tokens > 5 for r in results)
    assert all(r.finish_reason in {"stop", "length"} for r in results)
    # Run side by side, not one after another: served in turn, the first answer would come after about
    # 1/16 of the whole time; in one continuous batch even the shortest answer takes a good share of it.
    assert min(r.latency_s for r in results) > elapsed / 4


@in_the_engine_s_loop
async def test_greedy_answers_are_deterministic_and_honour_stop(generator: VllmEngineGenerator):
    messages = [ChatMessage("user", "What is the capital of France? Answer in one sentence.")]
    params = GenerationParams(max_tokens=24, temperature=0.0)
    first, second = await asyncio.gather(generator.generate(messages, params, request_id="greedy-1"),
                                         generator.generate(messages, params, request_id="greedy-2"))
    assert first.text == second.text and "Paris" in first.text
    stopped = await generator.generate(messages, GenerationParams(max_tokens=24, temperature=0.0, stop=("Paris",)),
                                       request_id="greedy-stop")
    assert "Paris" not in stopped.text and stopped.finish_reason == "stop"


@in_the_engine_s_loop
async def test_the_same_request_id_twice_in_flight_is_answered_twice(generator: VllmEngineGenerator):
    # At-least-once redelivery can put a request in flight again before its first run finishes.
    messages = [ChatMessage("user", "Name a colour.")]
    results = await asyncio.gather(*(generator.generate(messages, GenerationParams(max_tokens=8), request_id="dup")
                                     for _ in range(2)))
    assert all(r.text.strip() for r in results)


@in_the_engine_s_loop
async def test_a_prompt_beyond_the_context_window_is_refused(generator: VllmEngineGenerator):
    with pytest.raises(EchoLMError) as caught:
        await generator.generate([ChatMessage("user", "word " * 2000)], GenerationParams(), request_id="req-long")
    assert caught.value.code is ErrorCode.PROMPT_TOO_LONG


@in_the_engine_s_loop
async def test_a_generation_past_the_tier_timeout_is_aborted_and_the_engine_keeps_serving(
        generator: VllmEngineGenerator, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(generator, "_tier", generator._tier.model_copy(update={"timeout_s": 0.2}))
    with pytest.raises(EchoLMError) as caught:
        await generator.generate([ChatMessage("user", "Write a long story about a dragon.")],
                                 GenerationParams(max_tokens=1000), request_id="req-slow")
    assert caught.value.code is ErrorCode.GENERATION_TIMEOUT
    monkeypatch.undo()
    assert "req-slow" not in generator._in_flight
    after = await generator.generate([ChatMessage("user", "Say hello.")], GenerationParams(max_tokens=8),
                                     request_id="req-after")
    assert after.text.strip()


def test_the_small_tier_on_vllm_answers_through_the_pipeline_with_examples(tmp_path, broker, model: str):
    """The generate stage of a worker process runs the small tier on vLLM (the large tier echoes)."""
    tiers = [tier(model, name="small", concurrency=8, max_tokens=24, use_examples=True),
             TierSettings(name="large", backend="echo", model="echo-large", relative_cost=3.0, use_examples=False)]
    settings = make_settings(tmp_path, broker.bootstrap, tiers=tiers)
    warm = write_lines(tmp_path / "warm.jsonl", [batch_line(f"w{i}", q) for i, q in enumerate(QUESTIONS)])
    run_local_batch(settings.model_copy(update={"router_policy": "always-large"}), warm,
                    tmp_path / "warm.out.jsonl", workers=1, progress=False, stall_timeout_s=300)
    lines = [batch_line(f"p{i}", q) for i, q in enumerate(PARAPHRASES)]
    lines.append(batch_line("huge", "word " * 3000))  # past the tier's 1,024-token context
    out = tmp_path / "ask.out.jsonl"
    # always-small: the huge request, like nothing cached, would go to the large tier otherwise
    summary = run_local_batch(settings.model_copy(update={"router_policy": "always-small"}),
                              write_lines(tmp_path / "ask.jsonl", lines), out, workers=1, progress=False,
                              stall_timeout_s=300)
    assert summary.answered == 3 and summary.error_codes == {"prompt_too_long": 1}
    records = {r["custom_id"]: r for r in read_output(out)}
    for i in range(3):
        body = records[f"p{i}"]["response"]["body"]
        assert body["model"] == model and body["echolm"]["tier"] == "small"
        assert body["echolm"]["examples"], "the cached large-tier answer must have been prepended"
        assert body["choices"][0]["message"]["content"].strip()
        assert 0 < body["usage"]["completion_tokens"] <= 24
        assert body["usage"]["prompt_tokens"] > 40  # question + example, templated by vLLM's tokenizer
    assert records["huge"]["error"]["code"] == "prompt_too_long"
