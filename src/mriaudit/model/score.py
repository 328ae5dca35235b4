"""Scoring: the score job, from registered images to voxel anomaly maps and subject scores.

A subject's normalised, cropped volume is reconstructed (by the network of the
checkpoint's method, :mod:`mriaudit.model.methods`) by the
fold model that did not train on it (reference subjects) or by each of the K
fold models (everyone else). :mod:`mriaudit.model.maps` turns volume and
reconstruction into the raw map (tolerant intensity residual and ``1 - SSIM``),
calibrates it against the out-of-fold maps of reference subjects (voxelwise
median subtracted, divided by a smoothed robust spread, so edges that every
subject reconstructs poorly do not dominate), median filters it inside the
eroded template brain mask and summarises it; all on the worker's device.
Higher map values and scores are more anomalous.

The score job (:func:`score_cohort`) runs worker processes, one per thread on
the CPU and one per GPU. Each loads the checkpoint and builds its fold models
once (:class:`mriaudit.model.scorer.Scorer`). A GPU worker's CPU threads read
and standardise the next subjects and write the finished ones' maps, pictures
and records while the GPU computes (:mod:`mriaudit.model.pipeline`), several
subjects sharing each forward pass and each filter.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from mriaudit import derivatives, isolation, paths, records
from mriaudit.model import pipeline
from mriaudit.model.scorer import STAGE, Scorer
from mriaudit.records import make_record, run_stage
from mriaudit.tables import read_tsv, write_tsv

log = logging.getLogger(__name__)

#: Columns of the model's score table (``paths.model_scores``, ``model/anomaly_scores.tsv``).
SCORE_TABLE_COLUMNS = (
    "bids_id",
    "status",
    "reason",
    "anomaly_raw",
    "fold",
    "in_reference",
    "elapsed_s",
)

DEFAULT_SCORING: dict[str, Any] = {
    # Misregistration tolerance in voxels: the intensity residual is the distance
    # of x(p) to the range of x_hat over p's (2t+1)^3 neighbourhood, so an edge
    # displaced by up to t voxels leaves no residual but a lesion's interior does.
    "tolerance": 1,
    # Weight of 1 - SSIM against the absolute intensity residual.
    "ssim_weight": 0.5,
    # Gaussian window of the local SSIM, in voxels.
    "ssim_sigma": 1.0,
    # Side of the cubic median filter, in voxels.
    "median_size": 3,
    # Erosion of the template brain mask, in voxels: the brain edge after an
    # affine registration differs between subjects by a few mm.
    "erode_voxels": 2,
    # Focal summaries: peaks of the map smoothed with these Gaussians, in voxels (6, 9
    # and 12 mm on the 2 mm grid), matched to lesions of 5-25 mm radius. The normal
    # residual peaks of real anatomy are sharp: a held-out person's own sulci and
    # temporal poles reached focal z 3-5 at a 3 mm scale (real-head benchmark, leave one
    # person out), as high as a 14 mm lesion, and were back at z <= 2 from 6 mm on.
    "focal_sigmas": (3.0, 4.5, 6.0),
    # Focal summary per scale: "contrast", the peak's height above the subject's own
    # map (median and MAD inside the mask), or "peak", the height itself (older
    # checkpoints). A real person unlike the training heads raises the whole map, a
    # lesion one place: on real heads the peaks of normal people overlapped a 9 mm
    # lesion's, their contrasts did not.
    "focal_summary": "contrast",
    # The contrast's smallest spread per scale, as a fraction of the median spread of
    # the model's reference maps: some FLAIR maps came out almost empty (spread 0.03),
    # and an ordinary peak over that spread ranked a normal FLAIR above a 5.6 mm lesion.
    "contrast_floor_fraction": 0.5,
    # Regions: connected voxels above this percentile of the map inside the mask.
    "region_percentile": 99.5,
    # Floor of the calibration spread, as a fraction of its median in the mask.
    "spread_floor": 0.5,
}


#: Score through the read-ahead/write-behind pipeline on the CPU too. Off: there every
#: core runs a worker already, and threads beside it only compete with the others (5 %
#: more CPU time per subject on 2 cores). The tests turn it on to run the GPU's path.
PIPELINE_ON_CPU = False


def score_one(
    scorer: Scorer | None,
    image: Path,
    *,
    subject: str,
    out_map: Path,
    record_path: Path,
    upstream: Sequence[Path],
    out_thumbnail: Path | None = None,
    isolate: bool | None = None,
) -> dict:
    """Score one subject with a loaded model: its map and record (see :func:`score_subject`).

    ``scorer`` may be None for a subject whose upstream record is not ok (its
    record copies the upstream's status; nothing is scored).
    """
    image, out_map = Path(image), Path(out_map)
    return run_stage(
        STAGE,
        lambda: scorer.score(image, subject, out_map, out_thumbnail),
        record_path=record_path,
        image_outputs=[out_map, *([out_thumbnail] if out_thumbnail else [])],
        upstream=upstream,
        isolate=isolate,
    )


def score_subject(
    image: Path,
    *,
    checkpoint: Path,
    subject: str,
    out_map: Path,
    record_path: Path,
    upstream: Sequence[Path],
    device: str = "auto",
    threads: int = 1,
    method: str | None = None,
) -> dict:
    """Stage ``score`` of one subject: write the voxel anomaly map and the subject's record.

    Given ``method`` (config ``model.method``), a checkpoint trained with another
    method is refused: the subject is ``not_scored`` with that reason.

    ``image`` is the registered image on the template grid; ``subject`` the
    BIDS id that the checkpoint's fold assignment uses. The map (float32,
    template grid and affine) is 0 outside the eroded brain mask. Record
    metrics: ``anomaly_raw`` (higher = more anomalous; None when the model
    could not be trained); extras ``fold``, ``in_reference`` and
    ``top_regions`` (see :func:`mriaudit.model.maps.top_regions`).
    """

    def work() -> dict:
        scorer = Scorer.load(Path(checkpoint), device=device, threads=threads, method=method)
        return scorer.score(Path(image), subject, Path(out_map))

    return run_stage(
        STAGE, work, record_path=record_path, image_outputs=[out_map], upstream=upstream
    )


@dataclass(frozen=True)
class _Job:
    """One subject of the score job: its image, outputs, record and upstream record."""

    bids_id: str
    image: Path
    out_map: Path
    out_thumbnail: Path
    record_path: Path
    upstream: tuple[Path, ...]
    contrast: str = "T1w"

    @property
    def map_name(self) -> str:
        """The map's name in ``paths.subject_images`` (its sidecar's key)."""
        return "anomaly_map" if self.contrast == "T1w" else f"{self.contrast}_anomaly_map"

    @classmethod
    def of(cls, out_dir: Path, bids_id: str, *, resolution: int, contrast: str = "T1w") -> _Job:
        """The T1w's job, or that of another ``contrast``'s model (its image on the
        template grid, its map, picture and record; upstream its ``contrast`` record)."""
        if contrast == "T1w":
            image = paths.preproc(out_dir, bids_id, res=resolution)
            record = paths.record(out_dir, bids_id, STAGE)
            upstream = paths.record(out_dir, bids_id, "register")
        else:
            image = paths.contrast_preproc(out_dir, bids_id, contrast, res=resolution)
            record = paths.contrast_score_record(out_dir, bids_id, contrast)
            upstream = paths.contrast_record(out_dir, bids_id, contrast)
        return cls(
            bids_id,
            image,
            paths.anomaly_map(out_dir, bids_id, res=resolution, contrast=contrast),
            paths.anomaly_thumbnail(out_dir, bids_id, contrast=contrast),
            record,
            (upstream,),
            contrast,
        )

    def run(self, scorer: Scorer | None) -> dict:
        """Score this subject alone (see :func:`score_one`), in this process."""
        return score_one(
            scorer,
            self.image,
            subject=self.bids_id,
            out_map=self.out_map,
            out_thumbnail=self.out_thumbnail,
            record_path=self.record_path,
            upstream=self.upstream,
            isolate=False,
        )


def _score_pipelined(
    scorer: Scorer, jobs: Sequence[_Job], *, out_dir: Path, resolution: int, helpers: int
) -> None:
    """Score ``jobs`` through :func:`pipeline.run`: ``helpers`` threads read ahead and one
    writes behind while the device computes batches of ``scorer.batch_subjects``.

    One writer: ``files.atomic_path`` (records, pictures, sidecars) reads the
    umask by setting it and back, which two threads can interleave and leave
    the process with umask 0 (files writable by all).
    """

    def finish(outcome: pipeline.Outcome[_Job]) -> None:
        job = outcome.item

        def work() -> dict:
            if outcome.error is not None:
                raise outcome.error
            return scorer.record(
                outcome.prepared,
                outcome.result,
                out_map=job.out_map,
                out_thumbnail=job.out_thumbnail,
            )

        wall, cpu = time.perf_counter(), time.thread_time()
        record = run_stage(
            STAGE,
            work,
            record_path=job.record_path,
            image_outputs=[job.out_map, job.out_thumbnail],
            upstream=job.upstream,
            isolate=False,
        )
        # run_stage timed this last step, and counted every thread's CPU: the subject's
        # cost is its own steps' on the threads that did them, as one by one.
        record["elapsed_s"] = round(outcome.cost.wall_s + time.perf_counter() - wall, 3)
        record["cpu_s"] = round(outcome.cost.cpu_s + time.thread_time() - cpu, 3)
        records.write_json(job.record_path, record)
        derivatives.write_sidecars(out_dir, job.bids_id, res=resolution, only=(job.map_name,))

    pipeline.run(
        jobs,
        prepare=lambda job: scorer.prepare(job.image, job.bids_id),
        compute=scorer.compute,
        finish=finish,
        batch_size=scorer.batch_subjects,
        readers=helpers,
        writers=1,
    )


def _upstream_ok(upstream: Sequence[Path]) -> bool:
    """Whether the subject will be scored (an unreadable record: no, run_stage says why)."""
    try:
        return records.upstream_problem(upstream) is None
    except (OSError, ValueError):
        return False


def _uses_gpu(device: str) -> bool:
    """Whether the score job's workers will run on a GPU (checked without initialising
    CUDA, so the workers forked after it can use it)."""
    if device == "cpu":
        return False
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    return torch.cuda.is_available()


def _score_workers(device: str, threads: int) -> int:
    """Worker processes of a cohort's scoring: one per thread on the CPU, one per GPU."""
    return 1 if _uses_gpu(device) else max(1, threads)


