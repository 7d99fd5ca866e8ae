"""Host shards and shuffles: a bijection per epoch, each example once per epoch, nothing dropped."""

import numpy as np
import pytest

from unclip_jax.data.sampler import Permutation, Stream, host_range


@pytest.mark.parametrize("size", [1, 2, 3, 5, 64, 1000, 4097])
def test_permutation_is_a_bijection(size):
    out = Permutation(size, (0, 7))(np.arange(size))
    assert sorted(out.tolist()) == list(range(size))


def test_permutation_depends_on_its_seed_and_scales_to_huge_datasets():
    a, b = Permutation(1000, (0, 0))(np.arange(1000)), Permutation(1000, (0, 1))(np.arange(1000))
    assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(1000))
    big = Permutation(400_000_000, (3,))(np.arange(10_000))  # LAION-400M: no O(n) memory
    assert len(np.unique(big)) == 10_000 and big.max() < 400_000_000


@pytest.mark.parametrize("n,count", [(26, 2), (11, 3), (8, 8), (100, 7)])
def test_host_ranges_tile_the_dataset_like_even_splits(n, count):
    ranges = [host_range(n, p, count) for p in range(count)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [e - s for s, e in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_stream_reads_every_example_of_the_shard_once_per_epoch():
    stream = Stream(10, 23, batch=4, seed=0)  # 13 examples, batches straddle epoch boundaries
    seen = np.concatenate([stream.indices(s)[0] for s in range(13)])  # 52 = 4 epochs exactly
    epochs = np.concatenate([stream.indices(s)[1] for s in range(13)])
    for e in range(4):
        assert sorted(seen[epochs == e].tolist()) == list(range(10, 23))
    assert not np.array_equal(seen[:13], seen[13:26])  # reshuffled every epoch
    assert stream.epoch_of(13) == 4.0


def test_stream_batches_are_a_pure_function_of_seed_and_step():
    a, b = Stream(0, 100, 8, seed=3), Stream(0, 100, 8, seed=3)
    assert all(np.array_equal(a.indices(s)[0], b.indices(s)[0]) for s in (0, 5, 40, 7))
    assert not np.array_equal(a.indices(0)[0], Stream(0, 100, 8, seed=4).indices(0)[0])


def test_a_host_without_examples_is_an_error():
    with pytest.raises(ValueError, match="fewer examples than hosts"):
        Stream(*host_range(2, 2, 3), batch=1, seed=0, process_index=2)
