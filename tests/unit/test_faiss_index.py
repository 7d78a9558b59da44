import threading

import numpy as np
import pytest

from echolm.retrieval.faiss_index import FaissIndex, ivf_cluster_count


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered_rows(rng: np.random.Generator, n: int, centers: np.ndarray, spread: float = 0.8) -> np.ndarray:
    """Unit vectors scattered around ``centers`` (like embeddings of requests on a few topics)."""
    d = centers.shape[1]
    x = centers[rng.integers(0, len(centers), n)] + spread * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = queries @ vectors.T
    order = np.argsort(-sims, axis=1)[:, :k]
    return np.take_along_axis(sims, order, axis=1), ids[order]


def test_flat_search_equals_numpy_brute_force():
    rng = np.random.default_rng(1)
    vectors, queries = unit_rows(rng, 600, 48), unit_rows(rng, 25, 48)
    ids = rng.permutation(10_000)[:600].astype(np.int64)
    index = FaissIndex(48)
    index.add(ids, vectors)

    similarities, found = index.search(queries, 10)
    expected_similarities, expected_ids = brute_force(ids, vectors, queries, 10)

    assert index.layout == "flat" and len(index) == 600
    assert found.dtype == np.int64 and similarities.dtype == np.float32
    np.testing.assert_array_equal(found, expected_ids)
    np.testing.assert_allclose(similarities, expected_similarities, atol=1e-5)


def test_readding_an_id_replaces_its_vector():
    rng = np.random.default_rng(2)
    old, new, other = unit_rows(rng, 3, 16)
    index = FaissIndex(16)
    index.add(np.array([5, 6]), np.stack([old, other]))

    index.add(np.array([5]), new[None])

    assert len(index) == 2
    similarities, found = index.search(np.stack([new, old]), 2)
    assert found[0, 0] == 5 and similarities[0, 0] == pytest.approx(1.0, abs=1e-5)
    # The old vector is gone: nothing matches it exactly any more.
    assert similarities[1].max() < 0.999


def test_a_repeated_id_within_one_add_keeps_its_last_vector():
    rng = np.random.default_rng(3)
    first, last = unit_rows(rng, 2, 16)
    index = FaissIndex(16)
    index.add(np.array([9, 9]), np.stack([first, last]))

    similarities, found = index.search(last[None], 1)
    assert len(index) == 1
    assert found[0, 0] == 9 and similarities[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_remove_drops_ids_and_ignores_unknown_ones():
    rng = np.random.default_rng(4)
    vectors = unit_rows(rng, 20, 16)
    index = FaissIndex(16)
    index.add(np.arange(20), vectors)

    index.remove(np.array([3, 7, 12345]))

    assert len(index) == 18 and 3 not in index and 7 not in index and 4 in index
    _, found = index.search(vectors, 18)
    assert not np.isin(found, [3, 7]).any()


def test_missing_neighbours_are_minus_one_and_k_zero_is_empty():
    rng = np.random.default_rng(5)
    index = FaissIndex(8)
    query = unit_rows(rng, 2, 8)
    _, empty_ids = index.search(query, 3)
    assert (empty_ids == -1).all()

    index.add(np.array([1, 2]), unit_rows(rng, 2, 8))
    _, found = index.search(query, 4)
    assert sorted(found[0, :2].tolist()) == [1, 2] and (found[:, 2:] == -1).all()
    similarities, none = index.search(query, 0)
    assert similarities.shape == (2, 0) and none.shape == (2, 0)


def test_invalid_input_is_rejected_with_a_clear_error():
    index = FaissIndex(8)
    with pytest.raises(ValueError, match="shape"):
        index.add(np.array([1]), np.ones((1, 7), dtype=np.float32))
    with pytest.raises(ValueError, match="non-negative"):
        index.add(np.array([-1]), np.ones((1, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="ids for"):
        index.add(np.array([1, 2]), np.ones((1, 8), dtype=np.float32))


def test_growing_past_the_threshold_switches_to_ivf_and_keeps_recall_high():
    rng = np.random.default_rng(6)
    centers = unit_rows(rng, 60, 32)
    vectors = clustered_rows(rng, 4000, centers)
    ids = np.arange(4000, dtype=np.int64) * 3
    index = FaissIndex(32, ivf_min_examples=1500, nprobe=8)
    index.add(ids[:1000], vectors[:1000])
    assert index.layout == "flat"

    index.add(ids[1000:], vectors[1000:])

    assert index.layout == "ivf" and index.nlist == ivf_cluster_count(4000) and len(index) == 4000
    queries = clustered_rows(rng, 200, centers)
    _, found = index.search(queries, 10)
    _, expected = brute_force(ids, vectors, queries, 10)
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found.tolist(), expected.tolist(), strict=True)])
    assert recall >= 0.95


def test_ivf_supports_remove_and_replace_and_falls_back_to_flat_when_it_shrinks():
    rng = np.random.default_rng(7)
    vectors = clustered_rows(rng, 2400, unit_rows(rng, 20, 16))
    index = FaissIndex(16, ivf_min_examples=2000, nprobe=4)
    index.add(np.arange(2400), vectors)
    assert index.layout == "ivf"

    replacement = unit_rows(rng, 1, 16)
    index.add(np.array([0]), replacement)
    index.remove(np.array([1]))
    similarities, found = index.search(replacement, 1)
    assert len(index) == 2399 and 1 not in index
    assert found[0, 0] == 0 and similarities[0, 0] == pytest.approx(1.0, abs=1e-5)

    index.remove(np.arange(2, 1500))
    assert index.layout == "flat" and len(index) == 901
    _, found = index.search(vectors[1900:1901], 1)
    assert found[0, 0] == 1900


def test_mutations_during_a_rebuild_are_replayed_onto_the_new_index():
    rng = np.random.default_rng(8)
    vectors = clustered_rows(rng, 2100, unit_rows(rng, 20, 16))
    late = unit_rows(rng, 1, 16)

    class MutatedWhileBuilding(FaissIndex):
        def _build(self, layout, ids, snapshot):
            # Another thread mutates while K-means runs (outside the lock).
            writer = threading.Thread(target=lambda: (self.add(np.array([5000]), late), self.remove(np.array([3]))))
            writer.start()
            writer.join(timeout=10)
            return super()._build(layout, ids, snapshot)

    index = MutatedWhileBuilding(16, ivf_min_examples=2000)
    index.add(np.arange(2100), vectors)

    assert index.layout == "ivf" and len(index) == 2100  # +5000, -3
    assert 5000 in index and 3 not in index
    _, found = index.search(late, 1)
    assert found[0, 0] == 5000


def test_an_index_too_small_to_train_clusters_stays_exact_whatever_the_threshold():
    rng = np.random.default_rng(9)
    index = FaissIndex(16, ivf_min_examples=0)
    for start in range(0, 1000, 100):
        index.add(np.arange(start, start + 100), unit_rows(rng, 100, 16))
    assert index.layout == "flat" and len(index) == 1000
