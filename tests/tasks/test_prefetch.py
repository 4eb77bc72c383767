"""The read-ahead machinery: order, bounds, errors, and no thread left behind."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator

import pytest

from tasks.data.prefetch import (
    THREAD_PREFIX,
    RunAhead,
    default_decode_workers,
    map_ahead,
    ordered_map,
)


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def _slow_square(x: int) -> int:
    # Random delays make later items finish first, which order must not reflect.
    time.sleep(random.Random(x).random() * 0.005)
    return x * x


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_ordered_map_keeps_input_order_whatever_finishes_first(workers: int) -> None:
    assert list(ordered_map(_slow_square, range(60), workers=workers)) == [x * x for x in range(60)]
    assert _prefetch_threads() == []


def test_ordered_map_reads_at_most_ahead_items_past_the_consumer() -> None:
    pulled = 0

    def items() -> Iterator[int]:
        nonlocal pulled
        for x in range(100):
            pulled += 1
            yield x

    lead = []
    for consumed, _ in enumerate(ordered_map(_slow_square, items(), workers=3, ahead=5), 1):
        lead.append(pulled - consumed)
    assert max(lead) <= 5 - 1  # the item being returned counts among the `ahead`
    assert max(lead) >= 1  # it did read ahead


def test_ordered_map_with_one_worker_runs_inline() -> None:
    seen = list(ordered_map(lambda _: threading.current_thread(), range(3), workers=1))
    assert seen == [threading.current_thread()] * 3


def test_ordered_map_raises_at_the_failing_item_and_joins_its_threads() -> None:
    def fail_at_7(x: int) -> int:
        if x == 7:
            raise ValueError("bad item 7")
        return _slow_square(x)

    results = []
    with pytest.raises(ValueError, match="bad item 7"):
        for value in ordered_map(fail_at_7, range(30), workers=4):
            results.append(value)
    assert results == [x * x for x in range(7)]
    assert _prefetch_threads() == []


def test_closing_ordered_map_early_cancels_the_rest_and_joins_its_threads() -> None:
    calls = []

    def record(x: int) -> int:
        calls.append(x)
        return _slow_square(x)

    stream = ordered_map(record, range(1000), workers=3, ahead=6)
    assert [next(stream) for _ in range(4)] == [0, 1, 4, 9]
    stream.close()
    assert _prefetch_threads() == []
    assert len(calls) <= 4 + 6  # cancelled, not run to the end


def test_map_ahead_with_one_worker_computes_the_next_item_while_the_consumer_works() -> None:
    # The consumer does not take item 1 until item 1's call has started: with the call inline
    # (ordered_map's one worker) this would wait forever; here it runs on the pool's thread.
    started = [threading.Event() for _ in range(4)]
    threads = []

    def record(x: int) -> int:
        threads.append(threading.current_thread())
        started[x].set()
        return x * x

    results = []
    for x, value in enumerate(map_ahead(record, range(4), ahead=2, name="test")):
        if x + 1 < 4:
            assert started[x + 1].wait(timeout=30)
        results.append(value)
    assert results == [0, 1, 4, 9]
    assert all(t is not threading.current_thread() for t in threads)
    assert all(t.name.startswith(f"{THREAD_PREFIX}-test") for t in threads)
    assert _prefetch_threads() == []


def test_map_ahead_consumes_its_items_in_the_callers_thread_at_most_ahead_past_it() -> None:
    pulled_by = []

    def items() -> Iterator[int]:
        for x in range(20):
            pulled_by.append(threading.current_thread())
            yield x

    lead = []
    for consumed, _ in enumerate(map_ahead(_slow_square, items(), ahead=3), 1):
        lead.append(len(pulled_by) - consumed)
    assert set(pulled_by) == {threading.current_thread()}
    assert max(lead) <= 3 - 1
    assert _prefetch_threads() == []


def test_map_ahead_raises_at_the_failing_item_and_closing_it_joins_its_thread() -> None:
    def fail_at_3(x: int) -> int:
        if x == 3:
            raise ValueError("bad item 3")
        return x

    results = []
    with pytest.raises(ValueError, match="bad item 3"):
        for value in map_ahead(fail_at_3, range(10)):
            results.append(value)
    assert results == [0, 1, 2]
    stream = map_ahead(_slow_square, range(1000), ahead=4)
    assert next(stream) == 0
    stream.close()
    assert _prefetch_threads() == []


@pytest.mark.parametrize("mapper", ["ordered_map", "map_ahead"])
def test_a_failing_source_is_raised_after_the_results_of_what_it_gave(mapper: str) -> None:
    def items() -> Iterator[int]:
        yield from range(5)
        raise OSError("listing lost")

    results = []
    stream = (
        ordered_map(_slow_square, items(), workers=3, ahead=4)
        if mapper == "ordered_map"
        else map_ahead(_slow_square, items(), ahead=4)
    )
    with pytest.raises(OSError, match="listing lost"):
        for value in stream:
            results.append(value)
    assert results == [x * x for x in range(5)]  # as a serial map gives them
    assert _prefetch_threads() == []


def test_run_ahead_yields_in_order_and_stays_within_its_depth() -> None:
    produced = 0

    def source() -> Iterator[int]:
        nonlocal produced
        for x in range(50):
            produced += 1
            yield x

    lead = []
    with RunAhead(source, depth=3) as items:
        out = []
        for item in items:
            time.sleep(0.001)
            out.append(item)
            lead.append(produced - len(out))
    assert out == list(range(50))
    # 3 queued, 1 waiting to be put, 1 being produced.
    assert max(lead) <= 3 + 1
    assert _prefetch_threads() == []


def test_run_ahead_hands_the_producer_error_over_after_the_items_before_it() -> None:
    def source() -> Iterator[int]:
        yield from range(5)
        raise OSError("storage went away")

    out = []
    with pytest.raises(OSError, match="storage went away"), RunAhead(source) as items:
        for item in items:
            out.append(item)
    assert out == list(range(5))
    assert _prefetch_threads() == []


def test_a_consumer_failure_stops_the_producer_and_closes_its_source() -> None:
    state = {"closed": False, "produced": 0}

    def source() -> Iterator[int]:
        try:
            for x in range(10_000):
                state["produced"] += 1
                yield from ordered_map(_slow_square, [x], workers=2)
        finally:
            state["closed"] = True

    with pytest.raises(RuntimeError, match="model failed"), RunAhead(source, depth=2) as items:
        for item in items:
            if item == 9:
                raise RuntimeError("model failed")
    assert state["closed"]
    assert state["produced"] < 20
    assert _prefetch_threads() == []


def test_default_decode_workers_shares_the_cores_between_accelerators(monkeypatch) -> None:
    monkeypatch.setattr("tasks.data.prefetch.available_cores", lambda: 16)
    assert default_decode_workers(1) == 8  # capped
    assert default_decode_workers(4) == 4
    assert default_decode_workers(32) == 1
