"""Process isolation: a scan that crashes a native library costs only itself.

A per-subject stage, and each worker of the score job, runs in a forked child
process. The child dies with its parent (``PR_SET_PDEATHSIG``), so a cancelled
job never goes on writing behind a rerun's back; the parent learns how the child
ended (``wait4``: exit code or signal, CPU seconds, peak resident memory), and
a child that died before reporting (a segfault in ITK, an abort in a codec) is
turned by the caller into a ``failed`` record. Fork, not spawn: the work is a
closure, and the parent has only imported the libraries, so the child starts
clean (CUDA is first touched inside the work).

This module holds the operating-system side only; ``records`` turns outcomes
into status records.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Run stages in a forked child (see :func:`run_stage`). Fork is safe in a rule's fresh
#: script process, which has only imported the libraries; a long-lived process that has
#: already run OpenMP or ITK thread pools (a test session) can deadlock in the child,
#: so the unit tests set this to False for their own process.
FORK_STAGES = True
#: True in the child process of ``chain.run_chain``, which is isolated already: its
#: stages run in it, one after the other, instead of each in a child of its own.
CHAINED = False
#: prctl(2) option: the signal a process gets when its parent ends.
PR_SET_PDEATHSIG = 1
#: mallopt(3) parameters of glibc.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def _die_with(parent: int) -> None:
    """Make this (forked) process get SIGKILL when ``parent`` ends (Linux), so a stage
    whose job was cancelled never goes on writing outputs behind a rerun's back."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent ended before the request took effect
        os._exit(1)


def _fork(body: Callable[[], None], *, what: str) -> int:
    """Run ``body`` in a forked child and return the child's pid (the parent goes on).

    The child dies with its parent (see :func:`_die_with`), flushes the log
    and leaves with ``os._exit`` (code 0, or 1 after logging an exception), so
    it never runs the parent's cleanup.
    """
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _die_with(parent)
            body()
            for handler in logging.getLogger().handlers:
                handler.flush()
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # say why in the rule log
            log.error("%s: the process failed:\n%s", what, traceback.format_exc())
            code = 1
        finally:
            os._exit(code)
    return pid


@dataclass(frozen=True)
class ChildOutcome:
    """How a forked child ended: ``result`` (None when it died before returning
    one), ``how`` it ended (for a reason text), and ``cost`` (``cpu_s`` and
    ``peak_rss_mb`` of the child, MB from Linux's KiB)."""

    result: Any
    how: str
    cost: dict[str, float]


def call_in_child(function: Callable[[], Any], *, what: str) -> ChildOutcome:
    """Call ``function`` in a forked child; its JSON-able return value crosses back by pipe."""
    return start_in_child(function, what=what)()


def start_in_child(function: Callable[[], Any], *, what: str) -> Callable[[], ChildOutcome]:
    """Start ``function`` in a forked child and return at once, while it runs.

    Returns ``finish``: it waits for the child and gives its :class:`ChildOutcome`,
    as :func:`call_in_child` does (call it exactly once).
    """
    reader, writer = os.pipe()

    def send_result() -> None:
        os.close(reader)
        payload = json.dumps({"result": function()}).encode()
        with os.fdopen(writer, "wb") as pipe:
            pipe.write(payload)

    pid = _fork(send_result, what=what)
    os.close(writer)

    def finish() -> ChildOutcome:
        with os.fdopen(reader, "rb") as pipe:
            payload = pipe.read()
        _, wait_status, usage = os.wait4(pid, 0)
        cost = {
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        }
        result = json.loads(payload)["result"] if payload else None
        return ChildOutcome(result=result, how=_wait_status_text(wait_status), cost=cost)

    return finish


def _wait_status_text(wait_status: int) -> str:
    if os.WIFSIGNALED(wait_status):
        return f"killed by {signal.Signals(os.WTERMSIG(wait_status)).name}"
    return f"exited with code {os.waitstatus_to_exitcode(wait_status)}"


def run_in_workers(
    items: Sequence[T],
    work: Callable[[Sequence[T]], None],
    *,
    workers: int,
    finished: Callable[[T], bool],
    crashed: Callable[[T, str], None],
) -> None:
    """Run ``work`` over ``items`` in up to ``workers`` forked processes, surviving crashes.

    Each worker gets every ``workers``-th item and handles them in order
    (``work`` catches a bad item's errors itself, as :func:`run_stage` does).
    When a worker dies, its first unfinished item is the one it was on: that
    item gets ``crashed(item, how)`` and the rest of its share goes to a new
    worker, so one scan that crashes a native library costs only itself.
    Without :data:`FORK_STAGES`, ``work`` runs here on all items.
    """
    pending = list(items)
    if not FORK_STAGES:
        work(pending)
        return
    while pending:
        shards = [pending[i :: max(1, workers)] for i in range(max(1, workers))]
        children: dict[int, list[T]] = {}
        for shard in (s for s in shards if s):
            children[_fork(partial(work, shard), what="worker")] = shard
        pending = []
        for pid, shard in children.items():
            _, wait_status = os.waitpid(pid, 0)
            left = [item for item in shard if not finished(item)]
            if left:  # the worker ended early: the item it was on is the culprit
                how = _wait_status_text(wait_status)
                log.error(
                    "a worker %s on %s; %d item(s) go to a new one", how, left[0], len(left) - 1
                )
                crashed(left[0], how)
                pending += left[1:]


def keep_freed_memory() -> bool:
    """Make glibc keep and reuse the memory this process frees.

    A stage makes and drops hundreds of arrays of 1-30 MB. By default glibc
    maps each one fresh from the kernel and unmaps it when freed, so every
    array pays its page faults anew; on a virtual machine whose host backs guest
    memory lazily that is half of a stage's time (the IQMs of a 1 mm head: 9 s
    with the defaults, 5 s with this, on the project's machine). Here every
    block comes from the heap, and freed heap memory is not trimmed, so it is
    reused until the process ends. Returns False (and changes nothing) where
    the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = (
        (_M_MMAP_MAX, 0),
        (_M_TRIM_THRESHOLD, 2**31 - 1),
        (_M_TOP_PAD, 256 * 1024 * 1024),
    )
    return all(
        mallopt(ctypes.c_int(option), ctypes.c_int(value)) == 1 for option, value in settings
    )
