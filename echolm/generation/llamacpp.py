"""In-process generation with llama.cpp (``llama-cpp-python``) for one model tier.

A ``Llama`` object is not thread-safe, so each generator runs on one worker thread and serialises calls
with an ``asyncio.Lock``. Tiers whose threads together exceed the CPU cores share one thread
(``shared_compute_thread``, chosen by ``echolm.generation.factory``): llama.cpp's OpenMP runtime (libgomp)
counts the helper threads of every thread that runs a model, and once they outnumber the cores it
all but stops spin-waiting between operations, so with two tiers on their own threads even a tier
generating alone decodes about 25% slower (measured on 2 cores: Qwen2.5-Coder 1.5B 69 -> 87 ms per
token, 0.5B 42 -> 54 ms, with the other model merely loaded). On one thread the tiers generate one at a
time at full speed, which on such a machine serves as much as letting them overlap slowly. The wait
for the shared thread counts toward a request's ``timeout_s``, like the wait for the tier's lock.

Timeouts are real: while the prompt is read, a deadline is checked inside llama.cpp itself (its abort
callback runs between graph nodes, so even a long prompt evaluation stops); while tokens are decoded,
it is checked once per token; an outer ``asyncio.wait_for`` backs both up. The abort callback is
disarmed for decoding because llama.cpp calls it after every graph node, hundreds of times per token,
and each call from C into Python takes the GIL while the model's other threads wait at a barrier.
When the outer timeout fires first the worker thread may still be running; the lock is released only
once it has finished, so the next call never shares the model.

Prompts that start like an earlier one reuse its KV state (``TierSettings.prefix_cache_mb``; see
``echolm.generation.llamacpp_prefix``); with 0, every prompt is prefilled in full. With
``TierSettings.lookup_draft_tokens`` the tier decodes with drafts copied from its context
(``echolm.generation.llamacpp_lookup``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import llama_chat_format

from echolm.domain import ChatMessage, EchoLMError, ErrorCode, GenerationParams, GenerationResult
from echolm.generation.llamacpp_lookup import LookupLlama, LookupStats
from echolm.generation.llamacpp_prefix import KvStateCache, PrefixStats
from echolm.settings import TierSettings

log = logging.getLogger(__name__)

# The outer timeout fires this long after the inner deadline: the inner check normally wins and
# leaves the model in a known state.
_OUTER_GRACE_S = 1.0
_CONTEXT_OVERFLOW = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")
# A NULL ggml_abort_callback: llama.cpp skips the check altogether.
_NO_ABORT_CALLBACK = llama_cpp.ggml_abort_callback()


_shared_executor: concurrent.futures.ThreadPoolExecutor | None = None
_shared_executor_lock = threading.Lock()


def shared_compute_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The process's one thread for llama.cpp tiers that share it (module docstring)."""
    global _shared_executor
    with _shared_executor_lock:
        if _shared_executor is None:
            _shared_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-shared")
        return _shared_executor


class _DeadlineExceeded(Exception):
    """Raised inside the worker thread when a generation passes its deadline."""


