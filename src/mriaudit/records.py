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
as one chain in one child (``chain.run_chain``), each still with its own record.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mriaudit import files, isolation

log = logging.getLogger(__name__)

OK = "ok"
FAILED = "failed"
NO_SERIES = "no_series"
STATUSES = (OK, FAILED, NO_SERIES)


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
    ``isolation.FORK_STAGES``, but False inside ``chain.run_chain``'s child) it runs
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
            isolate = isolation.FORK_STAGES and not isolation.CHAINED
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
