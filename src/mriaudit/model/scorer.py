"""The device side of scoring: a checkpoint's fold models on the worker's device.

:class:`Scorer` takes a subject from its registered image to its record in
three steps, so that a GPU worker can run them on different threads
(``score``'s pipeline) and batch the middle one:

1. :meth:`Scorer.prepare` (CPU): read, normalise and standardise the image, and
   pick the fold models that score the subject;
2. :meth:`Scorer.compute` (device): reconstruct, map, calibrate and summarise
   a batch of subjects (:mod:`mriaudit.model.maps`), each by its fold models;
3. :meth:`Scorer.record` (CPU): write the map and its picture, find the top
   regions and make the record.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from mriaudit import files, thumbnails
from mriaudit.intensity import standardize_histogram
from mriaudit.model import maps
from mriaudit.model.data import BrainGrid, ImageError, brain_grid, load_normalised
from mriaudit.model.device import resolve_device
from mriaudit.model.methods import ReconstructionNet, build_network, method_problem
from mriaudit.records import OK, StageError, make_record

log = logging.getLogger(__name__)

STAGE = "score"
#: Axial slices per forward pass on the CPU (the fastest there) and, at most, on a GPU.
CPU_SLICES = 32
GPU_SLICES = 1024
#: Subjects per device batch on a GPU (one forward pass and one filter call for all of
#: them); one on the CPU, where larger batches only add memory traffic.
GPU_SUBJECTS = 8


def reconstruct_volumes(
    model: ReconstructionNet, volumes: torch.Tensor, *, slices: int = CPU_SLICES
) -> torch.Tensor:
    """The model's normal-anatomy reconstructions (B, X, Y, Z), float32, of cropped
    volumes (B, X, Y, Z) on the model's device, ``slices`` axial slices' worth (of
    any of the volumes) per forward pass; every method's network has this entry point
    (:class:`mriaudit.model.methods.ReconstructionNet`)."""
    return model.reconstruct_volumes(volumes, slices=slices)


def raw_terms(
    model: ReconstructionNet,
    volumes: torch.Tensor,
    *,
    scoring: dict[str, Any],
    slices: int = CPU_SLICES,
) -> torch.Tensor:
    """Uncalibrated anomaly terms (B, 2, X, Y, Z), float32, of cropped volumes
    (B, X, Y, Z) on the model's device: the network's own ``raw_terms`` where it has
    them (``token_surprisal``), else :func:`maps.raw_map` of its reconstruction."""
    own = getattr(model, "raw_terms", None)
    if own is not None:
        return own(volumes, scoring=scoring, slices=slices)
    return maps.raw_map(
        volumes, reconstruct_volumes(model, volumes, slices=slices), scoring=scoring
    )


def raw_terms_of(
    model: ReconstructionNet, volume: np.ndarray, *, device: torch.device, scoring: dict[str, Any]
) -> np.ndarray:
    """:func:`raw_terms` (2, X, Y, Z) of one cropped volume (X, Y, Z), on the CPU."""
    with torch.inference_mode():
        volumes = torch.from_numpy(np.asarray(volume, dtype=np.float32))[None].to(device)
        return raw_terms(model, volumes, scoring=scoring)[0].cpu().numpy()


def reconstruct(
    model: ReconstructionNet,
    volume: np.ndarray,
    *,
    device: torch.device,
    batch_size: int = CPU_SLICES,
) -> np.ndarray:
    """The model's normal-anatomy reconstruction of a cropped volume (X, Y, Z), float32."""
    with torch.inference_mode():
        volumes = torch.from_numpy(np.asarray(volume, dtype=np.float32))[None].to(device)
        return reconstruct_volumes(model, volumes, slices=batch_size)[0].cpu().numpy()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict (tensors, numbers and strings only, loaded with ``weights_only``)."""
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _write_map(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.header.set_xyzt_units("mm")
    img.header.set_intent("estimate", name="anomaly")
    nib.save(img, str(path))


@dataclass
class Prepared:
    """A subject read on the CPU, ready for the device: its cropped, normalised and
    standardised ``volume`` (X, Y, Z), the ``folds`` whose models score it and
    whether it is ``in_reference``."""

    subject: str
    image: Path
    volume: np.ndarray
    folds: list[int]
    in_reference: bool


@dataclass
class Scored:
    """A subject's map on the crop (X, Y, Z, float32, on the CPU) and its metrics."""

    anomaly: np.ndarray
    metrics: dict[str, float]


