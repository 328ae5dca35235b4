"""Throughput of the normative model on synthetic data: scoring and one training epoch.

Both figures run on any device (``cpu``, ``cuda``) without a trained model or
real scans: the fold models are untrained networks of the default architecture
(their heads start at the identity, so a reconstruction is the fold's atlas
warped by nothing, which costs what a trained model's does), and the subjects
are the MNI152 template under a smooth random deformation, a contrast change
and Rician noise, written as the registered images of a run (gzip NIfTI on the
template grid). Scoring goes through :func:`mriaudit.model.score.score_cohort`,
the path of the ``score`` job, so reading, standardisation, the maps, the
pictures and the records are all counted.

The figures are measurements of the machine they ran on, not assertions;
``python -m mriaudit.bench`` prints them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from mriaudit import paths
from mriaudit.intensity import LANDMARK_PERCENTILES, histogram_landmarks, normalize_intensity
from mriaudit.model.data import brain_grid
from mriaudit.model.device import resolve_device, resolve_precision
from mriaudit.model.network import DEFAULT_ARCHITECTURE, build_network
from mriaudit.model.options import TrainOptions
from mriaudit.model.score import DEFAULT_SCORING, score_cohort
from mriaudit.model.train_atlas import train_fold
from mriaudit.records import OK
from mriaudit.template import load_template

#: Distinct synthetic heads; further subjects are copies of their files (writing gzip
#: NIfTI is the slow part of making them, and scoring never sees that they repeat).
DISTINCT_HEADS = 4


def synthetic_head(rng: np.random.Generator, *, resolution: int = 2) -> np.ndarray:
    """A head on the template grid (X, Y, Z), float32 in scanner-like units.

    The template under a smooth random deformation (about one voxel), a gamma
    change, a global scale and Rician noise (2 % of the 99th percentile).
    """
    data = np.asarray(load_template(resolution=resolution).get_fdata(), dtype=np.float32)
    shape = data.shape
    coords = np.indices(shape, dtype=np.float32)
    for axis in range(3):
        coarse = rng.normal(0.0, 0.7, (4, 5, 4))
        coords[axis] += ndimage.zoom(coarse, np.array(shape) / coarse.shape, order=1)
    image = ndimage.map_coordinates(data, coords, order=1).astype(np.float32)
    image = np.clip(image, 0, None) ** rng.uniform(0.9, 1.1) * rng.uniform(400, 1200)
    sigma = 0.02 * np.percentile(image, 99)
    image = np.sqrt((image + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)
    return image.astype(np.float32)


def synthetic_checkpoint(
    heads: list[np.ndarray], *, folds: int, resolution: int = 2, seed: int = 0
) -> dict[str, Any]:
    """A checkpoint of ``folds`` untrained fold models of the default architecture.

    Each fold's atlas is the voxelwise median of the normalised ``heads``; the
    calibration has the shapes a trained one has (terms (2, X, Y, Z), float16;
    a ``[median, scale]`` per focal scale and for the diffuse summary), with a
    uniform median and spread. No subject is in the reference, so every subject
    is scored by all ``folds`` models, as a new cohort's subjects are.
    """
    grid = brain_grid(resolution)
    volumes = [normalize_intensity(h, grid.mask)[grid.index] for h in heads]
    atlas = np.median(np.stack(volumes), axis=0).astype(np.float32)
    landmarks = np.mean([histogram_landmarks(v, grid.crop_mask) for v in volumes], axis=0)
    scoring = dict(DEFAULT_SCORING)
    terms = (2, *atlas.shape)
    states, calibration = [], []
    for k in range(folds):
        torch.manual_seed(seed * 1000 + k)
        model = build_network(DEFAULT_ARCHITECTURE, shape=atlas.shape)
        model.set_atlas(atlas)
        states.append({name: v.detach().clone() for name, v in model.state_dict().items()})
        calibration.append(
            {
                "median": torch.full(terms, 0.02, dtype=torch.float16),
                "spread": torch.full(terms, 0.05, dtype=torch.float16),
                "focal": [[2.0, 1.0] for _ in scoring["focal_sigmas"]],
                "diffuse": [0.5, 0.2],
            }
        )
    return {
        "status": OK,
        "format": 1,
        "resolution": resolution,
        "crop": [list(span) for span in grid.crop],
        "architecture": dict(DEFAULT_ARCHITECTURE),
        "normalisation": {
            "method": "percentile",
            "landmark_percentiles": list(LANDMARK_PERCENTILES),
            "landmarks": [round(float(v), 6) for v in landmarks],
        },
        "scoring": scoring,
        "fold_assignment": {},
        "held_out_folds": {},
        "reference_sha256": {},
        "state_dicts": states,
        "calibration": calibration,
    }


def _write_cohort(root: Path, *, subjects: int, folds: int, resolution: int) -> dict[str, Path]:
    """Registered images, register records, a stage table and a checkpoint under ``root``."""
    rng = np.random.default_rng(0)
    heads = [synthetic_head(rng, resolution=resolution) for _ in range(DISTINCT_HEADS)]
    affine = load_template(resolution=resolution).affine
    out = root / "out"
    bids_ids = [f"bench{i:05d}" for i in range(subjects)]
    record = {"stage": "register", "status": OK, "reason": "", "findings": [], "metrics": {}}
    for i, bids_id in enumerate(bids_ids):
        image = paths.preproc(out, bids_id, res=resolution)
        image.parent.mkdir(parents=True, exist_ok=True)
        if i < DISTINCT_HEADS:
            nib.save(nib.Nifti1Image(heads[i], affine), image)
        else:
            shutil.copyfile(paths.preproc(out, bids_ids[i % DISTINCT_HEADS], res=resolution), image)
        register = paths.record(out, bids_id, "register")
        register.parent.mkdir(parents=True, exist_ok=True)
        register.write_text(json.dumps(record))
    table = root / "stages.tsv"
    table.write_text("bids_id\tstatus\n" + "".join(f"{b}\tok\n" for b in bids_ids))
    checkpoint = root / "model.pt"
    torch.save(synthetic_checkpoint(heads, folds=folds, resolution=resolution), checkpoint)
    return {"out": out, "table": table, "checkpoint": checkpoint}


def scoring_throughput(
    *, device: str, subjects: int, folds: int, resolution: int = 2, threads: int
) -> dict[str, Any]:
    """Score ``subjects`` synthetic subjects with ``folds`` untrained fold models.

    Runs :func:`mriaudit.model.score.score_cohort` as the ``score`` job does,
    with ``threads`` (CPU workers on the CPU; the CPUs that feed one GPU) in a
    temporary folder. Returns ``subjects_per_s`` and ``s_per_subject`` of the
    whole call (worker start, model loading and CUDA start included, so a
    small cohort understates a GPU's steady rate), ``wall_s``, ``setup_s``
    (making the data, not timed as scoring), ``scored`` (subjects whose status
    is ``ok``) and ``median_subject_s`` (the median of the records'
    ``elapsed_s``: a subject's time on its worker's critical path).
    """
    with tempfile.TemporaryDirectory(prefix="mriaudit-bench-score-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        where = _write_cohort(root, subjects=subjects, folds=folds, resolution=resolution)
        setup = time.perf_counter() - started
        started = time.perf_counter()
        table = score_cohort(
            where["table"],
            checkpoint=where["checkpoint"],
            out_dir=where["out"],
            out_table=root / "scores.tsv",
            resolution=resolution,
            device=device,
            threads=threads,
        )
        wall = time.perf_counter() - started
    elapsed = [float(v) for v in table["elapsed_s"] if v is not None and np.isfinite(v)]
    return {
        "device": device,
        "subjects": subjects,
        "folds": folds,
        "resolution": resolution,
        "threads": threads,
        "scored": int((table["status"] == OK).sum()),
        "wall_s": round(wall, 3),
        "setup_s": round(setup, 3),
        "subjects_per_s": round(subjects / wall, 3),
        "s_per_subject": round(wall / max(1, subjects), 4),
        "median_subject_s": round(float(np.median(elapsed)), 4) if elapsed else None,
    }


def training_epoch_seconds(*, device: str, subjects: int, threads: int) -> dict[str, Any]:
    """Seconds of one epoch of :func:`mriaudit.model.train_atlas.train_fold` on ``subjects``
    synthetic normalised volumes (2 mm grid), default options and batch size 32.

    ``epoch_s`` includes the fold's atlas (a voxelwise median, a small part);
    ``slices_per_s`` is the epoch's training slices over it. The volumes are
    float16 and the arithmetic is the rule's default (``training.precision:
    auto``: bfloat16 autocast on a GPU that has it, float32 on the CPU).
    """
    grid = brain_grid(2)
    rng = np.random.default_rng(1)
    heads = [synthetic_head(rng) for _ in range(min(subjects, DISTINCT_HEADS))]
    volumes = [
        normalize_intensity(heads[i % len(heads)], grid.mask)[grid.index].astype(np.float16)
        for i in range(subjects)
    ]
    torch_device = resolve_device(device, threads=threads)
    precision = resolve_precision("auto", torch_device)  # as the train_model rule would
    options = TrainOptions()
    started = time.perf_counter()
    _, loss = train_fold(
        volumes,
        grid=grid,
        epochs=1,
        batch_size=32,
        learning_rate=2e-3,
        seed=0,
        device=torch_device,
        options=options,
        precision=precision,
    )
    if torch_device.type == "cuda":
        torch.cuda.synchronize()
    epoch = time.perf_counter() - started
    slices = subjects * min(options.slices_per_subject, volumes[0].shape[2])
    return {
        "device": str(torch_device),
        "precision": precision,
        "subjects": subjects,
        "threads": threads,
        "epoch_s": round(epoch, 3),
        "slices_per_s": round(slices / epoch, 1),
        "loss": round(float(loss), 5),
    }


#: Subjects scored per device: enough for a GPU's steady rate (start-up included).
SCORE_SUBJECTS = {"cpu": 24, "cuda": 512}
#: The demo cohort's size and its default training (epochs x fold models).
DEMO_SUBJECTS, DEMO_EPOCHS, DEMO_FOLDS = 30, 12, 3


def cuda_device() -> str | None:
    """The CUDA device's name, or None where torch finds no working GPU."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def model_part(
    devices: list[str],
    *,
    threads: int,
    score_subjects: dict[str, int] | None = None,
    epoch_subjects: int = DEMO_SUBJECTS,
) -> dict[str, Any]:
    """Per device: scoring throughput (2 mm template grid, 3 fold models, the score job's
    path; ``score_subjects`` per device, default :data:`SCORE_SUBJECTS`) and one training
    epoch on ``epoch_subjects`` (the demo cohort's size) (``bench_model``)."""
    score_subjects = score_subjects or SCORE_SUBJECTS
    figures: dict[str, Any] = {}
    for device in devices:
        epoch = training_epoch_seconds(device=device, subjects=epoch_subjects, threads=threads)
        figures[device] = {
            "scoring": scoring_throughput(
                device=device, subjects=score_subjects[device], folds=3, threads=threads
            ),
            "training_epoch": epoch,
            # Fold models x epochs; calibration and checkpointing come on top.
            "demo_training_estimate_s": round(epoch["epoch_s"] * DEMO_EPOCHS * DEMO_FOLDS, 1),
        }
    return figures
