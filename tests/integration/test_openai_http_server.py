"""OpenAIChatGenerator against a real OpenAI-compatible server: llama-cpp-python's, serving SmolLM2-135M."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from echolm.domain import ChatMessage, EchoLMError, ErrorCode, GenerationParams
from echolm.generation.openai_http import OpenAIChatGenerator, RetryPolicy
from echolm.settings import Settings, TierSettings
from tests.integration.openai_server import free_port, running_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "smollm2-135m-instruct"
SERVED_NAME = "smollm2"
N_CTX = 1024
STARTUP_TIMEOUT_S = 90.0
QUESTION = [ChatMessage("user", "What is the capital of France? Answer in one short sentence.")]
# Request ids as the pipeline makes them: not UUIDs, which llama-cpp-python's server would refuse raw.
PIPELINE_ID = "req-3f9a0c1d2e4b5a6978"

_SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context")


@pytest.fixture(scope="module")
def server_url(tmp_path_factory) -> Iterator[str]:
    missing = [name for name in _SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"llama.cpp's OpenAI server needs {', '.join(missing)}: pip install -e '.[server]'")
    from echolm.assets import AssetError, resolve_model

    try:
        model_path = resolve_model(MODEL, Settings().model_cache_dir)
    except (AssetError, OSError) as exc:
        pytest.skip(f"model {MODEL} is not available here: {exc}")

    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--model_alias", SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(N_CTX),
        "--n_threads", str(max(1, min(2, os.cpu_count() or 1))),
    ]
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    with running_server("llama.cpp server", command, port, log_path, STARTUP_TIMEOUT_S) as url:
        yield url


def openai_tier(url: str, **overrides: object) -> TierSettings:
    fields: dict[str, object] = dict(name="tiny", backend="openai", model=SERVED_NAME, relative_cost=1.0,
                                     base_url=url, timeout_s=60.0, concurrency=2, max_tokens=32)
    fields.update(overrides)
    return TierSettings(**fields)


@pytest.fixture
async def generator(server_url: str) -> AsyncIterator[OpenAIChatGenerator]:
    gen = OpenAIChatGenerator(openai_tier(server_url), api_key=None)
    yield gen
    await gen.aclose()


async def test_answers_a_real_question_with_usage_counts(generator: OpenAIChatGenerator) -> None:
    result = await generator.generate(QUESTION, GenerationParams(max_tokens=32), request_id=PIPELINE_ID)

    assert "paris" in result.text.lower()
    assert result.model == SERVED_NAME
    assert result.prompt_tokens > 5
    assert 0 < result.completion_tokens <= 32
    assert result.finish_reason in {"stop", "length"}


async def test_concurrent_calls_all_answer(generator: OpenAIChatGenerator) -> None:
    questions = ["Name a primary colour.", "What is 3 + 4?", "Say hello in French.", "Name a fruit."]
    results = await asyncio.gather(*(
        generator.generate([ChatMessage("user", q)], GenerationParams(max_tokens=8), request_id=f"req-c{i}")
        for i, q in enumerate(questions)))
    assert all(r.completion_tokens > 0 and r.text.strip() for r in results)


async def test_a_prompt_beyond_the_context_window_is_prompt_too_long(generator: OpenAIChatGenerator) -> None:
    huge = [ChatMessage("user", "word " * (N_CTX * 2))]
    with pytest.raises(EchoLMError) as caught:
        await generator.generate(huge, GenerationParams(max_tokens=8), request_id="req-huge")
    assert caught.value.code is ErrorCode.PROMPT_TOO_LONG
    assert str(N_CTX) in caught.value.message


async def test_an_unknown_route_is_a_generation_failure_with_the_server_message(server_url: str) -> None:
    generator = OpenAIChatGenerator(openai_tier(server_url.removesuffix("/v1") + "/v9"), api_key=None)
    with pytest.raises(EchoLMError) as caught:
        await generator.generate(QUESTION, GenerationParams(max_tokens=4), request_id="req-404")
    await generator.aclose()
    assert caught.value.code is ErrorCode.GENERATION_FAILED
    assert "HTTP 404" in caught.value.message


async def test_a_call_slower_than_the_tier_timeout_ends_with_generation_timeout(server_url: str) -> None:
    # 120 tokens take the server well over a second on CPU; the tier allows 0.3 s.
    generator = OpenAIChatGenerator(openai_tier(server_url, timeout_s=0.3), api_key=None)
    started = time.monotonic()
    with pytest.raises(EchoLMError) as caught:
        await generator.generate([ChatMessage("user", "Write a long story about a dragon.")],
                                 GenerationParams(max_tokens=120), request_id="req-slow")
    elapsed = time.monotonic() - started
    await generator.aclose()
    assert caught.value.code is ErrorCode.GENERATION_TIMEOUT
    assert elapsed < 2.0


async def test_a_server_that_is_down_fails_after_bounded_retries() -> None:
    tier = openai_tier(f"http://127.0.0.1:{free_port()}/v1", timeout_s=10.0)
    generator = OpenAIChatGenerator(tier, api_key=None, retry=RetryPolicy(max_attempts=3, base_delay_s=0.05))
    started = time.monotonic()
    with pytest.raises(EchoLMError) as caught:
        await generator.generate(QUESTION, GenerationParams(max_tokens=4), request_id="req-down")
    await generator.aclose()
    assert caught.value.code is ErrorCode.GENERATION_FAILED
    assert "gave up after 3 attempts" in caught.value.message and "cannot reach" in caught.value.message
    assert time.monotonic() - started < 5.0
