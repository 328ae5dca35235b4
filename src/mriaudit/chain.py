"""Stages that depend on each other, run as one chain in one forked child.

Each stage of a chain (:class:`Step`) still writes its own record as it ends
(through ``records.run_stage``), later stages take what earlier ones left in
memory, and a crash costs the stage it hit and the ones after it, which could
not have run anyway (:func:`run_chain`). The chain's parent, idle otherwise,
compresses and writes the gzip files the stages hand it
(:func:`write_gzip_in_background`) while they go on.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mriaudit import files, isolation
from mriaudit.records import (
    FAILED,
    OK,
    _jsonable,
    make_record,
    read_record,
    remove_images,
    write_json,
)

log = logging.getLogger(__name__)

#: In the child process of :func:`run_chain`: the channel to its parent, which
#: writes the gzip files handed to it (:func:`write_gzip_in_background`).
_WRITER: socket.socket | None = None


@dataclass(frozen=True)
class Step:
    """One stage of a :func:`run_chain`: ``run`` runs it (through ``records.run_stage``,
    which writes its record to ``record_path``) and returns its record; ``image_outputs``
    are the images it writes, deleted when it crashes."""

    name: str
    run: Callable[[], dict[str, Any]]
    record_path: Path
    image_outputs: Sequence[Path] = ()


def in_chain() -> bool:
    """Whether this is :func:`run_chain`'s child (which may fork helpers of its stages)."""
    return isolation.CHAINED and isolation.FORK_STAGES


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
    exceptions caught by ``records.run_stage``). When the child dies (a segfault
    in ITK, an abort in a codec), the stage it was on gets a ``failed`` record
    (``crashed``) and loses its images, and the steps after it run here, where
    their upstream record skips them: a crash costs its stage and the stages
    that depend on it, as with one child per stage. Meanwhile this process
    writes the gzip files the stages hand it (:func:`write_gzip_in_background`);
    it returns once they are all written, the records matching them (see
    :func:`_settle_writes`). With ``isolate`` False (default: not
    ``isolation.FORK_STAGES``) the steps run in this process, and write their
    files themselves.
    """
    if not (isolation.FORK_STAGES if isolate is None else isolate) or isolation.CHAINED:
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
        global _WRITER  # this child's only, as is CHAINED
        isolation.CHAINED, _WRITER = True, child_channel
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
