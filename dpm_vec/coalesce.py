"""Group commit for concurrent single requests: many callers, one engine pass.

An engine pass has a large fixed cost whatever the number of requests in it, so a
service that runs one pass per request wastes most of its time on overhead under load.
``Coalescer.submit`` lets concurrent callers share passes without adding any delay:

* no pass in flight: the caller runs a pass at once over what is queued (just its own
  item when it is alone, so a lone request's latency is unchanged);
* a pass in flight: the caller queues; when the pass ends, leadership passes to the
  first queued caller, whose thread runs one pass over everything queued (up to
  ``max_batch``), and so on. A thread only runs the pass that holds its own item.

Each caller gets its own slot of ``fn(items)``; if ``fn`` raises (or returns a list of
the wrong length), every caller of that batch gets the exception. Threading primitives
only: callers are the threads of the web server's threadpool.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any


class BatchSizeMismatch(RuntimeError):
    """``fn`` returned a list whose length is not the number of items it was given."""


class _Slot:
    """One caller's item and, once its pass ends, its result or error."""

    __slots__ = ("item", "result", "error", "done", "wake")

    def __init__(self, item: Any) -> None:
        self.item = item
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False  # False when woken: this caller now leads the next pass
        self.wake = threading.Event()


class Coalescer:
    """Run ``fn(list_of_items) -> list_of_results`` over concurrent ``submit`` calls.

    ``on_pass(n)`` (optional) is called after every pass with its number of items, and
    ``passes`` / ``items`` count passes and items; both for metrics.
    """

    def __init__(self, fn: Callable[[list], Sequence], max_batch: int = 64,
                 on_pass: Callable[[int], None] | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1; got {max_batch}")
        self._fn = fn
        self._max_batch = max_batch
        self._on_pass = on_pass
        self._lock = threading.Lock()
        self._queue: deque[_Slot] = deque()
        self._busy = False  # a pass is in flight, or leadership has been handed to a queued caller
        self.passes = 0
        self.items = 0

    @property
    def queued(self) -> int:
        """Callers waiting for a pass (not counting those in the pass in flight)."""
        with self._lock:
            return len(self._queue)

    def submit(self, item: Any) -> Any:
        """Return ``fn([..., item, ...])``'s slot for ``item``; re-raise its pass's error."""
        slot = _Slot(item)
        with self._lock:
            self._queue.append(slot)
            lead = not self._busy
            self._busy = True
        if not lead:
            slot.wake.wait()  # woken with our result, or handed leadership (our slot now heads the queue)
        if not slot.done:
            self._run_pass()
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _run_pass(self) -> None:
        """Run one pass over the head of the queue, then hand leadership on (or release it)."""
        with self._lock:
            batch = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
        try:
            results = self._fn([s.item for s in batch])
            if len(results) != len(batch):
                raise BatchSizeMismatch(f"batch function returned {len(results)} results for {len(batch)} items")
            for s, result in zip(batch, results):
                s.result = result
        except BaseException as exc:  # noqa: BLE001 - delivered to every caller of this batch
            for s in batch:
                s.error = exc
        finally:
            with self._lock:
                self.passes += 1
                self.items += len(batch)
                successor = self._queue[0] if self._queue else None
                if successor is None:
                    self._busy = False  # the next submit leads at once
            for s in batch:
                s.done = True
                s.wake.set()
            if successor is not None:
                successor.wake.set()  # its thread runs the next pass (busy stays set for it)
            if self._on_pass is not None:
                self._on_pass(len(batch))
