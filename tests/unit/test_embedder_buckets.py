"""Shape buckets of the embedder: the bound that keeps its memory flat under a request stream."""

import math

import pytest

from echolm.retrieval.embedder import row_bucket, sequence_bucket


@pytest.mark.parametrize("batch_size", [1, 5, 32, 64, 100])
def test_every_row_count_gets_a_bucket_that_fits_it_within_half_again(batch_size):
    for rows in range(1, batch_size + 1):
        bucket = row_bucket(rows, batch_size)
        assert rows <= bucket <= batch_size
        assert bucket - rows < max(1, rows / 2)  # fewer filler rows than half the texts


@pytest.mark.parametrize("batch_size", [32, 64, 100])
def test_any_stream_of_batches_uses_a_fixed_small_set_of_row_counts(batch_size):
    used = {row_bucket(rows, batch_size) for rows in range(1, batch_size + 1)}
    # Two buckets per doubling: the number of shapes grows with log(batch_size), not batch_size.
    assert len(used) <= 2 * math.ceil(math.log2(batch_size)) + 1
    assert {row_bucket(rows, 64) for rows in range(1, 65)} == {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64}


def test_row_counts_outside_a_batch_are_refused():
    with pytest.raises(ValueError):
        row_bucket(0, 64)
    with pytest.raises(ValueError):
        row_bucket(65, 64)


@pytest.mark.parametrize(("max_seq_length", "bucket"), [(256, 32), (512, 32), (128, 32), (200, 8), (77, 1), (None, 32)])
def test_the_token_bucket_divides_the_model_limit_so_padding_never_passes_it(max_seq_length, bucket):
    assert sequence_bucket(max_seq_length) == bucket
    if max_seq_length:
        assert max_seq_length % sequence_bucket(max_seq_length) == 0
