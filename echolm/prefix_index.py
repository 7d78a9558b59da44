"""Kept token sequences looked up by longest shared prefix, least recently used dropped beyond a byte budget.

One index serves both the llama.cpp tiers' prefix cache (``echolm.generation.llamacpp_prefix``, values are
serialized KV states) and the evaluation's replay of it (``echolm.evaluation.prefix_reuse``, values are
nothing, sizes are estimated). The replay must credit exactly what the tiers reuse, so both share this one
implementation of "which kept sequence wins, and which are dropped".
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

V = TypeVar("V")


def common_prefix_length(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """Length of the longest common prefix of two token sequences (what a prefix cache can reuse)."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


@dataclass(frozen=True, slots=True)
class KeptPrefix(Generic[V]):
    tokens: np.ndarray
    value: V
    size: int  # bytes counted against the budget


class PrefixIndex(Generic[V]):
    """Token sequences with a value each; ``longest`` finds the one sharing most with a new sequence.

    Ties go to the earliest kept (least recently used) entry, as a scan in LRU order finds it first; the
    entry found becomes the most recently used. A sequence kept again replaces its earlier value. An
    entry larger than the whole budget is not kept.
    """

    def __init__(self, capacity_bytes: int) -> None:
        self._capacity = capacity_bytes
        self._kept: OrderedDict[tuple[int, ...], KeptPrefix[V]] = OrderedDict()
        self._used = 0

    @property
    def bytes_used(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._kept)

    def longest(self, tokens: Sequence[int] | np.ndarray, at_least: int = 0) -> tuple[int, KeptPrefix[V] | None]:
        """The kept entry sharing the longest prefix with ``tokens``, if it shares more than ``at_least``
        tokens (else ``(at_least, None)``), marked most recently used."""
        wanted = np.asarray(tokens)
        best_key, best = None, at_least
        for key, kept in self._kept.items():
            length = common_prefix_length(kept.tokens, wanted)
            if length > best:
                best_key, best = key, length
        if best_key is None:
            return at_least, None
        self._kept.move_to_end(best_key)
        return best, self._kept[best_key]

    def fits(self, size: int) -> bool:
        return size <= self._capacity

    def keep(self, tokens: Sequence[int] | np.ndarray, value: V, size: int) -> None:
        """Keep ``tokens`` with ``value`` (``size`` bytes), dropping least recently used entries to fit."""
        if not self.fits(size):
            return
        array = np.array(tokens, copy=True)
        key = tuple(array.tolist())
        if key in self._kept:
            self._used -= self._kept.pop(key).size
        self._kept[key] = KeptPrefix(array, value, size)
        self._used += size
        while self._used > self._capacity:
            _, dropped = self._kept.popitem(last=False)
            self._used -= dropped.size
