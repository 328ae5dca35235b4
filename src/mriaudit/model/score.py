"""Scoring: voxel anomaly maps and subject anomaly scores.

A subject's normalised, cropped volume is reconstructed slice by slice by the
fold model that did not train on it (reference subjects) or by each of the K
fold models (everyone else). The raw voxel map combines

- the intensity residual ``|x - x_hat|`` (normalised intensity units) and
- a structural term ``1 - SSIM(x, x_hat)`` (local 3D SSIM, Gaussian window),

is calibrated against the out-of-fold maps of reference subjects (voxelwise
median subtracted, divided by a smoothed robust spread, so edges that every
subject reconstructs poorly do not dominate), median filtered and kept inside
the eroded template brain mask. Higher map values and scores are more
anomalous.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from mriaudit import derivatives, files, isolation, paths, records, thumbnails
from mriaudit.intensity import standardize_histogram
from mriaudit.model.data import (
    BrainGrid,
    ImageError,
    brain_grid,
    load_normalised,
    slice_inputs,
)
from mriaudit.model.device import resolve_device
from mriaudit.model.network import AtlasWarpNet, build_network
from mriaudit.records import OK, StageError, make_record, run_stage
from mriaudit.robust import mad_sd
from mriaudit.tables import read_tsv, write_tsv

log = logging.getLogger(__name__)

STAGE = "score"
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
    # Regions: connected voxels above this percentile of the map inside the mask.
    "region_percentile": 99.5,
    # Floor of the calibration spread, as a fraction of its median in the mask.
    "spread_floor": 0.5,
}


def reconstruct(
    model: AtlasWarpNet,
    volume: np.ndarray,
    *,
    device: torch.device,
    batch_size: int = 32,
) -> np.ndarray:
    """The model's normal-anatomy reconstruction of a cropped volume (X, Y, Z), float32."""
    model.eval()
    n_z = volume.shape[2]
    out = np.empty(volume.shape, dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, n_z, batch_size):
            z = np.arange(start, min(n_z, start + batch_size))
            x = torch.from_numpy(slice_inputs(volume, z, context=model.context)).to(device)
            y = model(x, torch.from_numpy(z).to(device))[:, 0].float().cpu().numpy()
            out[:, :, start : start + len(z)] = np.moveaxis(y, 0, 2)
    return out


