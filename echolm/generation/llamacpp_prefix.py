"""Prefix reuse for the llama.cpp tiers: earlier prompts' KV states, restored when a new prompt starts alike.

EchoLM's prompts put what requests share first (system prompt, hint guidance, then the examples, most
similar first: ``echolm.prompting``). Requests that retrieve the same examples, a popular problem asked
again with other numbers, share most of their prompt; with the examples' KV state kept, the small tier
prefills only the request itself, which is what makes examples affordable on a CPU.

llama.cpp by itself reuses only the prompt still in its context (the previous request). ``KvStateCache``
keeps the serialized state of each finished generation (``llama_state_get_data``: the used KV cells and
the last logits row), least recently used dropped beyond a byte budget, and before a generation restores
the kept state that shares the longest prefix with the new prompt, when that beats the live context;
llama-cpp-python's ``generate`` then truncates the KV cache to the shared prefix and prefills the rest.

Why not llama-cpp-python's ``LlamaRAMCache``: each of its states also carries a copy of the score matrix
(up to ``n_batch`` x vocabulary float32 rows, 311 MB for Qwen2.5 at the default n_batch), which its byte
budget does not count, and restoring one rewrites that matrix.

Runs only on the generator's worker thread (a ``Llama`` is not thread-safe); touches two attributes of
the pinned llama-cpp-python's ``Llama`` that are not public API (``_ctx``, ``_requires_eval``).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import llama_cpp

from echolm.prefix_index import KeptPrefix, PrefixIndex, common_prefix_length

log = logging.getLogger(__name__)


@dataclass
class PrefixStats:
    """Counters since the generator started (prefill tokens reused vs evaluated)."""

    prompts: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    restores: int = 0


class KvStateCache:
    """Kept KV states of one llama.cpp context (see the module docstring), keyed by the context's tokens
    (prompt and answer) when saved."""

    def __init__(self, capacity_bytes: int) -> None:
        self._states: PrefixIndex[bytes] = PrefixIndex(capacity_bytes)
        self.stats = PrefixStats()

    @property
    def bytes_used(self) -> int:
        return self._states.bytes_used

    def __len__(self) -> int:
        return len(self._states)

    def prepare(self, llm: llama_cpp.Llama, prompt: Sequence[int]) -> int:
        """Before a generation of ``prompt``: restore the best kept state if it shares more than the live
        context. Returns the prompt tokens that will not be prefilled (llama.cpp evaluates at least one)."""
        live = common_prefix_length(llm.input_ids[: llm.n_tokens], prompt)
        best, state = self._states.longest(prompt, at_least=live)
        if state is not None:
            self._restore(llm, state)
            self.stats.restores += 1
        reused = min(best, max(len(prompt) - 1, 0))
        self.stats.prompts += 1
        self.stats.prompt_tokens += len(prompt)
        self.stats.reused_tokens += reused
        return reused

    def save(self, llm: llama_cpp.Llama) -> None:
        """After a generation: keep the context's state, under its tokens."""
        n = llm.n_tokens
        if n == 0:
            return
        ctx = llm._ctx.ctx  # noqa: SLF001 - the pinned llama-cpp-python keeps the context here
        size = llama_cpp.llama_state_get_size(ctx)
        if not self._states.fits(size):
            return
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_get_data(ctx, buffer, size)
        self._states.keep(llm.input_ids[:n], ctypes.string_at(buffer, written), written)

    @staticmethod
    def _restore(llm: llama_cpp.Llama, state: KeptPrefix[bytes]) -> None:
        data = state.value
        buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        ctx = llm._ctx.ctx  # noqa: SLF001
        if llama_cpp.llama_state_set_data(ctx, buffer, len(data)) != len(data):
            raise RuntimeError("llama.cpp refused a kept KV state")
        n = len(state.tokens)
        llm.input_ids[:n] = state.tokens
        llm.n_tokens = n
        # The restored logits are not a live decode's: generate() must evaluate before sampling.
        llm._requires_eval = True  # noqa: SLF001
