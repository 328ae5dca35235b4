"""Training the normative model: K out-of-fold models of the configured method.

Usable reference subjects are split into K folds; model k trains on the other
folds, so every reference subject is later scored by a model that never saw
it. The method (config ``model.method``, :mod:`mriaudit.model.methods`) picks
the network and its fold trainer (:data:`TRAINERS`): ``atlas_warp`` warps its
fold's atlas slice by slice (:mod:`mriaudit.model.train_atlas`), ``ae3d``
autoencodes whole volumes (:mod:`mriaudit.model.train_ae3d`), ``itermask3d``
inpaints randomly masked whole volumes (:mod:`mriaudit.model.train_itermask`),
``token_surprisal`` learns slice tokens and their prior
(:mod:`mriaudit.model.train_tokens`). Folds, standardisation, calibration and the
checkpoint are the same for every method.

After training, the out-of-fold maps of up to ``calibration_subjects`` per fold
give each fold model a voxelwise median and spread built from subjects of the
other folds only (see :mod:`mriaudit.model.score`).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mriaudit import files
from mriaudit.intensity import histogram_landmarks, standardize_histogram
from mriaudit.model import train_ae3d, train_atlas, train_itermask, train_tokens
from mriaudit.model.data import (
    NORMALISATION,
    BrainGrid,
    ImageError,
    assign_folds,
    brain_grid,
    data_hash,
    fold_count,
    group_count,
    load_normalised,
    reference_problem,
)
from mriaudit.model.device import resolve_device, resolve_precision, seed_everything
from mriaudit.model.maps import (
    calibrated_map,
    calibration_stats,
    contrast_floors,
    focal_sigmas,
    map_spreads,
    robust_scale,
    scoring_mask,
    subject_summaries,
)
from mriaudit.model.methods import (
    DEFAULT_METHOD,
    build_network,
    check_method,
    default_architecture,
    fold_diagnostics,
)
from mriaudit.model.options import TrainOptions
from mriaudit.model.sample import stratified_cap
from mriaudit.model.scorer import raw_terms_of
from mriaudit.records import FAILED, OK, write_json

log = logging.getLogger(__name__)


FORMAT_VERSION = 1

#: Each method's fold trainer: ``(volumes, *, grid, epochs, batch_size, learning_rate,
#: seed, device, options, precision, label) -> (CPU state dict, last epoch's mean loss)``.
TRAINERS: dict[str, Callable[..., tuple[dict[str, torch.Tensor], float]]] = {
    "atlas_warp": train_atlas.train_fold,
    "ae3d": train_ae3d.train_fold,
    "itermask3d": train_itermask.train_fold,
    "token_surprisal": train_tokens.train_fold,
}


def _calibrate(
    volumes: dict[str, np.ndarray],
    assignment: dict[str, int],
    states: list[dict[str, torch.Tensor]],
    *,
    grid: BrainGrid,
    device: torch.device,
    options: TrainOptions,
    seed: int,
) -> list[dict[str, torch.Tensor]]:
    """Per fold k, statistics of out-of-fold maps of subjects outside fold k.

    Voxelwise median and spread of the raw terms, and the median and scale of
    the focal and diffuse subject summaries. Each subject's map comes from its
    own fold's model (which never saw it), so no statistic of fold k includes a
    subject of fold k.
    """
    folds = len(states)
    rng = np.random.default_rng([seed, 0xCA1])
    models = []
    for state in states:
        model = build_network(options.architecture, shape=next(iter(volumes.values())).shape)
        model.load_state_dict(state)
        models.append(model.to(device))
    chosen: dict[int, list[str]] = {}
    for k in range(folds):
        members = sorted(s for s, f in assignment.items() if f == k)
        limit = max(1, options.calibration_subjects // max(1, folds - 1))
        chosen[k] = [members[i] for i in sorted(rng.permutation(len(members))[:limit])]
    raw: dict[str, np.ndarray] = {}
    for k, members in chosen.items():
        for subject in members:
            terms = raw_terms_of(
                models[k], volumes[subject], device=device, scoring=options.scoring
            )
            raw[subject] = terms.astype(np.float16)
    mask = scoring_mask(grid, erode_voxels=int(options.scoring["erode_voxels"]))
    calibration = []
    for k in range(folds):
        others = [
            raw[s].astype(np.float32) for f, members in chosen.items() if f != k for s in members
        ]
        calibration.append(
            calibration_stats(others, mask, floor=float(options.scoring["spread_floor"]))
        )
    # Subject summaries of the calibration subjects, each from its own fold's model
    # and calibration, exactly as score_subject will compute them.
    sigmas = focal_sigmas(options.scoring)
    anomalies = {
        subject: calibrated_map(
            raw[subject].astype(np.float32), calibration[f], mask, scoring=options.scoring
        )
        for f, members in chosen.items()
        for subject in members
    }
    fraction = options.scoring.get("contrast_floor_fraction")
    if options.scoring.get("focal_summary") == "contrast" and fraction is not None:
        spreads = {s: map_spreads(a, mask, sigmas=sigmas) for s, a in anomalies.items()}
        for k in range(folds):
            others = [spreads[s] for f, members in chosen.items() if f != k for s in members]
            calibration[k]["contrast_floor"] = contrast_floors(others, fraction=float(fraction))
    summaries: dict[str, tuple[float, float]] = {}
    for f, members in chosen.items():
        for subject in members:
            summaries[subject] = subject_summaries(
                anomalies[subject],
                mask,
                scoring=options.scoring,
                floors=calibration[f].get("contrast_floor"),
            )
    for k in range(folds):
        others = [summaries[s] for f, members in chosen.items() if f != k for s in members]
        calibration[k]["focal"] = [
            robust_scale([focals[i] for focals, _ in others]) for i in range(len(sigmas))
        ]
        calibration[k]["diffuse"] = robust_scale([diffuse for _, diffuse in others])
    return calibration


def _failed(out_checkpoint: Path, out_sidecar: Path, reason: str, sidecar: dict[str, Any]) -> dict:
    log.error("model training not possible: %s", reason)
    out_checkpoint.parent.mkdir(parents=True, exist_ok=True)
    failed = {
        "status": FAILED,
        "reason": reason,
        "format": FORMAT_VERSION,
        "method": sidecar["method"],
        # Scoring writes its empty maps on this grid, the grid of the registered images.
        "resolution": sidecar["config"]["resolution"],
    }
    torch.save(failed, str(out_checkpoint))
    sidecar.update(status=FAILED, reason=reason)
    write_json(out_sidecar, sidecar)
    return sidecar


def train_cohort(
    images: Sequence[Path],
    records: Sequence[Path],
    subjects: Sequence[str],
    *,
    reference: Sequence[str],
    out_checkpoint: Path,
    out_sidecar: Path,
    folds: int = 3,
    epochs: int = 12,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    threads: int = 1,
    resolution: int = 2,
    fold_groups: Mapping[str, str] | None = None,
    prescreened: Mapping[str, str] | None = None,
    max_subjects: int | None = None,
    scanner_groups: Mapping[str, str] | None = None,
    options: TrainOptions | None = None,
    method: str | None = None,
    contrast: str = "T1w",
) -> dict:
    """Train the K out-of-fold models of ``method`` on the usable reference subjects.

    ``method`` (config ``model.method``; :mod:`mriaudit.model.methods`) picks
    the network and its trainer; None takes the method of
    ``options.architecture`` (``atlas_warp`` by default). Where ``options``
    describe another method's architecture, ``method``'s default architecture
    replaces it (the other training options stay). The checkpoint and the
    sidecar record the method.

    ``fold_groups`` (``{subject label: group}``, e.g. the person scanned)
    keeps a group's subjects in one fold, and a subject of a group that did
    not train (failed registration, not in the reference) is scored by its
    group's model too (``held_out_folds`` in the checkpoint), so no model
    scores a person it saw. ``prescreened`` (``{subject label: reason}``, see
    ``aggregate.write_stage_table``) are reference subjects the audit already
    flags without the model; they do not train it. Above ``max_subjects``
    candidates, a sample stratified by ``scanner_groups`` (``{subject label:
    group}``) trains (:func:`mriaudit.model.sample.stratified_cap`); the others
    are scored out of sample by every fold model. ``precision`` (``auto``,
    ``fp32``, ``bf16``; :func:`mriaudit.model.device.resolve_precision`) is the
    network's arithmetic while it trains; scoring is always float32.

    ``images`` (registered, template grid), ``records`` (register stage; for another
    ``contrast`` than the T1w, its ``contrast`` records) and ``subjects`` (BIDS ids)
    are aligned; the sidecar records the ``contrast``; ``reference`` holds the ids
    allowed to train. Writes the checkpoint (``torch.save`` dict) and a JSON
    sidecar and returns the sidecar dict. When fewer than 3 reference subjects
    are usable, the checkpoint says ``{"status": "failed", "reason": ...}`` and
    nothing is raised, so scoring records ``not_scored`` and the run goes on.
    """
    if not len(images) == len(records) == len(subjects):
        message = f"images ({len(images)}), records ({len(records)}) and subjects ({len(subjects)}) must align"
        raise ValueError(message)
    options = options or TrainOptions()
    method = check_method(method or str(options.architecture.get("name", DEFAULT_METHOD)))
    if options.architecture.get("name") != method:
        options = replace(options, architecture=default_architecture(method))
    out_checkpoint, out_sidecar = Path(out_checkpoint), Path(out_sidecar)
    started = time.perf_counter()
    seed_everything(seed)
    torch_device = resolve_device(device, threads=threads)
    arithmetic = resolve_precision(precision, torch_device)
    grid = brain_grid(resolution)
    config = {
        "method": method,
        "folds": folds,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "threads": threads,
        "resolution": resolution,
        "device_requested": device,
        "precision_requested": precision,
        "precision": arithmetic,
        "options": asdict(options),
    }
    sidecar: dict[str, Any] = {
        "status": OK,
        "reason": "",
        "method": method,
        "contrast": contrast,
        "torch_version": torch.__version__,
        "device": str(torch_device),
        "precision": arithmetic,
        "config": config,
        "seed": seed,
        "n_reference": 0,
    }
    allowed = set(reference)
    if max_subjects is not None:
        candidates = [s for s in reference if not (prescreened and s in prescreened)]
        sampled = stratified_cap(
            candidates,
            max_subjects=max_subjects,
            scanner_groups=scanner_groups or {},
            fold_groups=fold_groups,
            seed=seed,
        )
        sidecar["n_not_sampled"] = len(candidates) - len(sampled)
        if len(sampled) < len(candidates):
            log.info(
                "training on a sample of %d of %d reference subjects (training.max_subjects, "
                "stratified by %d scanner groups); the others are scored out of sample",
                len(sampled),
                len(candidates),
                len({(scanner_groups or {}).get(s, "") for s in candidates}),
            )
        allowed = set(sampled)
    excluded: dict[str, str] = {}
    volumes: dict[str, np.ndarray] = {}
    paths: dict[str, Path] = {}
    for image, record, subject in zip(images, records, subjects, strict=True):
        if subject not in allowed:
            continue
        problem = reference_problem(image, record)
        if not problem and prescreened and subject in prescreened:
            problem = f"prescreen: {prescreened[subject]}"
        if not problem:
            try:
                # float16 halves the memory of large reference sets; the model runs in float32.
                volumes[subject] = load_normalised(image, grid=grid).astype(np.float16)
                paths[subject] = Path(image)
            except ImageError as error:
                problem = str(error)
        if problem:
            excluded[subject] = problem
            log.warning("reference subject %s not used: %s", subject, problem)
    sidecar["excluded_reference"] = excluded
    sidecar["n_reference"] = len(volumes)
    landmarks = _standardise(volumes, grid)
    n_folds = fold_count(len(volumes), folds)
    if fold_groups:
        n_folds = min(n_folds, group_count(list(volumes), fold_groups))
        n_folds = 0 if n_folds < 2 else n_folds
    if n_folds == 0:
        reason = f"{len(volumes)} usable reference subject(s), at least 3 are needed to train"
        sidecar["training_time_s"] = round(time.perf_counter() - started, 2)
        return _failed(out_checkpoint, out_sidecar, reason, sidecar)
    if n_folds != folds:
        log.warning(
            "%d usable reference subjects: %d folds instead of %d", len(volumes), n_folds, folds
        )
    config["folds_used"] = n_folds
    try:
        return _fit(
            volumes,
            paths,
            sidecar,
            config,
            n_folds=n_folds,
            grid=grid,
            landmarks=landmarks,
            device=torch_device,
            options=options,
            groups=(
                {s: fold_groups[s] for s in subjects if s in fold_groups} if fold_groups else {}
            ),
            started=started,
            out_checkpoint=out_checkpoint,
            out_sidecar=out_sidecar,
        )
    except Exception as error:
        # A model that cannot be trained (out of memory, a torch error) is a finding:
        # every subject is then recorded `not_scored` and the report still comes out.
        log.error("training failed:\n%s", traceback.format_exc())
        sidecar["training_time_s"] = round(time.perf_counter() - started, 2)
        reason = f"training failed: {type(error).__name__}: {error}"[:300]
        return _failed(out_checkpoint, out_sidecar, reason, sidecar)


def _standardise(volumes: dict[str, np.ndarray], grid: BrainGrid) -> list[float]:
    """Map every volume's histogram landmarks onto their mean (in place); return the mean.

    The mean covers every usable reference subject, so one subject weighs 1/n
    on the landmarks its own fold model is scored against: a negligible leak,
    for one intensity scale shared by all folds and by scoring.
    """
    if not volumes:
        return []
    mask = grid.crop_mask
    mean = np.mean(
        [histogram_landmarks(v.astype(np.float32), mask) for v in volumes.values()], axis=0
    )
    # Rounded as the checkpoint keeps them, so scoring maps exactly as training did.
    landmarks = [round(float(v), 6) for v in mean]
    for subject, volume in volumes.items():
        standard = standardize_histogram(volume.astype(np.float32), mask, reference=landmarks)
        volumes[subject] = standard.astype(volume.dtype)
    return landmarks


def _fit(
    volumes: dict[str, np.ndarray],
    paths: dict[str, Path],
    sidecar: dict[str, Any],
    config: dict[str, Any],
    *,
    n_folds: int,
    grid: BrainGrid,
    landmarks: list[float],
    device: torch.device,
    options: TrainOptions,
    groups: dict[str, str],
    started: float,
    out_checkpoint: Path,
    out_sidecar: Path,
) -> dict:
    """Train, calibrate and save the ``n_folds`` fold models (see :func:`train_cohort`)."""
    torch_device = device
    epochs, batch_size = config["epochs"], config["batch_size"]
    learning_rate, seed = config["learning_rate"], config["seed"]
    resolution = config["resolution"]
    assignment = assign_folds(sorted(volumes), folds=n_folds, seed=seed, groups=groups)
    group_fold = {groups[s]: k for s, k in assignment.items() if s in groups}
    held_out = {
        s: group_fold[g] for s, g in sorted(groups.items()) if s not in volumes and g in group_fold
    }
    log.info(
        "training %d fold models on %d reference subjects (%s)", n_folds, len(volumes), torch_device
    )
    states, final_losses = [], []
    for k in range(n_folds):
        members = [volumes[s] for s in sorted(volumes) if assignment[s] != k]
        state, loss = TRAINERS[config["method"]](
            members,
            grid=grid,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            seed=seed * 1000 + k,
            device=torch_device,
            options=options,
            precision=config["precision"],
            label=f"fold {k + 1}/{n_folds} ",
        )
        states.append(state)
        final_losses.append(loss)
    calibration = _calibrate(
        {s: v.astype(np.float32) for s, v in volumes.items()},
        assignment,
        states,
        grid=grid,
        device=torch_device,
        options=options,
        seed=seed,
    )
    checkpoint = {
        "status": OK,
        "format": FORMAT_VERSION,
        "method": config["method"],
        "resolution": resolution,
        "crop": [list(span) for span in grid.crop],
        "architecture": dict(options.architecture),
        "normalisation": dict(NORMALISATION, mask="mni152_brain", landmarks=landmarks),
        "scoring": dict(options.scoring),
        "fold_assignment": assignment,
        "held_out_folds": held_out,
        # Which image each reference label was: a reused checkpoint must not take a new
        # cohort's subject for the reference subject that happened to have its label.
        "reference_sha256": {s: files.sha256(p) for s, p in paths.items()},
        "state_dicts": states,
        "calibration": calibration,
        "training": {k: v for k, v in config.items() if k != "options"},
    }
    out_checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, str(out_checkpoint))
    sidecar.update(
        data_hash=data_hash(paths),
        training_time_s=round(time.perf_counter() - started, 2),
        fold_final_loss=[round(v, 6) for v in final_losses],
        # What each fold measured of itself (token_surprisal: its codebook usage).
        fold_diagnostics=[fold_diagnostics(state) for state in states],
        fold_assignment=assignment,
        held_out_folds=held_out,
        landmarks=landmarks,
    )
    write_json(out_sidecar, sidecar)
    log.info("model trained in %.1f s: %s", sidecar["training_time_s"], out_checkpoint)
    return sidecar