@dataclass
class Scorer:
    """A loaded checkpoint, ready to score subjects on ``device``.

    The fold ``models`` are built once, in eval mode, on the device, with each
    fold's ``calibration`` (median and spread float32 there); ``mask`` is the
    scoring mask (bool, crop), ``device_mask`` the same on the device. An
    untrained checkpoint (``trained`` False) has neither models nor mask; nor
    has a ``refused`` one, trained with another method than the config asks for.
    """

    state: dict[str, Any]
    grid: BrainGrid
    device: torch.device
    models: list[ReconstructionNet] = field(default_factory=list)
    calibration: list[dict[str, Any]] = field(default_factory=list)
    mask: np.ndarray | None = None
    device_mask: torch.Tensor | None = None
    refused: str = ""

    @classmethod
    def load(
        cls, checkpoint: Path, *, device: str = "auto", threads: int = 1, method: str | None = None
    ) -> Scorer:
        """The checkpoint's scorer on ``device``. Given ``method`` (config
        ``model.method``), a checkpoint of another method is refused: not built, and
        every subject it would score is ``not_scored`` with the reason."""
        state = load_checkpoint(checkpoint)
        grid = brain_grid(int(state.get("resolution", 2)))
        scorer = cls(state, grid, resolve_device(device, threads=threads))
        scorer.refused = method_problem(state, method, source=str(checkpoint))
        if scorer.refused:
            log.error("not scoring: %s", scorer.refused)
        elif scorer.trained:
            scorer._build()
        return scorer

    def _build(self) -> None:
        shape = tuple(stop - start for start, stop in self.grid.crop)
        for state in self.state["state_dicts"]:
            model = build_network(self.state["architecture"], shape=shape)
            model.load_state_dict(state)
            self.models.append(model.to(self.device).eval())
        for calibration in self.state["calibration"]:
            on_device = {
                key: calibration[key].to(device=self.device, dtype=torch.float32)
                for key in ("median", "spread")
            }
            self.calibration.append({**calibration, **on_device})
        self.mask = maps.scoring_mask(self.grid, erode_voxels=int(self.scoring["erode_voxels"]))
        self.device_mask = torch.from_numpy(self.mask).to(self.device)

    @property
    def trained(self) -> bool:
        """Whether the checkpoint holds trained models this scorer may use."""
        return self.state.get("status") == OK and not self.refused

    @property
    def scoring(self) -> dict[str, Any]:
        return self.state["scoring"]

    @property
    def batch_subjects(self) -> int:
        """Subjects per device batch (see :data:`GPU_SUBJECTS`)."""
        return GPU_SUBJECTS if self.device.type == "cuda" else 1

    def prepare(self, image: Path, subject: str) -> Prepared:
        """Read, normalise and standardise ``image`` (CPU); raises ``StageError`` on bad data."""
        state, grid = self.state, self.grid
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
        return Prepared(subject, Path(image), volume, folds, in_reference=fold is not None)

    def compute(self, batch: Sequence[Prepared]) -> list[Scored]:
        """Maps and metrics of prepared subjects, on the device, all in one batch.

        Each subject's map is the mean of its fold models' maps; its metrics
        (``anomaly_raw``, see :func:`maps.subject_score`; ``anomaly_focal``, the
        finest scale's; ``anomaly_diffuse``) the means of the per-model ones:
        each model's score of an unseen subject is distributed like an
        out-of-fold score, so reference and other subjects stay comparable.
        """
        scoring, mask = self.scoring, self.device_mask
        sigmas = maps.focal_sigmas(scoring)
        relative = scoring.get("focal_summary", "peak") == "contrast"
        per_model: list[list[tuple[float, float, float]]] = [[] for _ in batch]
        with torch.inference_mode():
            volumes = torch.from_numpy(np.stack([p.volume for p in batch])).to(self.device)
            total = torch.zeros_like(volumes)
            for fold in sorted({f for p in batch for f in p.folds}):
                rows = [i for i, p in enumerate(batch) if fold in p.folds]
                every = len(rows) == len(batch)
                chosen = volumes if every else volumes[rows]
                slices = CPU_SLICES if self.device.type == "cpu" else GPU_SLICES
                raw = raw_terms(self.models[fold], chosen, scoring=scoring, slices=slices)
                calibration = self.calibration[fold]
                anomaly = maps.calibrated_map(raw, calibration, mask, scoring=scoring)
                focal, diffuse = maps.summaries(
                    anomaly,
                    mask,
                    sigmas=sigmas,
                    relative=relative,
                    floors=calibration.get("contrast_floor"),
                )
                if every:
                    total += anomaly
                else:
                    total[rows] += anomaly
                for i, focals, value in zip(rows, focal.tolist(), diffuse.tolist(), strict=True):
                    score = maps.subject_score(focals, value, calibration)
                    per_model[i].append((score, focals[0], value))
            counts = torch.tensor([len(p.folds) for p in batch], device=self.device)
            anomalies = (total / counts[:, None, None, None].float()).cpu().numpy()
        scored = []
        for anomaly, metrics in zip(anomalies, per_model, strict=True):
            raw_score, focal, diffuse = (float(v) for v in np.mean(metrics, axis=0))
            summary = {"anomaly_raw": raw_score, "anomaly_focal": focal, "anomaly_diffuse": diffuse}
            scored.append(Scored(anomaly, summary))
        return scored

    def record(
        self, prepared: Prepared, scored: Scored, *, out_map: Path, out_thumbnail: Path | None
    ) -> dict:
        """Write a scored subject's map (and picture) and return its record (CPU)."""
        grid = self.grid
        full = np.zeros(grid.shape, np.float32)
        full[grid.index] = scored.anomaly
        _write_map(out_map, full, grid.affine)
        drawn = (
            thumbnails.try_draw(
                thumbnails.write_anomaly_thumbnail, prepared.image, full, out_thumbnail
            )
            if out_thumbnail is not None
            else []
        )
        regions = maps.top_regions(
            scored.anomaly,
            self.mask,
            affine=grid.affine,
            offset=[a for a, _ in grid.crop],
            percentile=float(self.scoring["region_percentile"]),
        )
        folds = prepared.folds
        log.info(
            "%s: anomaly_raw %.3f (%s)",
            prepared.subject,
            scored.metrics["anomaly_raw"],
            f"fold {folds[0]}" if len(folds) == 1 else f"mean of {len(folds)} models",
        )
        return make_record(
            STAGE,
            metrics=scored.metrics,
            warnings=drawn,
            fold=int(folds[0]) if len(folds) == 1 else None,
            in_reference=prepared.in_reference,
            top_regions=regions,
        )

    def not_scored(self, image: Path, out_thumbnail: Path | None) -> dict:
        """The record of a subject when the model could not be trained, or its
        checkpoint was refused (another method)."""
        reason = self.refused or self.state.get("reason", "the model was not trained")
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

    def score(
        self, image: Path, subject: str, out_map: Path, out_thumbnail: Path | None = None
    ) -> dict:
        """The score record of one subject, start to end (writes its map and, given
        ``out_thumbnail``, the report's picture of both); raises ``StageError`` on bad data."""
        if not self.trained:
            return self.not_scored(image, out_thumbnail)
        prepared = self.prepare(image, subject)
        (scored,) = self.compute([prepared])
        return self.record(prepared, scored, out_map=out_map, out_thumbnail=out_thumbnail)
