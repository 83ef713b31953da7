"""Ordered work on a bounded pool of threads: the one way the data path reads files in parallel."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int,
                window: int | None = None) -> Iterator[R]:
    """Yield ``fn(item)`` for each item, in order, computed by ``workers`` threads.

    At most ``window`` (default 2 x workers) items are in flight or waiting to be consumed, so memory
    stays bounded however many items there are (``Executor.map`` would submit them all at once), and
    ``items`` may be a generator that is consumed only as fast as results are.
    """
    window = max(window or 2 * workers, 1)
    pending: collections.deque[Future[R]] = collections.deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgclf") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            # On an error or an abandoned generator, do not run what has not started yet.
            for future in pending:
                future.cancel()
