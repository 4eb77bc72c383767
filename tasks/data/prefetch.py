"""Reading ahead of a consumer: an ordered thread-pool map and a bounded background iterator.

A labeller that fetches and decodes its inputs in its own thread leaves the accelerator idle
while it does so. The two pieces here let input work overlap the model without changing what
the consumer sees:

- :func:`ordered_map` applies a function to a stream on a pool of threads and yields the
  results in input order, with at most ``ahead`` items in flight. Pillow releases the GIL while
  it decodes and resizes, and storage reads wait on I/O, so threads run them in parallel.
- :class:`RunAhead` runs a whole iterator in one daemon thread that fills a bounded queue, so
  the consumer finds its next item ready.
- :func:`map_ahead` is :func:`ordered_map` on a pool of any size, one thread included: a
  consumer busy with its own work (a labeller's model) finds the next results computed.

All are deterministic (order never depends on timing), bounded (memory is a few queue slots,
not a whole input) and leave nothing behind: closing them (or an exception on either side)
cancels pending work and joins every thread they started.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Threads started here are named with this prefix (tests look for leftovers by it).
THREAD_PREFIX = "prefetch"

#: Upper bound of the default number of decode workers: beyond it the per-image Python work
#: that holds the GIL, not the cores, limits the rate.
MAX_DEFAULT_WORKERS = 8

_POLL_SECONDS = 0.05


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_decode_workers(accelerators: int = 1) -> int:
    """Decode workers when none are configured: the cores per accelerator, capped.

    Args:
        accelerators: devices on this machine that each run a labeller process (GPUs), 1 on CPU.
    """
    return max(1, min(MAX_DEFAULT_WORKERS, available_cores() // max(1, accelerators)))


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], *, workers: int, ahead: int | None = None
) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads, results in input order.

    ``items`` is consumed lazily in the calling thread, and at most ``ahead`` calls are in
    flight or finished but not yet consumed. With ``workers <= 1`` it is the plain, inline
    ``map`` (no thread at all). An exception raised by ``fn`` is raised here, at its item's
    place in the order. Closing the generator (or an exception) cancels the calls not started
    and waits for the running ones, so no thread outlives it.

    Args:
        fn: the function; runs in pool threads, so it must not touch state the caller mutates.
        items: the inputs, in order.
        workers: pool threads.
        ahead: most items in flight (default ``2 * workers``; at least ``workers``).
    """
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    yield from map_ahead(fn, items, workers=workers, ahead=ahead)


def map_ahead(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int = 1,
    ahead: int | None = None,
    name: str = "map",
) -> Iterator[R]:
    """:func:`ordered_map` that always runs ``fn`` on pool threads, even with one worker.

    A consumer that has its own work to do between items (a labeller running its model) gets
    the next results computed meanwhile: with ``ahead`` items in flight, ``fn`` runs up to
    ``ahead`` items ahead of the consumer. ``items`` is still consumed in the calling thread,
    in order; results come in input order; an exception of ``fn`` is raised at its item's
    place, and one of ``items`` after the results of the items before it (as a serial map
    does); closing the generator cancels what has not started and joins the pool's threads.

    Args:
        fn: the function; runs in pool threads, so it must not touch state the caller mutates.
        items: the inputs, in order.
        workers: pool threads (at least 1).
        ahead: most items in flight (default ``2 * workers``; at least ``workers``).
        name: thread name suffix, for logs and debuggers.
    """
    workers = max(1, workers)
    ahead = max(workers, ahead if ahead is not None else 2 * workers)
    executor = ThreadPoolExecutor(workers, thread_name_prefix=f"{THREAD_PREFIX}-{name}")
    pending: deque[Future[R]] = deque()
    iterator = iter(items)
    source_error: Exception | None = None
    try:
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                break
            except Exception as error:  # the source failed: what it gave before comes first,
                source_error = error  # as in a serial map
                break
            pending.append(executor.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
        if source_error is not None:
            raise source_error
    finally:
        for future in pending:
            future.cancel()
        executor.shutdown(wait=True, cancel_futures=True)


class _End:
    """Marks the end of a :class:`RunAhead` stream (or carries the producer's exception)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class RunAhead(Generic[T]):
    """Iterate over ``source()`` in a background thread, at most ``depth`` items ahead.

    The iterator is created and consumed in that thread (so generators that own thread pools
    start and close them there); the consumer gets its items in order from a bounded queue.
    An exception of the producer is raised in the consumer at the item where it happened.
    Use it as a context manager, or call :meth:`close`: both stop the producer, close the
    source iterator and join the thread, also when the consumer stops early or fails.

    Args:
        source: a callable returning the iterator to run ahead.
        depth: queue slots (items produced and not yet consumed).
        name: thread name suffix, for logs and debuggers.
    """

    def __init__(
        self, source: Callable[[], Iterable[T]], *, depth: int = 2, name: str = ""
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self._source = source
        self._queue: queue.Queue[T | _End] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=self._produce,
            name=f"{THREAD_PREFIX}-run-ahead{'-' + name if name else ''}",
            daemon=True,  # never keeps an interpreter alive, even if close() is never reached
        )
        self._thread.start()

    def _put(self, item: T | _End) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        iterator: Iterator[T] | None = None
        try:
            iterator = iter(self._source())
            for item in iterator:
                if not self._put(item):
                    return
            self._put(_End())
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(_End(exc))
        finally:
            close = getattr(iterator, "close", None) if iterator is not None else None
            if close is not None:
                close()

    def __iter__(self) -> RunAhead[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=_POLL_SECONDS)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise RuntimeError("the run-ahead thread ended without a result") from None
        if isinstance(item, _End):
            self._done = True
            self.close()
            if item.error is not None:
                raise item.error
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the producer, drop what it queued, and wait for its thread to end."""
        self._done = True
        self._stop.set()
        while self._thread.is_alive():
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=_POLL_SECONDS)

    def __enter__(self) -> RunAhead[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
