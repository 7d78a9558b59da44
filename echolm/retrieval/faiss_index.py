"""One tenant's vector index: exact inner-product search, switching to IVF (the paper's K-means) at scale.

Vectors are L2-normalised, so inner product is cosine similarity. Small indexes are exact
(``IndexIDMap2(IndexFlatIP)``). Beyond ``ivf_min_examples`` vectors the index is rebuilt as an
``IndexIVFFlat`` with nlist ~ sqrt(N) K-means clusters (paper, stage 1) and a hashtable direct map,
so removals and re-adds keep working; it is re-trained when it has doubled since the last training,
and falls back to exact search if it shrinks below half the threshold.

An index too small to train sqrt(N) clusters (under ~1.5k vectors) stays exact whatever the
threshold. Both layouts store the raw float32 vectors, so a rebuild reads them back from the live index rather
than keeping a second copy. A rebuild (K-means takes seconds at 2e5 vectors) runs outside the lock:
searches keep using the old index, mutations made meanwhile are journalled and replayed onto the
new one before it is swapped in.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import faiss
import numpy as np

log = logging.getLogger(__name__)

Layout = Literal["flat", "ivf"]

# Re-train the IVF once the index has grown this much since its last training: nlist ~ sqrt(N)
# means clusters grow as sqrt(N), and with them the cost of each probe.
IVF_RETRAIN_GROWTH = 2.0
# Below this fraction of ivf_min_examples an IVF index goes back to exact search (hysteresis, so an
# index hovering around the threshold is not rebuilt back and forth).
FLAT_FALLBACK_FRACTION = 0.5
# faiss's K-means wants at least this many training points per cluster; with nlist ~ sqrt(N) that
# holds from N ~ 1.5k on, and below that exact search costs well under a millisecond anyway.
MIN_TRAINING_POINTS_PER_CLUSTER = 39


def use_single_openmp_thread() -> None:
    """faiss parallelises one query across OpenMP threads; on a few cores that made a single-query
    search 6-25x slower here, and requests are searched one small batch at a time."""
    faiss.omp_set_num_threads(1)


def ivf_cluster_count(n_vectors: int) -> int:
    """nlist for an IVF over ``n_vectors``: about sqrt(N) (paper: K-means with K = sqrt(N))."""
    return max(1, round(math.sqrt(n_vectors)))


def can_train_ivf(n_vectors: int) -> bool:
    """Whether ``n_vectors`` are enough to train ``ivf_cluster_count(n_vectors)`` clusters well."""
    return n_vectors >= MIN_TRAINING_POINTS_PER_CLUSTER * ivf_cluster_count(n_vectors)


@dataclass
class _State:
    """One built index and the ids it holds (faiss's IDMap2 does not reject duplicate ids itself)."""

    index: Any  # a faiss SWIG object: IndexIDMap2 or IndexIVFFlat (their attributes are untyped)
    layout: Layout
    ids: set[int] = field(default_factory=set)
    trained_size: int = 0


class FaissIndex:
    """``VectorIndex`` over int64 example ids; re-adding an id replaces its vector. Thread-safe."""

    def __init__(self, dimension: int, ivf_min_examples: int = 200_000, nprobe: int = 8, *,
                 seed: int = 0) -> None:
        if dimension < 1:
            raise ValueError(f"dimension must be >= 1, got {dimension}")
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        use_single_openmp_thread()
        self.dimension = dimension
        self.ivf_min_examples = ivf_min_examples
        self.nprobe = nprobe
        self._seed = seed
        self._lock = threading.RLock()
        self._rebuilding = threading.Lock()
        self._state = _State(self._new_flat(), "flat")
        # Mutations made while a rebuild runs, replayed onto the rebuilt index before the swap.
        self._journal: list[tuple[str, np.ndarray, np.ndarray | None]] | None = None

    # -- the VectorIndex protocol ------------------------------------------------------------

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or replace vectors by id. Within one call a repeated id keeps its last vector."""
        ids, vectors = self._check_add(ids, vectors)
        if len(ids) == 0:
            return
        with self._lock:
            self._add_to(self._state, ids, vectors)
            if self._journal is not None:
                self._journal.append(("add", ids, vectors))
            wanted = self._wanted_layout(self._state)
        if wanted is not None:
            self._rebuild(wanted)

    def remove(self, ids: np.ndarray) -> None:
        """Remove ids; ids that are not present are ignored."""
        ids = self._check_ids(ids)
        if len(ids) == 0:
            return
        with self._lock:
            self._remove_from(self._state, ids)
            if self._journal is not None:
                self._journal.append(("remove", ids, None))
            wanted = self._wanted_layout(self._state)
        if wanted is not None:
            self._rebuild(wanted)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities float32, ids int64), each (n, k), best first; missing neighbours have id -1."""
        vectors = self._check_vectors(vectors)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        n = len(vectors)
        if k == 0 or n == 0:
            return np.zeros((n, k), dtype=np.float32), np.full((n, k), -1, dtype=np.int64)
        with self._lock:
            similarities, ids = self._state.index.search(vectors, k)
        return similarities, ids

    def __len__(self) -> int:
        with self._lock:
            return int(self._state.index.ntotal)

    # -- introspection -----------------------------------------------------------------------

    @property
    def layout(self) -> Layout:
        """'flat' (exact) or 'ivf'."""
        with self._lock:
            return self._state.layout

    @property
    def nlist(self) -> int:
        """IVF clusters (0 for the exact layout)."""
        with self._lock:
            state = self._state
            return int(state.index.nlist) if state.layout == "ivf" else 0

    def __contains__(self, example_id: object) -> bool:
        with self._lock:
            return example_id in self._state.ids

    def rebuild(self) -> None:
        """Re-choose the layout for the current size now (re-training an IVF); normally automatic."""
        with self._lock:
            size = len(self._state.ids)
        self._rebuild("ivf" if size > self.ivf_min_examples and can_train_ivf(size) else "flat", force=True)

    # -- internals -----------------------------------------------------------------------------

    def _new_flat(self) -> Any:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dimension))

    def _add_to(self, state: _State, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = _last_occurrence(ids, vectors)
        present = np.fromiter((i in state.ids for i in ids.tolist()), dtype=bool, count=len(ids))
        if present.any():
            state.index.remove_ids(ids[present])
        state.index.add_with_ids(vectors, ids)
        state.ids.update(ids.tolist())

    def _remove_from(self, state: _State, ids: np.ndarray) -> None:
        present = ids[np.fromiter((i in state.ids for i in ids.tolist()), dtype=bool, count=len(ids))]
        if len(present) == 0:
            return
        state.index.remove_ids(present)
        state.ids.difference_update(present.tolist())

    def _wanted_layout(self, state: _State) -> Layout | None:
        """The layout the index should be rebuilt into, or None if the current one still fits."""
        size = len(state.ids)
        if state.layout == "flat":
            return "ivf" if size > self.ivf_min_examples and can_train_ivf(size) else None
        if size < self.ivf_min_examples * FLAT_FALLBACK_FRACTION or not can_train_ivf(size):
            return "flat"
        if size >= state.trained_size * IVF_RETRAIN_GROWTH:
            return "ivf"
        return None

    def _rebuild(self, layout: Layout, *, force: bool = False) -> None:
        if not self._rebuilding.acquire(blocking=False):
            return  # another thread is rebuilding; the next mutation re-checks the layout
        try:
            with self._lock:
                if not force and self._wanted_layout(self._state) != layout:
                    return
                ids, vectors = self._snapshot(self._state)
                self._journal = []
            started = time.perf_counter()
            try:
                fresh = self._build(layout, ids, vectors)
            except BaseException:
                with self._lock:
                    self._journal = None
                raise
            with self._lock:
                journal, self._journal = self._journal or [], None
                for op, op_ids, op_vectors in journal:
                    if op == "add":
                        assert op_vectors is not None
                        self._add_to(fresh, op_ids, op_vectors)
                    else:
                        self._remove_from(fresh, op_ids)
                self._state = fresh
            log.info("vector index rebuilt as %s: %d vectors, nlist %d, %.2f s", layout, len(ids),
                     int(getattr(fresh.index, "nlist", 0)), time.perf_counter() - started)
        finally:
            self._rebuilding.release()

    def _snapshot(self, state: _State) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) currently held, read back from the index itself (both layouts store raw floats)."""
        if state.layout == "flat":
            ids = faiss.vector_to_array(state.index.id_map).astype(np.int64)
            vectors = state.index.index.reconstruct_n(0, state.index.ntotal)
        else:
            ids = np.fromiter(state.ids, dtype=np.int64, count=len(state.ids))
            vectors = state.index.reconstruct_batch(ids) if len(ids) else np.zeros((0, self.dimension), np.float32)
        return ids, np.ascontiguousarray(vectors, dtype=np.float32)

    def _build(self, layout: Layout, ids: np.ndarray, vectors: np.ndarray) -> _State:
        if layout == "flat" or len(ids) == 0:
            state = _State(self._new_flat(), "flat")
            if len(ids):
                state.index.add_with_ids(vectors, ids)
            state.ids = set(ids.tolist())
            return state
        nlist = ivf_cluster_count(len(ids))
        quantizer = faiss.IndexFlatIP(self.dimension)
        index = faiss.IndexIVFFlat(quantizer, self.dimension, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = self._seed
        index.train(vectors)  # faiss's Python wrapper keeps `quantizer` alive as long as `index`
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
        index.nprobe = min(self.nprobe, nlist)
        index.add_with_ids(vectors, ids)
        return _State(index, "ivf", set(ids.tolist()), trained_size=len(ids))

    # -- validation ---------------------------------------------------------------------------

    def _check_vectors(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dimension:
            raise ValueError(f"vectors must have shape (n, {self.dimension}), got {vectors.shape}")
        return np.ascontiguousarray(vectors, dtype=np.float32)

    @staticmethod
    def _check_ids(ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"ids must be one-dimensional, got shape {ids.shape}")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integers, got {ids.dtype}")
        return np.ascontiguousarray(ids, dtype=np.int64)

    def _check_add(self, ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = self._check_ids(ids)
        vectors = self._check_vectors(vectors)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if (ids < 0).any():
            raise ValueError("ids must be non-negative (-1 means 'no neighbour' in search results)")
        return ids, vectors


def _last_occurrence(ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop all but the last row of each repeated id (a later row is a newer version)."""
    reversed_ids = ids[::-1]
    _, first_in_reversed = np.unique(reversed_ids, return_index=True)
    if len(first_in_reversed) == len(ids):
        return ids, vectors
    keep = np.sort(len(ids) - 1 - first_in_reversed)
    return ids[keep], vectors[keep]
