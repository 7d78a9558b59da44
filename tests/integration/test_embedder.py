"""The real all-MiniLM-L6-v2 embedder, loaded offline from its PyPI package."""

import numpy as np
import pytest

from echolm.domain import Example
from echolm.protocols import CacheEvent, Embedder
from echolm.retrieval.embedder import SentenceTransformerEmbedder, embedding_dimension, resolve_model_path
from echolm.retrieval.example_cache import ExampleCache

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b)


def test_vectors_are_float32_unit_rows_of_the_model_dimension(embedder):
    vectors = embedder.embed(["How do I sort a list in Python?", "", "x" * 5000])
    assert isinstance(embedder, Embedder)
    assert embedder.dimension == 384
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32 and vectors.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)


def test_paraphrases_are_closer_than_unrelated_texts(embedder):
    a, paraphrase, unrelated = embedder.embed([
        "How do I reverse a list in Python?",
        "What is the way to reverse a Python list?",
        "The weather in Paris is mild in spring.",
    ])
    assert cosine(a, paraphrase) > 0.8
    assert cosine(a, unrelated) < 0.3


def test_embeddings_are_deterministic_and_batch_independent(embedder):
    texts = [f"Write a function that returns the {n}th Fibonacci number." for n in range(1, 10)]
    one_by_one = np.stack([embedder.embed([t])[0] for t in texts[:3]])
    batched = embedder.embed(texts)[:3]
    np.testing.assert_allclose(one_by_one, batched, atol=1e-5)


def test_a_single_string_is_refused(embedder):
    with pytest.raises(TypeError):
        embedder.embed("not a list")  # type: ignore[arg-type]


def test_an_unknown_model_fails_locally_instead_of_downloading(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local"):
        resolve_model_path(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError):
        _ = SentenceTransformerEmbedder("sentence-transformers/paraphrase-MiniLM-L3-v2").dimension


def test_real_embeddings_retrieve_the_cached_paraphrase(embedder):
    cached = ["Write a Python function to check whether a number is prime.",
              "Convert a temperature from Celsius to Fahrenheit.",
              "Count the vowels in a string."]
    vectors = embedder.embed(cached)
    cache = ExampleCache(embedder.dimension)
    cache.apply([CacheEvent(seq=i + 1, op="add", embedding=v,
                            example=Example(id=i + 1, tenant="t", prompt=p, response="...", model="m", tier="large"))
                 for i, (p, v) in enumerate(zip(cached, vectors, strict=True))])

    hits = cache.search("t", embedder.embed(["How can I test if an integer is a prime number in Python?"]), 3, 0.5)[0]

    assert hits[0].example.id == 1 and hits[0].similarity > 0.7
    assert all(h.example.id != 2 for h in hits)  # the unrelated example stays below 0.5


def test_bfloat16_compute_gives_float32_unit_vectors_close_to_float32(embedder):
    texts = ["How do I reverse a list in Python?", "Janet's ducks lay 16 eggs per day.", "Count the vowels."]
    low = SentenceTransformerEmbedder(dtype="bfloat16").embed(texts)
    assert low.dtype == np.float32 and low.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(low, axis=1), 1.0, atol=1e-5)
    assert (np.sum(low * embedder.embed(texts), axis=1) > 0.99).all()


def test_bucketed_shapes_give_the_same_vectors(embedder):
    texts = ["hi", "How do I reverse a list in Python?", "x " * 400] + [f"step {i} " * i for i in range(1, 12)]
    unbucketed = SentenceTransformerEmbedder(bucket_shapes=False).embed(texts)
    np.testing.assert_allclose(embedder.embed(texts), unbucketed, atol=1e-5)


def test_a_stream_of_batches_of_any_size_and_length_reaches_the_model_in_few_shapes():
    # Each new (rows, tokens) shape costs torch's oneDNN path memory it keeps: the number of
    # distinct shapes bounds the embedder's memory under a request stream.
    embedder = SentenceTransformerEmbedder(batch_size=32)
    embedder.embed(["load the model"])
    shapes: set[tuple[int, ...]] = set()
    embedder._model[0].register_forward_pre_hook(  # noqa: SLF001 - observing the real model's inputs
        lambda module, args: shapes.add(tuple(args[0]["input_ids"].shape)))
    rng = np.random.default_rng(0)
    words = "the of a ducks eggs per day how many dollars does she make every market".split()
    for _ in range(60):
        rows = int(rng.integers(1, 33))
        embedder.embed([" ".join(rng.choice(words, int(rng.integers(1, 120)))) for _ in range(rows)])
    assert all(tokens % 32 == 0 for _, tokens in shapes)
    # 10 row buckets up to 32 x 4 token buckets up to 128: a bound that no longer grows with the stream.
    assert len(shapes) <= 40
    assert len({rows for rows, _ in shapes}) > 3  # the stream did vary the batch sizes



def test_warm_up_meets_every_shape_a_stream_of_stage_batches_can_take():
    # A worker warms up at start so that no request later meets a shape (and its memory) for the
    # first time: every shape of a random stream must be one the warm-up already ran.
    embedder = SentenceTransformerEmbedder(batch_size=32)
    warmed: set[tuple[int, ...]] = set()
    embedder.embed(["load the model"])
    hook = embedder._model[0].register_forward_pre_hook(  # noqa: SLF001 - observing the real model's inputs
        lambda module, args: warmed.add(tuple(args[0]["input_ids"].shape)))
    count = embedder.warm_up_shapes(max_rows=8)
    hook.remove()
    assert count == len(warmed) == 6 * 8  # row buckets 1, 2, 3, 4, 6, 8 x token buckets 32, 64, ..., 256
    later: set[tuple[int, ...]] = set()
    embedder._model[0].register_forward_pre_hook(  # noqa: SLF001
        lambda module, args: later.add(tuple(args[0]["input_ids"].shape)))
    rng = np.random.default_rng(1)
    words = "the of a ducks eggs per day how many dollars does she make every market".split()
    for _ in range(40):
        embedder.embed([" ".join(rng.choice(words, int(rng.integers(1, 400)))) for _ in range(int(rng.integers(1, 9)))])
    assert later and later <= warmed


def test_the_dimension_is_read_from_the_model_files_without_loading_it(embedder):
    assert embedding_dimension("all-MiniLM-L6-v2") == embedder.dimension == 384
