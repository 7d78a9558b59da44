"""What a serving engine's prefix cache saves in prefill, replayed over a system's traffic.

The llama.cpp tiers keep the KV states of earlier prompts (``TierSettings.prefix_cache_mb``,
``echolm.generation.llamacpp_prefix.KvStateCache``): a new prompt that starts with the same tokens as a kept one loads
that state and prefills only the rest. EchoLM's prompts put everything shared first (system prompt, hint
guidance, then the examples, most similar first; ``echolm.prompting``), so requests that retrieve the
same examples (a popular problem asked again with other numbers) share most of their prompt.

``PrefixReuse`` replays that cache for one tier, request by request in arrival order: how many of a
prompt's tokens need no prefill, then the prompt is kept, least recently used states dropped once the
kept tokens pass the budget. As in llama.cpp, the last prompt token is always evaluated (its logits start
the decode). The evaluation's timings are measured with reuse off, so the cost model's prefill rate is
the full one, and the credit is applied here, on the tokens the cache would hold.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from echolm.prefix_index import PrefixIndex


@dataclass(frozen=True, slots=True)
class KvFootprint:
    """Bytes one kept state takes: per token (KV cache), plus a fixed part."""

    bytes_per_token: int
    bytes_fixed: int = 0

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, str], kv_bytes: int = 2) -> KvFootprint:
        """From a GGUF's metadata: layers x KV heads x head size x (K and V) x ``kv_bytes`` (f16 KV cache)
        per token. Measured on Qwen2.5-Coder 0.5B/1.5B, a ``llama_state_get_data`` state is that plus 12
        bytes per token and under 1 KB in all."""
        arch = metadata["general.architecture"]
        layers = int(metadata[f"{arch}.block_count"])
        heads = int(metadata[f"{arch}.attention.head_count"])
        kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv", heads))
        head_size = int(metadata.get(f"{arch}.attention.key_length", int(metadata[f"{arch}.embedding_length"]) // heads))
        return cls(layers * kv_heads * head_size * 2 * kv_bytes + 12, 1024)


class PrefixReuse:
    """One tier's prefix cache, replayed (see the module docstring)."""

    def __init__(self, capacity_bytes: int, footprint: KvFootprint) -> None:
        self._footprint = footprint
        self._kept: PrefixIndex[None] = PrefixIndex(capacity_bytes)

    def serve(self, prompt: Sequence[int], completion_tokens: int = 0) -> int:
        """Tokens of ``prompt`` that need no prefill; the prompt (and its answer) is then kept."""
        reused, _ = self._kept.longest(prompt)
        size = self._footprint.bytes_fixed + (len(prompt) + completion_tokens) * self._footprint.bytes_per_token
        self._kept.keep(prompt, None, size)
        return min(reused, max(len(prompt) - 1, 0))


PromptTokens = Callable[[Sequence[object]], list[int]]  # chat messages -> the tier's prompt tokens


@dataclass(frozen=True)
class TierPrefixCache:
    """One serving tier's prefix cache as configured: its budget, state size and tokenizer."""

    capacity_bytes: int
    footprint: KvFootprint
    tokens: PromptTokens


class PrefixCredit:
    """Replays the serving tiers' prefix caches over one system's traffic at a time.

    ``start()`` begins a system's pass with empty caches; ``reused(tier, key, messages, completion)``
    then serves one request, in arrival order, and says how many prompt tokens needed no prefill.
    Tiers without a cache (not llama.cpp, or ``prefix_cache_mb`` 0) reuse nothing. Prompt tokens are
    memoised by the generation job's key.
    """

    def __init__(self, tiers: Mapping[str, TierPrefixCache]) -> None:
        self._tiers = dict(tiers)
        self._tokens: dict[str, list[int]] = {}
        self._caches: dict[str, PrefixReuse] = {}

    @property
    def tiers(self) -> dict[str, TierPrefixCache]:
        return dict(self._tiers)

    def start(self) -> None:
        self._caches = {name: PrefixReuse(t.capacity_bytes, t.footprint) for name, t in self._tiers.items()}

    def reused(self, tier: str, key: str, messages: Sequence[object], completion_tokens: int) -> int:
        cache = self._caches.get(tier)
        if cache is None:
            return 0
        if key not in self._tokens:
            self._tokens[key] = self._tiers[tier].tokens(messages)
        return cache.serve(self._tokens[key], completion_tokens)