def local_ssim(a: np.ndarray, b: np.ndarray, *, sigma: float) -> np.ndarray:
    """Local SSIM of two volumes in [0, ~1.5] intensity units, Gaussian window ``sigma`` voxels."""
    c1, c2 = 0.01**2, 0.03**2
    a = a.astype(np.float32)
    b = b.astype(np.float32)

    def blur(v: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(v, sigma, truncate=2.5)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    numerator = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    denominator = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return numerator / denominator


def tolerant_residual(volume: np.ndarray, recon: np.ndarray, *, tolerance: int) -> np.ndarray:
    """Distance (X, Y, Z) of each voxel of ``volume`` to the range of ``recon`` around it.

    With ``tolerance`` 0 this is ``|x - x_hat|``.
    """
    if tolerance <= 0:
        return np.abs(volume - recon)
    size = 2 * tolerance + 1
    high = ndimage.maximum_filter(recon, size=size)
    low = ndimage.minimum_filter(recon, size=size)
    return np.maximum(volume - high, 0.0) + np.maximum(low - volume, 0.0)


def raw_map(volume: np.ndarray, recon: np.ndarray, *, scoring: dict[str, Any]) -> np.ndarray:
    """Uncalibrated anomaly terms (2, X, Y, Z), float32, >= 0: the tolerant
    intensity residual and the structural term ``1 - SSIM``."""
    residual = tolerant_residual(volume, recon, tolerance=int(scoring.get("tolerance", 0)))
    structure = np.clip(1.0 - local_ssim(volume, recon, sigma=scoring["ssim_sigma"]), 0.0, 2.0)
    return np.stack([residual, structure]).astype(np.float32)


def scoring_mask(grid: BrainGrid, *, erode_voxels: int) -> np.ndarray:
    """Eroded template brain mask on the crop (bool, X, Y, Z)."""
    mask = grid.crop_mask
    if erode_voxels > 0:
        mask = ndimage.binary_erosion(mask, iterations=erode_voxels, border_value=1)
    return mask


def calibration_stats(maps: Sequence[np.ndarray], mask: np.ndarray, *, floor: float) -> dict:
    """Voxelwise median and robust spread of the raw terms of reference subjects.

    ``maps`` are (2, X, Y, Z) each. The spread (1.4826 * MAD) is smoothed
    (sigma 1.5 voxels: few subjects make it noisy) and floored, per term, at
    ``floor`` times the term's standard deviation over all subjects and voxels
    inside ``mask``. Returns ``{"median", "spread"}``,
    float16 tensors (2, X, Y, Z).
    """
    stack = np.stack(maps, axis=0).astype(np.float32)
    median = np.median(stack, axis=0)
    spread = mad_sd(stack, axis=0)
    spread = ndimage.gaussian_filter(spread, (0, 1.5, 1.5, 1.5))
    median = ndimage.gaussian_filter(median, (0, 0.5, 0.5, 0.5))
    for term in range(spread.shape[0]):
        # The tolerant residual is zero at most voxels, so a voxel's own spread can
        # be ~0; the floor is a fraction of the term's spread over the whole brain.
        values = stack[:, term][:, mask]
        base = float(np.std(values)) if values.size else 1.0
        spread[term] = np.maximum(spread[term], max(floor * base, 1e-3))
    return {
        "median": torch.from_numpy(median.astype(np.float16)),
        "spread": torch.from_numpy(spread.astype(np.float16)),
    }


def calibrated_map(
    raw: np.ndarray,
    calibration: dict,
    mask: np.ndarray,
    *,
    scoring: dict[str, Any],
) -> np.ndarray:
    """Anomaly map (X, Y, Z), >= 0, zero outside ``mask``.

    Each term becomes a robust z against the reference at that voxel (only the
    excess counts), then ``z_residual + ssim_weight * z_structure`` is median
    filtered. Units: robust standard deviations.
    """
    median = calibration["median"].float().numpy()
    spread = calibration["spread"].float().numpy()
    z = np.maximum((raw - median) / spread, 0.0)
    value = z[0] + float(scoring["ssim_weight"]) * z[1]
    value = np.where(mask, value, 0.0).astype(np.float32)
    size = int(scoring["median_size"])
    if size > 1:
        value = ndimage.median_filter(value, size=size, mode="constant")
    value[~mask] = 0.0
    return value


def focal_sigmas(scoring: dict[str, Any]) -> list[float]:
    """The focal scales of a checkpoint's scoring (one ``focal_sigma`` in older ones)."""
    sigmas = scoring.get("focal_sigmas")
    return [float(s) for s in sigmas] if sigmas else [float(scoring["focal_sigma"])]


#: Smallest spread of a subject's own smoothed map for the focal contrast (map units,
#: robust SD): normal maps spread 0.06-0.6, so only an almost empty map reaches it.
CONTRAST_FLOOR = 0.05


def focal_and_diffuse(
    anomaly: np.ndarray, mask: np.ndarray, *, sigmas: Sequence[float], relative: bool = False
) -> tuple[list[float], float]:
    """Summaries of a map inside ``mask`` (higher = more anomalous).

    ``focal``: per scale, the peak of the map smoothed with a Gaussian of that
    many voxels (0: unsmoothed), the upper tail that a lesion raises; the scale
    that matches the lesion's size gives its strongest evidence. ``relative``:
    the peak's contrast instead, ``(peak - median) / max(1.4826 * MAD,
    CONTRAST_FLOOR)`` of the smoothed map inside ``mask`` (unitless), which a
    map raised everywhere (an unusual head) does not raise. ``diffuse``: the
    mean of the map, which noise, ghosting or a wrong contrast raise everywhere
    while their peaks stay ordinary.
    """
    if not mask.any():
        message = "the scoring mask is empty"
        raise ValueError(message)
    focals = []
    for sigma in sigmas:
        values = (ndimage.gaussian_filter(anomaly, sigma) if sigma > 0 else anomaly)[mask]
        peak = float(values.max())
        if relative:
            centre = float(np.median(values))
            spread = mad_sd(values)
            peak = (peak - centre) / max(spread, CONTRAST_FLOOR)
        focals.append(peak)
    return focals, float(anomaly[mask].mean())


def subject_summaries(
    anomaly: np.ndarray, mask: np.ndarray, *, scoring: dict[str, Any]
) -> tuple[list[float], float]:
    """:func:`focal_and_diffuse` as a checkpoint's ``scoring`` asks for it."""
    relative = scoring.get("focal_summary", "peak") == "contrast"
    return focal_and_diffuse(anomaly, mask, sigmas=focal_sigmas(scoring), relative=relative)


def robust_scale(values: Sequence[float]) -> list[float]:
    """``[median, scale]`` of reference values; the scale (1.4826 * MAD) is floored
    at 10 % of the median so a handful of similar subjects cannot make it ~0."""
    values = np.asarray(values, dtype=float)
    median = float(np.median(values))
    mad = mad_sd(values)
    return [median, max(mad, 0.1 * abs(median), 1e-6)]


def subject_score(focals: Sequence[float], diffuse: float, calibration: dict[str, Any]) -> float:
    """``anomaly_raw``: the largest of the focal (one per scale) and diffuse summaries
    as robust z against the out-of-fold reference subjects of the model's calibration
    (``calibration["focal"]``: one ``[median, scale]`` per scale, or one pair)."""
    pairs = calibration["focal"]
    pairs = pairs if isinstance(pairs[0], (list, tuple)) else [pairs]
    z = [(f - m) / s for f, (m, s) in zip(focals, pairs, strict=True)]
    z.append((diffuse - calibration["diffuse"][0]) / calibration["diffuse"][1])
    return float(max(z))


def top_regions(
    anomaly: np.ndarray,
    mask: np.ndarray,
    *,
    affine: np.ndarray,
    offset: Sequence[int],
    percentile: float,
    count: int = 3,
) -> list[dict[str, Any]]:
    """The ``count`` connected regions of highest summed anomaly.

    Regions are 26-connected voxels inside ``mask`` above the ``percentile`` of
    the map inside the mask (and above 0). Each has ``centroid_mm`` (anomaly-
    weighted, MNI mm [x, y, z]), ``volume_ml``, ``peak`` (map units) and
    ``mass`` (sum of the map over the region, voxels x map units). ``offset``
    is the crop origin on the template grid (voxels).
    """
    inside = anomaly[mask]
    if inside.size == 0:
        return []
    threshold = max(float(np.percentile(inside, percentile)), 1e-6)
    labels, n = ndimage.label((anomaly > threshold) & mask, structure=np.ones((3, 3, 3)))
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    mass = ndimage.sum_labels(anomaly, labels, index)
    sizes = ndimage.sum_labels(np.ones_like(anomaly), labels, index)
    peaks = ndimage.maximum(anomaly, labels, index)
    centres = ndimage.center_of_mass(anomaly, labels, index)
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    regions = []
    for i in np.argsort(-np.asarray(mass))[:count]:
        voxel = np.asarray(centres[i], dtype=float) + np.asarray(offset, dtype=float)
        centre = affine[:3, :3] @ voxel + affine[:3, 3]
        regions.append(
            {
                "centroid_mm": [round(float(c), 1) for c in centre],
                "volume_ml": round(float(sizes[i]) * voxel_ml, 3),
                "peak": round(float(peaks[i]), 4),
                "mass": round(float(mass[i]), 3),
            }
        )
    return regions


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict (tensors, numbers and strings only, loaded with ``weights_only``)."""
    return torch.load(str(path), map_location="cpu", weights_only=True)


def score_volume(
    volume: np.ndarray,
    checkpoint: dict[str, Any],
    *,
    folds: Sequence[int],
    device: torch.device,
    grid: BrainGrid,
) -> tuple[np.ndarray, dict[str, float]]:
    """Anomaly map on the crop and subject metrics, averaged over the fold models ``folds``.

    Metrics: ``anomaly_raw`` (see :func:`subject_score`), ``anomaly_focal`` (the
    finest scale's) and ``anomaly_diffuse`` (see :func:`focal_and_diffuse`). Scores are the means
    of the per-model scores (each model's score of an unseen subject is
    distributed like an out-of-fold score, so reference and non-reference
    subjects stay comparable); the map is the mean of the maps.
    """
    scoring = checkpoint["scoring"]
    architecture = checkpoint["architecture"]
    mask = scoring_mask(grid, erode_voxels=int(scoring["erode_voxels"]))
    maps, metrics = [], []
    for fold in folds:
        model = build_network(architecture, shape=volume.shape)
        model.load_state_dict(checkpoint["state_dicts"][fold])
        recon = reconstruct(model.to(device), volume, device=device)
        raw = raw_map(volume, recon, scoring=scoring)
        calibration = checkpoint["calibration"][fold]
        anomaly = calibrated_map(raw, calibration, mask, scoring=scoring)
        focals, diffuse = subject_summaries(anomaly, mask, scoring=scoring)
        maps.append(anomaly)
        metrics.append((subject_score(focals, diffuse, calibration), focals[0], diffuse))
    raw_score, focal, diffuse = (float(v) for v in np.mean(metrics, axis=0))
    summary = {"anomaly_raw": raw_score, "anomaly_focal": focal, "anomaly_diffuse": diffuse}
    return np.mean(maps, axis=0).astype(np.float32), summary


def _write_map(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.header.set_xyzt_units("mm")
    img.header.set_intent("estimate", name="anomaly")
    nib.save(img, str(path))


@dataclass
class Scorer:
    """A loaded checkpoint, ready to score subjects on ``device``."""

    state: dict[str, Any]
    grid: BrainGrid
    device: torch.device

    @classmethod
    def load(cls, checkpoint: Path, *, device: str = "auto", threads: int = 1) -> Scorer:
        state = load_checkpoint(checkpoint)
        grid = brain_grid(int(state.get("resolution", 2)))
        return cls(state, grid, resolve_device(device, threads=threads))


def _score_work(
    scorer: Scorer, image: Path, subject: str, out_map: Path, out_thumbnail: Path | None = None
) -> dict:
    """The score record of one subject (writes its map and, given ``out_thumbnail``, the
    report's picture of both); raises ``StageError`` on bad data."""
    state, grid = scorer.state, scorer.grid
    if state.get("status") != OK:
        reason = state.get("reason", "the model was not trained")
        # The registered image alone is still worth a look.
        drawn = (
            thumbnails.try_draw(thumbnails.write_anomaly_thumbnail, image, None, out_thumbnail)
            if out_thumbnail is not None
            else []
        )
        return make_record(
            STAGE,
            findings=["not_scored"],
            metrics={"anomaly_raw": None},
            warnings=[f"not scored: {reason}", *drawn],
            fold=None,
            in_reference=False,
            top_regions=[],
        )
    try:
        volume = load_normalised(image, grid=grid)
    except ImageError as error:
        raise StageError(str(error)) from error
    landmarks = state.get("normalisation", {}).get("landmarks")
    if landmarks:  # checkpoints from before the standardisation have none
        volume = standardize_histogram(volume, grid.crop_mask, reference=np.asarray(landmarks))
    fold = state["fold_assignment"].get(subject)
    digests = state.get("reference_sha256", {})
    if fold is not None and digests.get(subject) != files.sha256(image):
        fold = None  # the id of a reference subject, but another image: never seen
    held_out = state.get("held_out_folds", {}).get(subject) if fold is None else None
    if fold is not None:
        folds = [int(fold)]
    elif held_out is not None:  # its fold group trained without it: that group's model
        folds = [int(held_out)]
    else:
        folds = list(range(len(state["state_dicts"])))
    anomaly, metrics = score_volume(volume, state, folds=folds, device=scorer.device, grid=grid)
    full = np.zeros(grid.shape, np.float32)
    full[grid.index] = anomaly
    _write_map(out_map, full, grid.affine)
    drawn = (
        thumbnails.try_draw(thumbnails.write_anomaly_thumbnail, image, full, out_thumbnail)
        if out_thumbnail is not None
        else []
    )
    mask = scoring_mask(grid, erode_voxels=int(state["scoring"]["erode_voxels"]))
    regions = top_regions(
        anomaly,
        mask,
        affine=grid.affine,
        offset=[a for a, _ in grid.crop],
        percentile=float(state["scoring"]["region_percentile"]),
    )
    log.info(
        "%s: anomaly_raw %.3f (%s)",
        subject,
        metrics["anomaly_raw"],
        f"fold {folds[0]}" if len(folds) == 1 else f"mean of {len(folds)} models",
    )
    return make_record(
        STAGE,
        metrics=metrics,
        warnings=drawn,
        fold=int(folds[0]) if len(folds) == 1 else None,
        in_reference=fold is not None,
        top_regions=regions,
    )


def score_one(
    scorer: Scorer,
    image: Path,
    *,
    subject: str,
    out_map: Path,
    record_path: Path,
    upstream: Sequence[Path],
    out_thumbnail: Path | None = None,
    isolate: bool | None = None,
) -> dict:
    """Score one subject with a loaded model: its map and record (see :func:`score_subject`)."""
    image, out_map = Path(image), Path(out_map)
    return run_stage(
        STAGE,
        lambda: _score_work(scorer, image, subject, out_map, out_thumbnail),
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
) -> dict:
    """Stage ``score`` of one subject: write the voxel anomaly map and the subject's record.

    ``image`` is the registered image on the template grid; ``subject`` the
    BIDS id that the checkpoint's fold assignment uses. The map (float32,
    template grid and affine) is 0 outside the eroded brain mask. Record
    metrics: ``anomaly_raw`` (higher = more anomalous; None when the model
    could not be trained); extras ``fold``, ``in_reference`` and
    ``top_regions`` (see :func:`top_regions`).
    """

    def work() -> dict:
        scorer = Scorer.load(Path(checkpoint), device=device, threads=threads)
        return _score_work(scorer, Path(image), subject, Path(out_map))

    return run_stage(
        STAGE, work, record_path=record_path, image_outputs=[out_map], upstream=upstream
    )


def _upstream_ok(upstream: Sequence[Path]) -> bool:
    """Whether the subject will be scored (an unreadable record: no, run_stage says why)."""
    try:
        return records.upstream_problem(upstream) is None
    except (OSError, ValueError):
        return False


def _score_workers(device: str, threads: int) -> int:
    """Worker processes of a cohort's scoring: one per thread on the CPU, one per GPU."""
    if device == "cpu":
        return max(1, threads)
    # The NVML check does not initialise CUDA, so the workers forked after it can use it.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    return 1 if torch.cuda.is_available() else max(1, threads)


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
) -> pd.DataFrame:
    """Stage ``score`` of every subject of ``stage_table`` (``aggregate.write_stage_table``).

    ``resolution`` is the template grid (mm) the registered images were written on.

    The model is loaded once per worker process; on the CPU ``threads``
    workers of one torch thread each share the subjects, on a GPU one worker
    scores them all. Each subject writes its map and record as
    :func:`score_subject` does (``paths`` names them in ``out_dir``); a worker
    that crashes costs only the subject it was scoring (``failed``, crashed)
    and the others are scored by a new worker. Writes ``out_table`` (one row
    per subject: ``bids_id``, ``status``, ``reason``, ``anomaly_raw``,
    ``fold``, ``in_reference``, ``elapsed_s``) and returns it.
    """
    out_dir = Path(out_dir)
    # Labels are strings as written ("001", "NA" included), never numbers or NaN.
    stages = read_tsv(stage_table, text=True)
    bids_ids = stages["bids_id"].tolist()
    if only is not None:
        wanted = set(only)
        bids_ids = [b for b in bids_ids if b in wanted]
    workers = min(_score_workers(device, threads), max(1, len(bids_ids)))
    torch_threads = max(1, threads) if workers == 1 else 1

    def record_path(bids_id: str) -> Path:
        return paths.record(out_dir, bids_id, STAGE)

    def work(shard: Sequence[str]) -> None:
        scorer = None
        for bids_id in shard:
            upstream = [paths.record(out_dir, bids_id, "register")]
            if scorer is None and _upstream_ok(upstream):
                try:
                    scorer = Scorer.load(Path(checkpoint), device=device, threads=torch_threads)
                except Exception as error:  # every subject of the shard gets the reason
                    unusable(shard, f"{STAGE}: the model could not be loaded: {error}"[:300])
                    return
            score_one(
                scorer,
                paths.preproc(out_dir, bids_id, res=resolution),
                subject=bids_id,
                out_map=paths.anomaly_map(out_dir, bids_id, res=resolution),
                out_thumbnail=paths.anomaly_thumbnail(out_dir, bids_id),
                record_path=record_path(bids_id),
                upstream=upstream,
                isolate=False,
            )
            derivatives.write_sidecars(out_dir, bids_id, res=resolution, only=("anomaly_map",))

    def unusable(shard: Sequence[str], reason: str) -> None:
        log.error("%s", reason)
        for bids_id in shard:
            if not record_path(bids_id).exists():
                records.remove_images(
                    [
                        paths.anomaly_map(out_dir, bids_id, res=resolution),
                        paths.anomaly_thumbnail(out_dir, bids_id),
                    ]
                )
                records.write_json(
                    record_path(bids_id), make_record(STAGE, status=records.FAILED, reason=reason)
                )

    def crashed(bids_id: str, how: str) -> None:
        unusable([bids_id], f"{STAGE}: crashed ({how})")

    # Records of an earlier, interrupted run must not count as done.
    for bids_id in bids_ids:
        record_path(bids_id).unlink(missing_ok=True)
    started = time.perf_counter()
    isolation.run_in_workers(
        bids_ids, work, workers=workers, finished=lambda s: record_path(s).exists(), crashed=crashed
    )
    rows = []
    for bids_id in bids_ids:
        record = records.read_record(record_path(bids_id))
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
