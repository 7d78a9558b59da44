"""VllmEngineGenerator end to end on a real GPU with a tiny model (skipped without CUDA or vLLM).

The model defaults to SmolLM2-135M-Instruct's checkpoint; on a machine without a model hub, point
ECHOLM_TEST_VLLM_MODEL at a local copy of any small instruct model.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import time

import pytest
import pytest_asyncio

from echolm.domain import ChatMessage, EchoLMError, ErrorCode, GenerationParams
from echolm.settings import TierSettings

# One engine (one model load) for the module, so one event loop for the module too: the engine's
# output handler task lives in the loop that built it.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.gpu, pytest.mark.asyncio(loop_scope="module")]


def _gpu_skip_reason() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install 'echolm[gpu]' on a CUDA machine)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU: torch.cuda.is_available() is False"
    return None


_SKIP = _gpu_skip_reason()
if _SKIP:
    pytest.skip(_SKIP, allow_module_level=True)

from echolm.generation.vllm_engine import VllmEngineGenerator  # noqa: E402  (after the skip: imports vLLM)

MODEL = os.environ.get("ECHOLM_TEST_VLLM_MODEL", "smollm2-135m-instruct")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def generator():
    tier = TierSettings(name="tiny", backend="vllm", model=MODEL, relative_cost=1.0, concurrency=32,
                        n_ctx=1024, max_tokens=32, timeout_s=120.0)
    gen = VllmEngineGenerator(tier, engine_options={"gpu_memory_utilization": 0.3, "enforce_eager": True})
    await gen.start()
    yield gen
    await gen.aclose()


async def test_many_concurrent_requests_are_answered_by_continuous_batching(generator: VllmEngineGenerator):
    questions = [f"What is {i} + {i}? Answer with a number." for i in range(32)]
    started = time.monotonic()
    results = await asyncio.gather(*(
        generator.generate([ChatMessage("user", q)], GenerationParams(max_tokens=16), request_id=f"req-{i}")
        for i, q in enumerate(questions)))
    elapsed = time.monotonic() - started
    completion_tokens = sum(r.completion_tokens for r in results)
    print(f"\nvLLM {MODEL}: 32 concurrent requests in {elapsed:.2f} s, "
          f"{completion_tokens / elapsed:.0f} completion tokens/s")
    assert all(r.text.strip() and 0 < r.completion_tokens <= 16 and r.prompt_tokens > 5 for r in results)
    assert all(r.finish_reason in {"stop", "length"} for r in results)


async def test_a_prompt_beyond_the_context_window_is_refused(generator: VllmEngineGenerator):
    with pytest.raises(EchoLMError) as caught:
        await generator.generate([ChatMessage("user", "word " * 2000)], GenerationParams(), request_id="req-long")
    assert caught.value.code is ErrorCode.PROMPT_TOO_LONG
