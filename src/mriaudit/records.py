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

A stage runs in a forked child (``isolation``), so that a native crash costs
only that stage. Stages that depend on each other one after the other can run
as one chain in one child (:func:`run_chain`): each still writes its own record
as it ends, later stages take what earlier ones left in memory, and a crash
costs the stage it hit and the ones after it, which could not have run anyway.
The chain's parent, idle otherwise, compresses and writes the gzip files the
stages hand it (:func:`write_gzip_in_background`) while they go on.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import math
import os
import resource
import shutil
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np

from mriaudit import files, isolation

log = logging.getLogger(__name__)
T = TypeVar("T")

OK = "ok"
FAILED = "failed"
NO_SERIES = "no_series"
STATUSES = (OK, FAILED, NO_SERIES)
#: True in the child process of :func:`run_chain`, which is isolated already: its
#: stages run in it, one after the other, instead of each in a child of its own.
_CHAINED = False
#: In the child process of :func:`run_chain`: the channel to its parent, which
#: writes the gzip files handed to it (:func:`write_gzip_in_background`).
_WRITER: socket.socket | None = None


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


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write a record (numpy values and non-finite floats converted) as indented JSON, atomically."""
    files.write_text(path, json.dumps(_jsonable(data), indent=2) + "\n")


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
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # none to remove
            Path(path).unlink()


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


def _attempt_in_child(stage: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """:func:`_attempt` in a forked child (``isolation.call_in_child``), so a native
    crash (a segfault in ITK, an abort in a codec) becomes a ``failed`` record
    instead of killing the job, which would cost the whole cohort its report.

    The error is logged by the parent, so it reaches the parent's handlers.
    """

    def attempt() -> dict[str, Any]:
        record, error = _attempt(stage, work)
        return {"record": _jsonable(record), "error": error}

    outcome = isolation.call_in_child(attempt, what=stage)
    if outcome.result is not None:
        if outcome.result["error"]:
            log.error("%s: %s", stage, outcome.result["error"])
        return outcome.result["record"] | outcome.cost
    log.error("%s: the stage process %s before writing its record", stage, outcome.how)
    reason = f"{stage}: crashed ({outcome.how})"
    return make_record(stage, status=FAILED, reason=reason) | outcome.cost


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
    ``isolation.FORK_STAGES``, but False inside :func:`run_chain`'s child) it runs
    in a forked child process (its return value crosses back as JSON; side effects
    other than files are lost); in this process, the record's ``cpu_s`` counts the
    children the stage waited for, and its ``peak_rss_mb`` is this process's peak
    during the stage (where Linux can reset it; else its peak so far).
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
    isolation.keep_freed_memory()
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
        if isolate is None:
            isolate = isolation.FORK_STAGES and not _CHAINED
        if isolate:
            record = _attempt_in_child(stage, work)
        else:
            _reset_peak_rss()
            before = _cpu_seconds()
            record, error = _attempt(stage, work)
            if error:
                log.error("%s: %s", stage, error)
            cpu = _cpu_seconds() - before
            after = resource.getrusage(resource.RUSAGE_SELF)
            record |= {"cpu_s": round(cpu, 3), "peak_rss_mb": _peak_rss_mb(after)}
    if record["status"] != OK:
        # A failed stage may have left a partial image: no half-written file is ever
        # mistaken for a result.
        remove_images(image_outputs)
    record["elapsed_s"] = round(time.perf_counter() - start, 3)
    write_json(record_path, record)
    return record


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of the children it has waited
    for (a stage's converter, the IQMs' child), as a forked stage's ``wait4`` counts."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _reset_peak_rss() -> None:
    """Start this process's peak resident memory afresh (Linux: ``/proc/self/clear_refs``)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mb(usage: resource.struct_rusage) -> float:
    """This process's peak resident memory (MB) since :func:`_reset_peak_rss`, or ever."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(usage.ru_maxrss / 1024, 1)


@dataclass(frozen=True)
class Step:
    """One stage of a :func:`run_chain`: ``run`` runs it (through :func:`run_stage`, which
    writes its record to ``record_path``) and returns its record; ``image_outputs`` are
    the images it writes, deleted when it crashes."""

    name: str
    run: Callable[[], dict[str, Any]]
    record_path: Path
    image_outputs: Sequence[Path] = ()


def in_chain() -> bool:
    """Whether this is :func:`run_chain`'s child (which may fork helpers of its stages)."""
    return _CHAINED and isolation.FORK_STAGES


