"""Per-subject status records: how a broken scan becomes a finding, not a crash.

Each per-subject stage writes one JSON record next to its outputs::

    {"stage": "register", "status": "ok", "reason": "", "findings": [],
     "metrics": {...}, "warnings": [...], "elapsed_s": 3.2}

``status`` is ``ok``, ``failed`` or ``no_series``. A stage whose upstream
record is not ``ok`` does not run: it copies the upstream status and reason and
leaves no image at all (no file that looks like an image without being one:
pipelines glob a curated folder for images); the records are the stage's
Snakemake outputs, and the report lists the subject with its reason. An exception
inside a stage is caught, its traceback logged, and recorded as ``failed``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

log = logging.getLogger(__name__)
T = TypeVar("T")

OK = "ok"
FAILED = "failed"
NO_SERIES = "no_series"
STATUSES = (OK, FAILED, NO_SERIES)

#: Run stages in a forked child (see :func:`run_stage`). Fork is safe in a rule's fresh
#: script process, which has only imported the libraries; a long-lived process that has
#: already run OpenMP or ITK thread pools (a test session) can deadlock in the child,
#: so the unit tests set this to False for their own process.
FORK_STAGES = True
#: prctl(2) option: the signal a process gets when its parent ends.
PR_SET_PDEATHSIG = 1
#: mallopt(3) parameters of glibc.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


class StageError(Exception):
    """A data problem that ends a stage with a status and a short reason."""

    def __init__(self, reason: str, *, status: str = FAILED) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def temporary_sibling(target: Path) -> tuple[int, str]:
    """A new temporary file next to ``target`` (open fd, path) for an atomic rename.

    mkstemp makes files private (0600); outputs get the usual ``0666 & ~umask``
    so that a group sharing an audit can read it.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    target = Path(path)
    fd, tmp = temporary_sibling(target)
    with os.fdopen(fd, "w") as handle:
        json.dump(_jsonable(data), handle, indent=2, sort_keys=False)
        handle.write("\n")
    os.replace(tmp, target)


def read_record(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def make_record(
    stage: str,
    *,
    status: str = OK,
    reason: str = "",
    findings: Iterable[str] = (),
    metrics: dict[str, Any] | None = None,
    warnings: Iterable[str] = (),
    **extra: Any,
) -> dict[str, Any]:
    if status not in STATUSES:
        message = f"status must be one of {STATUSES}, got {status!r}"
        raise ValueError(message)
    record: dict[str, Any] = {
        "stage": stage,
        "status": status,
        "reason": reason,
        "findings": list(findings),
        "metrics": dict(metrics or {}),
        "warnings": list(warnings),
    }
    record.update(extra)
    return record


def remove_images(paths: Iterable[str | Path]) -> None:
    """Delete images a stage did not make this time (stale from an earlier run, or left
    half-written by a failure): a subject's folder holds only images that are results."""
    for path in paths:
        Path(path).unlink(missing_ok=True)


def upstream_problem(records: Iterable[str | Path]) -> dict[str, Any] | None:
    """The first upstream record that is not ``ok``, or None."""
    for path in records:
        record = read_record(path)
        if record.get("status") != OK:
            return record
    return None


def _attempt(stage: str, work: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """``work()``'s record, any exception turned into one; and the error to log."""
    try:
        return work(), ""
    except StageError as error:
        return make_record(stage, status=error.status, reason=error.reason), error.reason
    except Exception as error:
        reason = f"{stage}: {type(error).__name__}: {error}"
        failed = make_record(stage, status=FAILED, reason=reason[:300])
        return failed, f"failed:\n{traceback.format_exc()}"


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


def _attempt_in_child(stage: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """:func:`_attempt` in a forked child, so a native crash (a segfault in ITK,
    an abort in a codec) becomes a ``failed`` record instead of killing the job,
    which would cost the whole cohort its report.

    Fork, not spawn: ``work`` is a closure. The parent has only imported the
    libraries, so the child starts clean (CUDA is first touched inside ``work``).
    The error is logged by the parent, so it reaches the parent's handlers.
    """
    reader, writer = os.pipe()

    def send_outcome() -> None:
        os.close(reader)
        record, error = _attempt(stage, work)
        payload = json.dumps({"record": _jsonable(record), "error": error}).encode()
        with os.fdopen(writer, "wb") as pipe:
            pipe.write(payload)

    pid = _fork(send_outcome, what=stage)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        payload = pipe.read()
    _, wait_status, usage = os.wait4(pid, 0)
    # What the stage's process cost: CPU seconds and peak resident memory (MB, Linux KiB units).
    cost = {
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
    }
    if payload:
        outcome = json.loads(payload)
        if outcome["error"]:
            log.error("%s: %s", stage, outcome["error"])
        return outcome["record"] | cost
    how = _wait_status_text(wait_status)
    log.error("%s: the stage process %s before writing its record", stage, how)
    return make_record(stage, status=FAILED, reason=f"{stage}: crashed ({how})") | cost


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


def run_stage(
    stage: str,
    work: Callable[[], dict[str, Any]],
    *,
    record_path: str | Path,
    image_outputs: Iterable[str | Path] = (),
    upstream: Iterable[str | Path] = (),
    isolate: bool | None = None,
) -> dict[str, Any]:
    """Run one per-subject stage with fault isolation and write its record.

    ``work`` does the stage and returns ``make_record(stage, ...)``; it must
    write ``image_outputs`` itself. With ``isolate`` (default
    :data:`FORK_STAGES`) it runs in a forked child process (its return value
    crosses back as JSON; side effects other than files are lost).
    When an upstream record is not ``ok`` (or unreadable) the work is skipped.
    When ``work`` raises, or its process dies (segfault, abort), the error
    becomes a ``failed`` record (``StageError`` carries its own status and
    reason) and its traceback goes to the log, so the step never fails the run
    for a data problem. ``image_outputs`` of an earlier run are deleted first,
    and those of a stage that does not end ``ok`` are deleted after it: only the
    record is certain to exist.
    """
    image_outputs = [Path(p) for p in image_outputs]
    remove_images(image_outputs)
    for path in image_outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
    keep_freed_memory()
    start = time.perf_counter()
    try:
        problem = upstream_problem(upstream)
    except (OSError, ValueError) as error:
        problem = {"status": FAILED, "reason": f"upstream record unreadable: {error}"}
    if problem is not None:
        status = problem.get("status")
        record = make_record(
            stage,
            status=status if status in (FAILED, NO_SERIES) else FAILED,
            reason=problem.get("reason", ""),
            skipped=True,
        )
        log.info("%s skipped: upstream %s (%s)", stage, status, record["reason"])
    else:
        if FORK_STAGES if isolate is None else isolate:
            record = _attempt_in_child(stage, work)
        else:
            before = resource.getrusage(resource.RUSAGE_SELF)
            record, error = _attempt(stage, work)
            if error:
                log.error("%s: %s", stage, error)
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            # In-process: the peak is this process's so far (MB).
            record |= {"cpu_s": round(cpu, 3), "peak_rss_mb": round(after.ru_maxrss / 1024, 1)}
    if record["status"] != OK:
        # A failed stage may have left a partial image: no half-written file is ever
        # mistaken for a result.
        remove_images(image_outputs)
    record["elapsed_s"] = round(time.perf_counter() - start, 3)
    write_json(record_path, record)
    return record


def setup_logging(log_file: str | Path | None) -> None:
    """Log to the rule's log file (and stderr), as every script does first."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
