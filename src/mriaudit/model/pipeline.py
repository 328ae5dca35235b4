"""A read-ahead, write-behind pipeline around a device: the CPUs keep the device busy.

Items flow through three steps:

1. ``prepare(item)`` in reader threads (reading, decoding, normalising: CPU and
   file work), started up to ``ahead`` items before the device needs them;
2. ``compute(prepared items)`` in the calling thread, in batches of up to
   ``batch_size`` (the device's work: one batch per forward pass);
3. ``finish(outcome)`` in writer threads (writing outputs and records), while
   the device computes the next batch.

An exception in ``prepare`` or ``compute`` belongs to its item: it travels in
the item's :class:`Outcome` to ``finish``, which records it; when a batch of
several items fails, each is computed again alone so that only the item that
fails carries the error. An exception in ``finish`` ends the pipeline (raised
here). Each outcome carries the wall and CPU seconds spent on its item in
steps 1 and 2 (a batch's cost shared among its items; CPU seconds of the
threads that did the work, ``time.thread_time``), so ``finish`` can report a
per-item cost as a sequential run would.

Items in flight when the process dies are lost together; the caller learns
which ones from their missing outputs (see ``score.score_cohort``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass
class Cost:
    """Seconds spent on one item: ``wall_s`` (wall clock) and ``cpu_s`` (CPU of the
    threads that worked on it)."""

    wall_s: float = 0.0
    cpu_s: float = 0.0

    def add(self, wall_s: float, cpu_s: float) -> None:
        self.wall_s += wall_s
        self.cpu_s += cpu_s


@dataclass
class Outcome(Generic[T]):
    """One item's way through the pipeline: its ``prepared`` value, the device's
    ``result``, or the ``error`` that stopped it, and its ``cost`` so far."""

    item: T
    prepared: Any = None
    result: Any = None
    error: BaseException | None = None
    cost: Cost = field(default_factory=Cost)


def _prepare(prepare: Callable[[T], Any], item: T) -> Outcome[T]:
    outcome = Outcome(item)
    wall, cpu = time.perf_counter(), time.thread_time()
    try:
        outcome.prepared = prepare(item)
    except Exception as error:  # the item's own problem: its finish records it
        outcome.error = error
    outcome.cost.add(time.perf_counter() - wall, time.thread_time() - cpu)
    return outcome


def _compute(compute: Callable[[list[Any]], Sequence[Any]], batch: list[Outcome]) -> None:
    wall, cpu = time.perf_counter(), time.thread_time()
    try:
        results = compute([outcome.prepared for outcome in batch])
    except Exception as error:
        if len(batch) > 1:  # which one? each alone, so only the culprit fails
            for outcome in batch:
                _compute(compute, [outcome])
            return
        batch[0].error = error
    else:
        for outcome, result in zip(batch, results, strict=True):
            outcome.result = result
    share = len(batch)
    for outcome in batch:
        outcome.cost.add((time.perf_counter() - wall) / share, (time.thread_time() - cpu) / share)


def run(
    items: Iterable[T],
    *,
    prepare: Callable[[T], Any],
    compute: Callable[[list[Any]], Sequence[Any]],
    finish: Callable[[Outcome[T]], None],
    batch_size: int = 1,
    readers: int = 1,
    writers: int = 1,
    ahead: int | None = None,
) -> None:
    """Run every item through ``prepare``, ``compute`` and ``finish`` (see the module).

    ``compute`` gets a list of prepared values and returns one result per value,
    in order. ``ahead`` (default ``2 * batch_size + readers``) bounds the items
    read but not yet computed, and as many finished items may wait for a
    writer: memory stays bounded whatever the number of items. Items are
    computed in their order; ``finish`` may complete out of order.
    """
    ahead = max(1, ahead if ahead is not None else 2 * batch_size + readers)
    batch_size = max(1, batch_size)
    pending = iter(items)
    reads: deque[Future[Outcome[T]]] = deque()
    writes: deque[Future[None]] = deque()
    with (
        ThreadPoolExecutor(max(1, readers), thread_name_prefix="prepare") as read_pool,
        ThreadPoolExecutor(max(1, writers), thread_name_prefix="finish") as write_pool,
    ):

        def read_ahead() -> None:
            while len(reads) < ahead:
                try:
                    item = next(pending)
                except StopIteration:
                    return
                reads.append(read_pool.submit(_prepare, prepare, item))

        def write_behind(outcome: Outcome[T]) -> None:
            writes.append(write_pool.submit(finish, outcome))
            while len(writes) > ahead or (writes and writes[0].done()):
                writes.popleft().result()  # raises what finish raised

        read_ahead()
        batch: list[Outcome[T]] = []
        while reads:
            outcome = reads.popleft().result()
            read_ahead()
            if outcome.error is not None:
                write_behind(outcome)
            else:
                batch.append(outcome)
            if batch and (len(batch) >= batch_size or not reads):
                _compute(compute, batch)
                for done in batch:
                    write_behind(done)
                batch = []
        while writes:
            writes.popleft().result()