def writes_in_background() -> bool:
    """Whether :func:`write_gzip_in_background` can be used: in :func:`run_chain`'s child
    (on Linux: it hands the content over as a memory file)."""
    return _WRITER is not None


def write_gzip_in_background(
    path: str | Path, fill: Callable[[IO[bytes]], Any], *, level: int
) -> None:
    """Have :func:`run_chain`'s parent write a gzip file (compression ``level``) while
    this child goes on: ``fill(stream)`` writes the uncompressed content here, into a
    memory file that the parent then owns, so the file is written even when this
    child crashes afterwards. The parent writes it atomically and turns a failure
    into a ``failed`` record of the stage that lists the file in its images. Only
    where :func:`writes_in_background`.
    """
    if _WRITER is None:
        message = "no background writer: only run_chain's child has one"
        raise RuntimeError(message)
    content = os.memfd_create(Path(path).name)
    try:
        with open(content, "wb", closefd=False) as stream:
            fill(stream)
        order = json.dumps({"path": str(path), "level": int(level)}).encode()
        socket.send_fds(_WRITER, [order], [content])
    finally:
        os.close(content)


def _write_handed_files(channel: socket.socket, written: dict[Path, str]) -> None:
    """Write the gzip files that run_chain's child hands over, in order, until it is gone.

    ``written`` gets each file's path and its error ("" when written).
    """
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(channel, 1 << 16, 1)
        except OSError as error:
            log.error("background writer: %s", error)
            return
        if not message:  # every copy of the child's end is closed
            return
        order = json.loads(message)
        path = Path(order["path"])
        try:
            with (
                open(fds[0], "rb") as content,
                files.atomic_path(path) as tmp,
                open(tmp, "wb") as raw,
                # No name in the gzip header and no time stamp, as nibabel writes them.
                gzip.GzipFile("", "wb", order["level"], fileobj=raw, mtime=0) as out,
            ):
                content.seek(0)
                shutil.copyfileobj(content, out, 1 << 22)
            written[path] = ""
        except Exception as error:  # the stage's failure, not the job's (see _settle_writes)
            written[path] = f"{type(error).__name__}: {error}"
            log.error("cannot write %s: %s", path, written[path])


def _settle_writes(
    steps: Sequence[Step], done: dict[str, dict[str, Any]], written: dict[Path, str]
) -> None:
    """Make the records say what is on disk once the background writes are over.

    A stage one of whose files could not be written fails (its images removed)
    and the stages after it are skipped with its reason, as if it had failed
    itself; a stage that did not end ``ok`` keeps no image (a file handed over
    before it failed is removed).
    """
    problem: dict[str, Any] | None = None
    for step in steps:
        record = done[step.name]
        errors = [
            f"{p.name}: {written[p]}" for p in map(Path, step.image_outputs) if written.get(p)
        ]
        if problem is not None:
            record = make_record(
                step.name, status=problem["status"], reason=problem["reason"], skipped=True
            )
        elif errors and record["status"] == OK:
            reason = f"{step.name}: cannot write {errors[0]}"[:300]
            costs = {k: record[k] for k in ("cpu_s", "peak_rss_mb", "elapsed_s") if k in record}
            record = problem = make_record(step.name, status=FAILED, reason=reason) | costs
        if record is not done[step.name]:
            done[step.name] = record
            write_json(step.record_path, record)
        if record["status"] != OK:
            remove_images(step.image_outputs)


