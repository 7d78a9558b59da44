"""Which generate partition an offloaded request goes to (echolm.affinity)."""

from __future__ import annotations

import zlib

import pytest

from echolm.affinity import affinity_partition


def test_the_first_example_decides_the_partition_the_others_do_not() -> None:
    assert affinity_partition([7, 1], 4) == affinity_partition([7, 9, 3], 4) == zlib.crc32(b"7") % 4


def test_the_partition_is_stable_across_processes_and_spreads_examples() -> None:
    # CRC-32 of the id, not Python's per-process salted hash: every route worker agrees.
    assert [affinity_partition([i], 4) for i in range(8)] == [1, 3, 1, 3, 0, 2, 0, 2]


@pytest.mark.parametrize(("ids", "partitions", "affinity"), [([], 4, "first-example"), ([7], 4, "request"),
                                                             ([7], 1, "first-example")])
def test_requests_without_an_example_or_affinity_keep_their_key_partition(ids, partitions, affinity) -> None:
    assert affinity_partition(ids, partitions, affinity) is None


def test_a_topic_has_partitions() -> None:
    with pytest.raises(ValueError, match="at least one partition"):
        affinity_partition([7], 0)
