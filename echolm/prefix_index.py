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
from itertools import islice
from typing import Generic, TypeVar

import numpy as np

V = TypeVar("V")


def common_prefix_length(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """Length of the longest common prefix of two token sequences (what a prefix cache can reuse)."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


def prefix_lengths(kept: Sequence[np.ndarray], wanted: np.ndarray) -> np.ndarray:
    """``common_prefix_length`` of each kept sequence with ``wanted``, in one pass over a padded matrix
    (the evaluation replays every system's traffic through the index: one numpy call per entry was most
    of a report's time at 160 requests)."""
    width = len(wanted)
    rows = np.full((len(kept), width + 1), -1, dtype=np.int64)  # token ids are >= 0: padding never matches
    for i, tokens in enumerate(kept):
        n = min(len(tokens), width)
        rows[i, :n] = tokens[:n]
    differs = rows != np.append(np.asarray(wanted, dtype=np.int64), -2)  # the sentinel column always differs
    return differs.argmax(axis=1)


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
        if not self._kept:
            return at_least, None
        lengths = prefix_lengths([kept.tokens for kept in self._kept.values()], wanted)
        first_longest = int(np.argmax(lengths))  # the earliest in LRU order among equals
        best = int(lengths[first_longest])
        if best <= at_least:
            return at_least, None
        best_key = next(islice(self._kept, first_longest, None))
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
