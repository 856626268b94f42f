"""Coalescer (group commit) with a fake batch function.

The first pass is held open with an Event while other threads submit, so which callers
share which pass is deterministic. Every wait is bounded: a deadlock fails, never hangs.
"""
from __future__ import annotations

import random
import threading
import time

import pytest

from dpm_vec.coalesce import BatchSizeMismatch, Coalescer

TIMEOUT = 10.0


class Engine:
    """Fake ``fn``: records (thread name, items) per pass; returns [x * 10 ...].

    ``hold_first``: the first pass blocks until ``release`` is set. ``fail(call_no, items)``
    returning an exception makes that pass raise it; ``short`` drops the last result.
    """

    def __init__(self, hold_first: bool = False, fail=None, short: bool = False):
        self.calls: list[tuple[str, list]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.hold_first, self.fail, self.short = hold_first, fail, short

    def __call__(self, items: list) -> list:
        self.calls.append((threading.current_thread().name, list(items)))
        if len(self.calls) == 1 and self.hold_first:
            self.entered.set()
            if not self.release.wait(TIMEOUT):
                raise AssertionError("first pass was never released")
        if self.fail is not None:
            exc = self.fail(len(self.calls), items)
            if exc is not None:
                raise exc
        out = [x * 10 for x in items]
        return out[:-1] if self.short else out

    @property
    def batches(self) -> list[list]:
        return [items for _, items in self.calls]


class Caller(threading.Thread):
    """One submit on its own thread; keeps its result or exception."""

    def __init__(self, coalescer: Coalescer, item):
        super().__init__(name=f"caller-{item}", daemon=True)
        self.coalescer, self.item = coalescer, item
        self.result = self.error = None

    def run(self) -> None:
        try:
            self.result = self.coalescer.submit(self.item)
        except BaseException as exc:  # noqa: BLE001
            self.error = exc

    def finish(self) -> Caller:
        self.join(TIMEOUT)
        assert not self.is_alive(), f"{self.name} still waiting: deadlock"
        return self


def _submit(coalescer: Coalescer, item):
    """``coalescer.submit(item)`` on a thread, bounded: a caller stuck waiting fails the test."""
    caller = Caller(coalescer, item)
    caller.start()
    caller.finish()
    if caller.error is not None:
        raise caller.error
    return caller.result


def _wait_until(cond, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def _hold_first_pass(coalescer: Coalescer, engine: Engine, first_item, queued_items: list) -> tuple[Caller, list[Caller]]:
    """Start a pass over ``first_item`` and hold it open until every queued item waits."""
    first = Caller(coalescer, first_item)
    first.start()
    assert engine.entered.wait(TIMEOUT), "first pass never started"
    others = []
    for item in queued_items:
        caller = Caller(coalescer, item)
        caller.start()
        others.append(caller)
    _wait_until(lambda: coalescer.queued == len(queued_items), "callers to queue")
    assert engine.batches == [[first_item]]  # nobody ran while the pass was in flight
    return first, others


def test_lone_submit_runs_one_pass_of_one_item_on_the_callers_thread():
    engine = Engine()
    seen = []
    c = Coalescer(engine, max_batch=8, on_pass=seen.append)
    assert _submit(c, 3) == 30
    assert engine.calls == [("caller-3", [3])]
    assert (c.passes, c.items, seen, c.queued) == (1, 1, [1], 0)
    assert _submit(c, 4) == 40  # the in-flight flag was released: runs at once again
    assert engine.batches == [[3], [4]]


def test_callers_arriving_during_a_pass_share_exactly_one_next_pass():
    engine = Engine(hold_first=True)
    seen = []
    c = Coalescer(engine, max_batch=64, on_pass=seen.append)
    first, others = _hold_first_pass(c, engine, 1, [2, 3, 4, 5, 6])
    engine.release.set()
    for caller in [first, *others]:
        caller.finish()
        assert caller.error is None, caller.error
        assert caller.result == caller.item * 10  # each caller gets its own slot
    assert len(engine.calls) == 2
    runner, batch = engine.calls[1]
    assert sorted(batch) == [2, 3, 4, 5, 6]
    # leadership went to the first queued caller, whose thread ran the pass holding its item
    assert runner == f"caller-{batch[0]}"
    assert engine.calls[0][0] == "caller-1"
    assert (c.passes, c.items, seen) == (2, 6, [1, 5])


def test_max_batch_caps_a_pass_and_each_pass_runs_on_a_thread_it_serves():
    engine = Engine(hold_first=True)
    c = Coalescer(engine, max_batch=2)
    first, others = _hold_first_pass(c, engine, 0, [1, 2, 3, 4, 5])
    engine.release.set()
    for caller in [first, *others]:
        assert caller.finish().result == caller.item * 10
    assert [len(b) for b in engine.batches] == [1, 2, 2, 1]
    assert sorted(x for b in engine.batches for x in b) == [0, 1, 2, 3, 4, 5]
    for runner, batch in engine.calls:
        assert runner == f"caller-{batch[0]}"  # no thread drains the queue for others
    assert (c.passes, c.items) == (4, 6)


def test_an_exception_reaches_every_caller_of_its_batch_only_and_later_submits_work():
    boom = ValueError("engine broke")
    engine = Engine(hold_first=True, fail=lambda n, items: boom if n == 2 else None)
    c = Coalescer(engine, max_batch=64)
    first, others = _hold_first_pass(c, engine, 1, [2, 3, 4])
    engine.release.set()
    assert first.finish().error is None and first.result == 10
    for caller in others:
        assert caller.finish().error is boom
        assert caller.result is None
    assert c.queued == 0
    assert _submit(c, 7) == 70  # not deadlocked: the in-flight flag was released
    assert engine.batches[-1] == [7]
    assert c.passes == 3


def test_a_lone_failing_pass_raises_to_its_caller_and_releases_the_flag():
    engine = Engine(fail=lambda n, items: KeyError("x") if n == 1 else None)
    c = Coalescer(engine)
    with pytest.raises(KeyError):
        _submit(c, 1)
    assert _submit(c, 2) == 20
    assert c.passes == 2


def test_a_length_mismatch_is_an_error_for_the_whole_batch():
    engine = Engine(hold_first=True, short=True)
    c = Coalescer(engine, max_batch=64)
    first, others = _hold_first_pass(c, engine, 1, [2, 3])
    engine.release.set()
    for caller in [first, *others]:
        assert isinstance(caller.finish().error, BatchSizeMismatch), caller.error
    engine.short = False
    assert _submit(c, 4) == 40


def test_max_batch_one_still_serves_everyone():
    engine = Engine(hold_first=True)
    c = Coalescer(engine, max_batch=1)
    first, others = _hold_first_pass(c, engine, 0, [1, 2, 3])
    engine.release.set()
    for caller in [first, *others]:
        assert caller.finish().result == caller.item * 10
    assert [len(b) for b in engine.batches] == [1, 1, 1, 1]


def test_max_batch_must_be_positive():
    with pytest.raises(ValueError):
        Coalescer(Engine(), max_batch=0)


def test_many_threads_each_get_their_own_result():
    """Unsynchronised load: every submit answered with its own slot, counts add up."""
    lock = threading.Lock()
    in_flight = [0, 0]  # current, most ever

    def fn(items):
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])
        time.sleep(random.uniform(0, 0.002))
        with lock:
            in_flight[0] -= 1
        return [("r", x) for x in items]

    c = Coalescer(fn, max_batch=8)
    errors = []

    def worker(t: int) -> None:
        for i in range(50):
            item = (t, i)
            if c.submit(item) != ("r", item):
                errors.append(item)

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 3)
        assert not t.is_alive(), "deadlock"
    assert errors == []
    assert c.items == 16 * 50 and 1 <= c.passes <= 16 * 50
    assert in_flight[1] == 1  # never two passes at once
    assert c.queued == 0
