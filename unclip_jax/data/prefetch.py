"""Batches made ahead of time in threads, in order, from a pure function of the batch number.

Because batch `s` is `make_batch(s)` and nothing else, the position of a pipeline is one integer: restarting it
at `s` gives exactly the batches an uninterrupted run would have given, whatever was prefetched and discarded.
Per-example work (image decoding, cropping) runs in a shared pool of worker threads: Pillow and numpy release
the GIL, so threads decode in parallel without the cost of pickling images between processes.
"""

from __future__ import annotations

import collections
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence


def default_workers() -> int:
    return min(32, (os.cpu_count() or 1) + 2)


class Workers:
    """A thread pool for per-example work, shared by the batches in flight."""

    def __init__(self, workers: int | None = None, name: str = "unclip-data"):
        self.workers = workers or default_workers()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=name)

    def map(self, fn: Callable, items: Iterable) -> list:
        """[fn(item) for item in items], computed in the pool, in order."""
        items = list(items)
        if self.workers == 1 or len(items) <= 1:
            return [fn(x) for x in items]
        return [f.result() for f in [self._pool.submit(fn, x) for x in items]]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Prefetcher:
    """next() returns make_batch(start), make_batch(start + 1), ...; `prefetch` of them are computed ahead by
    `threads` threads. reset(step) restarts at any batch number (pending work is discarded)."""

    def __init__(self, make_batch: Callable[[int], Any], *, start: int = 0, prefetch: int = 4, threads: int = 2):
        if prefetch < 1:
            raise ValueError(f"prefetch={prefetch}; expected >= 1 batch")
        self._make = make_batch
        self._prefetch = prefetch
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="unclip-batches")
        self._lock = threading.Lock()
        self._queue: collections.deque[tuple[int, Future]] = collections.deque()
        self._next_submit = start
        self._closed = False
        self._fill()

    def _fill(self) -> None:
        while len(self._queue) < self._prefetch:
            self._queue.append((self._next_submit, self._pool.submit(self._make, self._next_submit)))
            self._next_submit += 1

    def next(self) -> Any:
        with self._lock:
            if self._closed:
                raise RuntimeError("this data pipeline is closed")
            _, future = self._queue.popleft()
            self._fill()
        return future.result()

    def reset(self, start: int) -> None:
        with self._lock:
            for _, f in self._queue:
                f.cancel()
            self._queue.clear()
            self._next_submit = start
            self._fill()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for _, f in self._queue:
                f.cancel()
            self._queue.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


def stack(rows: Sequence[dict]) -> dict:
    """[{name: array}] -> {name: stacked array}."""
    import numpy as np
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