class LlamaCppGenerator:
    """A ``Generator`` running a GGUF model in-process with llama.cpp."""

    def __init__(self, tier: TierSettings, model_path: Path,
                 executor: concurrent.futures.ThreadPoolExecutor | None = None) -> None:
        """``executor``: a single-thread executor shared with other tiers (module docstring); by default
        the generator starts its own."""
        self._tier = tier
        self._model_path = Path(model_path)
        self._n_threads = tier.n_threads or max(1, os.cpu_count() or 1)
        self._llm: llama_cpp.Llama | None = None
        self._formatter: llama_chat_format.Jinja2ChatFormatter | None = None
        self._lock = asyncio.Lock()
        self._owns_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"llama-{tier.name}")
        # Read by llama.cpp's abort callback (another thread, but the GIL makes a float read atomic).
        self._deadline: float | None = None
        self._abort_callback = llama_cpp.ggml_abort_callback(self._should_abort)
        self._closed = False
        self._load_lock = threading.Lock()  # count_prompt_tokens may load from the event-loop thread
        self._prefix = KvStateCache(tier.prefix_cache_mb << 20) if tier.prefix_cache_mb > 0 else None

    @property
    def model_name(self) -> str:
        return self._tier.model

    @property
    def tier(self) -> TierSettings:
        return self._tier

    async def start(self) -> None:
        """Load the model now (it is otherwise loaded by the first ``generate``)."""
        async with self._lock:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    async def generate(
        self, messages: Sequence[ChatMessage], params: GenerationParams, *, request_id: str
    ) -> GenerationResult:
        """One chat completion; raises ``EchoLMError`` and never runs past the tier's ``timeout_s``."""
        if self._closed:
            raise EchoLMError(ErrorCode.GENERATION_FAILED, f"generator for tier {self._tier.name} is closed")
        loop = asyncio.get_running_loop()
        timeout_s = self._tier.timeout_s
        started = time.monotonic()
        deadline = started + timeout_s
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can time out after the lock was granted.
            async with asyncio.timeout(timeout_s):
                await self._lock.acquire()
        except TimeoutError:
            raise self._timeout_error(request_id, "waiting for the model") from None
        try:
            future = loop.run_in_executor(self._executor, self._complete, list(messages), params, deadline)
        except BaseException:
            self._lock.release()
            raise
        # The lock follows the thread, not this coroutine: see the module docstring.
        future.add_done_callback(lambda _: self._lock.release())
        remaining = deadline - time.monotonic() + _OUTER_GRACE_S
        try:
            completion = await asyncio.wait_for(asyncio.shield(future), timeout=max(remaining, 0.0))
        except TimeoutError:
            raise self._timeout_error(request_id, "generating") from None
        except _DeadlineExceeded:
            raise self._timeout_error(request_id, "generating") from None
        except EchoLMError:
            raise
        except Exception as exc:  # noqa: BLE001 - any backend failure ends this request, not the worker
            raise self._map_error(exc, request_id) from exc
        return self._result(*completion, time.monotonic() - started)

    def count_prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Tokens the chat template makes of ``messages`` (loads the model if needed; tokenizer only)."""
        llm = self._load()
        if self._formatter is None:
            return len(llm.tokenize("\n".join(m.content for m in messages).encode("utf-8"), add_bos=True))
        return len(self._prompt_token_ids(llm, messages))

    @property
    def lookup_stats(self) -> LookupStats | None:
        """Decode passes and draft tokens offered so far (None unless ``lookup_draft_tokens`` is set and
        the model is loaded)."""
        return self._llm.lookup.stats if isinstance(self._llm, LookupLlama) else None

    @property
    def prefix_stats(self) -> PrefixStats | None:
        """Prompt tokens reused from kept KV states so far (None when ``prefix_cache_mb`` is 0)."""
        return self._prefix.stats if self._prefix is not None else None

    async def aclose(self) -> None:
        """Wait (bounded by the tier timeout) for a running call, then free the model and the thread."""
        if self._closed:
            return
        self._closed = True
        self._deadline = time.monotonic()  # ask a running generation to stop now
        try:
            async with asyncio.timeout(self._tier.timeout_s + _OUTER_GRACE_S):
                await self._lock.acquire()
        except TimeoutError:
            log.warning("tier %s: a generation did not stop; closing anyway", self._tier.name)
        else:
            self._lock.release()
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()
        if self._owns_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -----------------------------------------------------------------------------------------
    # Worker thread

    def _load(self) -> llama_cpp.Llama:
        with self._load_lock:
            if self._llm is None:
                self._llm = self._load_model()
            return self._llm

    def _load_model(self) -> llama_cpp.Llama:
        started = time.monotonic()
        options: dict[str, Any] = {
            "model_path": str(self._model_path), "n_ctx": self._tier.n_ctx, "n_threads": self._n_threads,
            "n_threads_batch": self._n_threads, "verbose": False,
        }
        drafting = self._tier.lookup_draft_tokens
        llm = LookupLlama(**options, n_draft=drafting) if drafting else llama_cpp.Llama(**options)
        self._formatter = _chat_formatter(llm)
        log.info(
            "tier %s: loaded %s (n_ctx=%d, %d threads%s) in %.1f s",
            self._tier.name, self._model_path.name, self._tier.n_ctx, self._n_threads,
            f", prompt lookup drafts of {drafting}" if drafting else "", time.monotonic() - started,
        )
        return llm

    def _prompt_token_ids(self, llm: llama_cpp.Llama, messages: Sequence[ChatMessage]) -> list[int]:
        assert self._formatter is not None
        return _chat_prompt_tokens(llm, self._formatter, messages)

    def _should_abort(self, _data: Any) -> bool:
        deadline = self._deadline
        return deadline is not None and time.monotonic() > deadline

    def _arm_abort_callback(self, llm: llama_cpp.Llama, armed: bool) -> None:
        callback = self._abort_callback if armed else _NO_ABORT_CALLBACK
        llama_cpp.llama_set_abort_callback(llm._ctx.ctx, callback, None)  # noqa: SLF001

    def _complete(self, messages: list[ChatMessage], params: GenerationParams,
                  deadline: float) -> tuple[dict[str, Any], int, tuple[float, float]]:
        """The completion, how many prompt tokens came from a kept KV state, and the seconds spent
        before the first generated token (restoring a state, prefill) and after it."""
        llm = self._load()
        if time.monotonic() > deadline:
            raise _DeadlineExceeded
        self._deadline = deadline
        self._arm_abort_callback(llm, True)
        started = time.monotonic()
        first_token_at: list[float] = []

        def stop_at_deadline(input_ids: Any, scores: Any) -> Any:
            # Called once per sampled token, so its first call marks the end of prompt evaluation: from
            # here on this per-token check replaces the per-node abort callback (module docstring).
            now = time.monotonic()
            if not first_token_at:
                first_token_at.append(now)
                self._arm_abort_callback(llm, False)
            if now > deadline:
                raise _DeadlineExceeded
            if self._closed:
                raise EchoLMError(ErrorCode.GENERATION_FAILED, f"generator for tier {self._tier.name} was closed")
            return scores

        try:
            reused = 0
            if self._prefix is None:
                llm.reset()  # no reuse: every prompt is prefilled in full
            elif self._formatter is not None:
                reused = self._prefix.prepare(llm, self._prompt_token_ids(llm, messages))
            completion = llm.create_chat_completion(
                messages=_as_dicts(messages),
                max_tokens=params.max_tokens or self._tier.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                stop=list(params.stop),
                seed=params.seed,
                logits_processor=llama_cpp.LogitsProcessorList([stop_at_deadline]),
            )
            if self._prefix is not None and self._formatter is not None:
                self._prefix.save(llm)
            finished = time.monotonic()
            prefilled = (first_token_at or [finished])[0]
            return completion, reused, (prefilled - started, finished - prefilled)
        except Exception:
            # An aborted decode can leave half-written cache cells behind; start clean next time.
            _forget_cached_prompt(llm)
            if time.monotonic() > deadline:
                raise _DeadlineExceeded from None
            raise
        finally:
            self._deadline = None

    # -----------------------------------------------------------------------------------------
    # Results and errors

    def _result(self, completion: dict[str, Any], reused: int, split: tuple[float, float],
                latency_s: float) -> GenerationResult:
        choice = completion["choices"][0]
        usage = completion.get("usage") or {}
        return GenerationResult(
            text=choice["message"].get("content") or "",
            model=self.model_name,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            finish_reason=choice.get("finish_reason") or "stop",
            latency_s=latency_s,
            cached_prompt_tokens=reused,
            prefill_s=split[0],
            decode_s=split[1],
        )

    def _timeout_error(self, request_id: str, phase: str) -> EchoLMError:
        return EchoLMError(
            ErrorCode.GENERATION_TIMEOUT,
            f"request {request_id}: tier {self._tier.name} ({self.model_name}) exceeded its "
            f"{self._tier.timeout_s:g} s limit while {phase}",
        )

    def _map_error(self, exc: Exception, request_id: str) -> EchoLMError:
        overflow = _CONTEXT_OVERFLOW.search(str(exc))
        if overflow:
            prompt_tokens, n_ctx = overflow.groups()
            return EchoLMError(
                ErrorCode.PROMPT_TOO_LONG,
                f"request {request_id}: the prompt has {prompt_tokens} tokens, tier {self._tier.name} "
                f"({self.model_name}) has a context window of {n_ctx} tokens",
            )
        return EchoLMError(
            ErrorCode.GENERATION_FAILED,
            f"request {request_id}: tier {self._tier.name} ({self.model_name}) failed: {type(exc).__name__}: {exc}",
        )


class LlamaCppPromptTokenizer:
    """A GGUF's tokenizer and chat template without its weights (``vocab_only``): the prompt tokens a
    ``LlamaCppGenerator`` of the same model would prefill, and the model's metadata."""

    def __init__(self, model_path: Path) -> None:
        self._llm = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
        self._formatter = _chat_formatter(self._llm)
        if self._formatter is None:
            raise ValueError(f"{model_path.name} has no chat template")

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._llm.metadata)

    def prompt_tokens(self, messages: Sequence[ChatMessage]) -> list[int]:
        assert self._formatter is not None
        return _chat_prompt_tokens(self._llm, self._formatter, messages)

    def close(self) -> None:
        self._llm.close()


def _chat_formatter(llm: llama_cpp.Llama) -> llama_chat_format.Jinja2ChatFormatter | None:
    """The GGUF's own chat template, as llama-cpp-python's default chat handler builds it."""
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    return llama_chat_format.Jinja2ChatFormatter(
        template=template, eos_token=_token_text(llm, llm.token_eos()), bos_token=_token_text(llm, llm.token_bos()))


def _chat_prompt_tokens(llm: llama_cpp.Llama, formatter: llama_chat_format.Jinja2ChatFormatter,
                        messages: Sequence[ChatMessage]) -> list[int]:
    """The tokens llama-cpp-python's chat handler makes of ``messages`` (same template, same call)."""
    prompt = formatter(messages=_as_dicts(messages)).prompt
    return llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)


def _as_dicts(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def _token_text(llm: llama_cpp.Llama, token_id: int) -> str:
    return llm._model.token_get_text(token_id) if token_id != -1 else ""  # noqa: SLF001


def _forget_cached_prompt(llm: llama_cpp.Llama) -> None:
    memory = llama_cpp.llama_get_memory(llm._ctx.ctx)  # noqa: SLF001
    if memory is not None:
        llama_cpp.llama_memory_clear(memory, True)
    llm.reset()