def _selected(bids_ids: list[str], only: Sequence[str] | None, table: Path) -> list[str]:
    """The rows of the stage table to score: all, or those named in ``only``."""
    if only is None:
        return bids_ids
    wanted = {str(b) for b in only}
    unknown = sorted(wanted - set(bids_ids))
    if unknown:
        message = f"not in the stage table {table}: {', '.join(unknown[:5])}" + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        raise ValueError(message)
    return [b for b in bids_ids if b in wanted]


def score_cohort(
    stage_table: Path,
    *,
    checkpoint: Path,
    out_dir: Path,
    out_table: Path,
    resolution: int,
    device: str = "auto",
    threads: int = 1,
    only: Sequence[str] | None = None,
    method: str | None = None,
    contrast: str = "T1w",
) -> pd.DataFrame:
    """Stage ``score`` of every subject of ``stage_table`` (``aggregate.write_stage_table``),
    or of those of its ``bids_id``s in ``only`` (a shard of the cohort; an id that is
    not in the table raises ``ValueError``).

    ``resolution`` is the template grid (mm) the registered images were written on.

    The model is loaded and its fold networks built once per worker process.
    On the CPU ``threads`` workers of one torch thread each score their share
    of the subjects one at a time; on a GPU one worker scores them all,
    batches of subjects at a time, fed by ``threads`` CPU threads that read
    ahead and one that writes behind (:data:`PIPELINE_ON_CPU`). Each
    subject writes its map and record as :func:`score_subject` does (``paths``
    names them in ``out_dir``); its record's ``elapsed_s`` and ``cpu_s`` are
    its own share of the work. A worker that crashes costs only the subject
    that crashed it (``failed``, crashed): the other subjects a GPU worker had
    in flight are scored again one at a time by new workers, which pins the
    crash on its subject. Writes ``out_table`` (one row per scored subject, in
    the stage table's order: ``bids_id``, ``status``, ``reason``,
    ``anomaly_raw``, ``fold``, ``in_reference``, ``elapsed_s``) and returns it.
    Given ``method`` (config ``model.method``), a checkpoint of another method is
    refused: every subject is ``not_scored`` with that reason (see
    :meth:`Scorer.load`). ``contrast`` (``T2w``, ``FLAIR``) scores that contrast's
    images with its own model (``_Job.of``); the T1w's by default.
    """
    out_dir = Path(out_dir)
    # Labels are strings as written ("001", "NA" included), never numbers or NaN.
    stages = read_tsv(stage_table, text=True)
    bids_ids = _selected(stages["bids_id"].tolist(), only, Path(stage_table))
    workers = min(_score_workers(device, threads), max(1, len(bids_ids)))
    torch_threads = max(1, threads) if workers == 1 else 1
    helpers = max(1, threads // workers)
    pipelined = PIPELINE_ON_CPU or _uses_gpu(device)
    jobs = {b: _Job.of(out_dir, b, resolution=resolution, contrast=contrast) for b in bids_ids}

    def work(shard: Sequence[str], *, pipelined: bool) -> None:
        ready = []
        for bids_id in shard:
            job = jobs[bids_id]
            if _upstream_ok(job.upstream):
                ready.append(job)
            else:  # its record copies the upstream's status: nothing to load or score
                job.run(None)
                derivatives.write_sidecars(out_dir, bids_id, res=resolution, only=(job.map_name,))
        if not ready:
            return
        try:
            scorer = Scorer.load(
                Path(checkpoint), device=device, threads=torch_threads, method=method
            )
        except Exception as error:  # every subject of the shard gets the reason
            unusable(
                [job.bids_id for job in ready],
                f"{STAGE}: the model could not be loaded: {error}"[:300],
            )
            return
        if pipelined and scorer.trained:
            # As run_stage does for each subject, but before the first one is read.
            isolation.keep_freed_memory()
            _score_pipelined(scorer, ready, out_dir=out_dir, resolution=resolution, helpers=helpers)
            return
        for job in ready:
            job.run(scorer)
            derivatives.write_sidecars(out_dir, job.bids_id, res=resolution, only=(job.map_name,))

    def unusable(shard: Sequence[str], reason: str) -> None:
        log.error("%s", reason)
        for bids_id in shard:
            job = jobs[bids_id]
            if not job.record_path.exists():
                records.remove_images([job.out_map, job.out_thumbnail])
                records.write_json(
                    job.record_path, make_record(STAGE, status=records.FAILED, reason=reason)
                )

    def finished(bids_id: str) -> bool:
        return jobs[bids_id].record_path.exists()

    def crashed(bids_id: str, how: str) -> None:
        unusable([bids_id], f"{STAGE}: crashed ({how})")

    def in_flight(bids_id: str, how: str) -> None:
        log.warning("%s: in flight when a worker %s; it will be scored again", bids_id, how)

    # Records of an earlier, interrupted run must not count as done.
    for job in jobs.values():
        job.record_path.unlink(missing_ok=True)
    started = time.perf_counter()
    # A pipelined worker that dies takes the subjects it had in flight (read ahead, on
    # the device, being written) with it, and is blamed on the first of them: each is
    # left without a record and scored again below, one at a time.
    isolation.run_in_workers(
        bids_ids,
        lambda shard: work(shard, pipelined=pipelined),
        workers=workers,
        finished=finished,
        crashed=in_flight if pipelined else crashed,
    )
    again = [b for b in bids_ids if not finished(b)]
    if again:
        log.warning("scoring %d subject(s) again one at a time after a crash", len(again))
        isolation.run_in_workers(
            again,
            lambda shard: work(shard, pipelined=False),
            workers=min(workers, len(again)),
            finished=finished,
            crashed=crashed,
        )
    rows = []
    for bids_id in bids_ids:
        record = records.read_record(jobs[bids_id].record_path)
        rows.append(
            {
                "bids_id": bids_id,
                "status": record["status"],
                "reason": record.get("reason", ""),
                "anomaly_raw": record.get("metrics", {}).get("anomaly_raw"),
                "fold": record.get("fold"),
                "in_reference": record.get("in_reference", False),
                "elapsed_s": record.get("elapsed_s"),
            }
        )
    table = pd.DataFrame(rows, columns=SCORE_TABLE_COLUMNS)
    write_tsv(table, Path(out_table))
    elapsed = time.perf_counter() - started
    log.info(
        "scored %d subjects in %.1f s with %d worker(s) (%.2f s per subject)",
        len(bids_ids),
        elapsed,
        workers,
        elapsed / max(1, len(bids_ids)),
    )
    return table