def _writer_channel() -> tuple[socket.socket | None, socket.socket | None]:
    """The two ends of the channel of :func:`write_gzip_in_background`, or Nones where
    memory files or sequenced-packet sockets are missing (the stages then write)."""
    if not hasattr(os, "memfd_create"):
        return None, None
    try:
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except OSError as error:
        log.info("no background writer (%s): the stages write their files themselves", error)
        return None, None


def run_chain(
    steps: Sequence[Step], *, isolate: bool | None = None, what: str = "stages"
) -> dict[str, dict[str, Any]]:
    """Run ``steps`` one after the other in one forked child; their records by name.

    Each step is a stage that needs the ones before it (its ``upstream``), so it
    can take their results from memory: the child is one process for all of
    them. Each still writes its own record as it ends (cost and status its own,
    exceptions caught by :func:`run_stage`). When the child dies (a segfault in
    ITK, an abort in a codec), the stage it was on gets a ``failed`` record
    (``crashed``) and loses its images, and the steps after it run here, where
    their upstream record skips them: a crash costs its stage and the stages
    that depend on it, as with one child per stage. Meanwhile this process
    writes the gzip files the stages hand it (:func:`write_gzip_in_background`);
    it returns once they are all written, the records matching them (see
    :func:`_settle_writes`). With ``isolate`` False (default: not
    ``isolation.FORK_STAGES``) the steps run in this process, and write their
    files themselves.
    """
    if not (isolation.FORK_STAGES if isolate is None else isolate) or _CHAINED:
        return {step.name: step.run() for step in steps}
    progress, progress_end = os.pipe()
    written: dict[Path, str] = {}
    channel, child_channel = _writer_channel()
    writer = None
    if channel is not None:
        # Started before the fork, where it waits in recvmsg holding no lock.
        writer = threading.Thread(
            target=_write_handed_files, args=(channel, written), name="writer", daemon=True
        )
        writer.start()

    def run_all() -> dict[str, dict[str, Any]]:
        global _CHAINED, _WRITER  # this child's only
        _CHAINED, _WRITER = True, child_channel
        os.close(progress)
        if channel is not None:
            channel.close()
        done = {}
        for step in steps:
            done[step.name] = _jsonable(step.run())
            os.write(progress_end, f"{step.name}\n".encode())
        return done

    start = time.perf_counter()
    outcome = isolation.call_in_child(run_all, what=what)
    if writer is not None and channel is not None and child_channel is not None:
        child_channel.close()  # the child's copy is gone: the writer ends after the last file
        writer.join()
        channel.close()
    os.close(progress_end)
    os.set_blocking(progress, False)  # a stray grandchild may hold the pipe open
    chunks = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(progress, 4096):
            chunks.append(chunk)
    os.close(progress)
    finished = b"".join(chunks).decode().split()
    if outcome.result is not None:
        _settle_writes(steps, outcome.result, written)
        return outcome.result
    done = {
        name: read_record(step.record_path) for step in steps if (name := step.name) in finished
    }
    crashed = next((step for step in steps if step.name not in done), None)
    if crashed is None:  # every stage ended: the child died on its way out
        log.error("%s: the process %s after its last stage", what, outcome.how)
        _settle_writes(steps, done, written)
        return done
    log.error("%s: the stage process %s before writing its record", crashed.name, outcome.how)
    remove_images(crashed.image_outputs)
    cost = {
        "cpu_s": round(outcome.cost["cpu_s"] - sum(r.get("cpu_s", 0.0) for r in done.values()), 3),
        "peak_rss_mb": outcome.cost["peak_rss_mb"],
        "elapsed_s": round(
            time.perf_counter() - start - sum(r.get("elapsed_s", 0.0) for r in done.values()), 3
        ),
    }
    reason = f"{crashed.name}: crashed ({outcome.how})"
    done[crashed.name] = make_record(crashed.name, status=FAILED, reason=reason) | cost
    write_json(crashed.record_path, done[crashed.name])
    for step in steps[[s.name for s in steps].index(crashed.name) + 1 :]:
        done[step.name] = step.run()  # here, after the failed record: skipped
    _settle_writes(steps, done, written)
    return done


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
