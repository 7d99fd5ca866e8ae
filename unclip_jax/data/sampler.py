"""Which examples each host reads, in which order: host shards and per-epoch shuffles without memory.

Host `p` of `P` owns the contiguous range `host_range(n, p, P)` of the dataset, the same examples as
`tfds.even_splits(split, P)[p]`. Its stream is epoch 0's shuffle of that range, then epoch 1's, ...; batch `s`
of the host is stream positions [s * b, (s + 1) * b). So within every epoch each example of the shard is read
exactly once, and no example is dropped at an epoch's end (a batch may straddle two epochs).

The shuffle is a keyed bijection of [0, m) (a Feistel network with cycle walking): any position maps to its
example in O(1) time and memory, for any dataset size (no 3 GB permutation array for LAION-400M), and the
iterator's whole state is the number of batches it has returned.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def host_range(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, end) of the host's shard; tfds.even_splits' rule (the first n % P hosts get one more)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    per, extra = divmod(num_examples, process_count)
    start = per * process_index + min(process_index, extra)
    return start, start + per + (1 if process_index < extra else 0)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """A 64-bit avalanche hash of x ^ key (splitmix64's finaliser), element-wise on uint64."""
    with np.errstate(over="ignore"):
        z = (x ^ key) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class Permutation:
    """A pseudo-random permutation of [0, size) given by `seed_words` (a tuple of ints); `perm(positions)`."""

    ROUNDS = 6

    def __init__(self, size: int, seed_words: tuple[int, ...]):
        if size < 1:
            raise ValueError(f"cannot shuffle {size} examples")
        self.size = size
        self.half_bits = max(1, (int(size - 1).bit_length() + 1) // 2)
        self.half_mask = np.uint64((1 << self.half_bits) - 1)
        words = np.random.SeedSequence([int(w) for w in seed_words]).generate_state(self.ROUNDS, np.uint64)
        self.keys = [np.uint64(k) for k in words]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        bits = np.uint64(self.half_bits)
        left, right = x >> bits, x & self.half_mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right, k) & self.half_mask)
        return (left << bits) | right

    def __call__(self, positions) -> np.ndarray:
        x = np.asarray(positions, np.uint64)
        if x.size and int(x.max()) >= self.size:
            raise IndexError(f"position {int(x.max())} is outside [0, {self.size})")
        x = self._feistel(x)
        outside = x >= np.uint64(self.size)
        while outside.any():  # cycle walking: the domain is < 4 * size, so this ends in a few rounds
            x[outside] = self._feistel(x[outside])
            outside = x >= np.uint64(self.size)
        return x.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Stream:
    """The host's infinite, epoch-by-epoch shuffled sequence of global example indices.

    start, end: the host's shard [start, end) of the dataset; batch: examples per host and step.
    """
    start: int
    end: int
    batch: int
    seed: int
    shuffle: bool = True
    process_index: int = 0

    def __post_init__(self):
        if self.end <= self.start:
            raise ValueError(f"host {self.process_index} has no examples (shard [{self.start}, {self.end})): "
                             "the dataset has fewer examples than hosts")

    @property
    def shard_size(self) -> int:
        return self.end - self.start

    def epoch_of(self, step: int) -> float:
        """Epochs of this host's shard consumed before batch `step`."""
        return step * self.batch / self.shard_size

    def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch `step` -> (global example indices (batch,) int64, epoch of each (batch,) int64)."""
        position = step * self.batch + np.arange(self.batch, dtype=np.int64)
        epoch, within = np.divmod(position, self.shard_size)
        local = within.copy()
        if self.shuffle:
            for e in np.unique(epoch):
                sel = epoch == e
                local[sel] = self._permutation(int(e))(within[sel])
        return self.start + local, epoch

    def _permutation(self, epoch: int) -> Permutation:
        return _permutation(self.shard_size, (self.seed, epoch, self.start, self.end))


@functools.lru_cache(maxsize=16)
def _permutation(size: int, seed_words: tuple[int, ...]) -> Permutation:
    return Permutation(size, seed_words)
