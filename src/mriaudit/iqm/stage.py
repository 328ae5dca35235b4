"""The iqm stage: the IQMs of one subject's native T1-weighted image.

:func:`iqm_subject` works on the native grid:

- arrays are put in the closest RAS orientation (a pure permutation/flip of the
  voxel axes, no resampling), as MRIQC conforms its input to RAS, so ``x`` is
  always left-right, ``y`` posterior-anterior and ``z`` inferior-superior;
- tissues (``mriaudit.iqm.tissues``): the MNI152 tissue priors are warped to the
  native grid (only the box around the brain) with the inverse of the
  registration affine. An affine that scales the template brain implausibly
  (typically a whole head fitted to the brain-only template) or puts it outside
  the head mask gives no segmentation;
- air: more than 4 mm outside the head mask, outside the zero-filled frame, and
  above MRIQC's glabella-inion level (MNI z = -14 mm; without a registration,
  90 mm below the top of the head), so the face, neck and shoulders, which
  carry signal, wrap-around and eye-motion ghosts, do not count as background
  (MRIQC's "hat" mask);
- artefacts: air voxels far above the air noise level and away from the head.

Metrics that need the tissue classes are NaN (``null`` in the record's JSON)
when no usable segmentation exists (failed registration, non-brain image); the
others are always computed and the record carries a warning with the reason.
Likewise the background metrics when there is no air (zero-filled background).

The measures come in three parts: those that need no registration (frame, EFC,
FBER, artefacts, FWHM), the background's (air, QI1) and the tissues'. In the
preprocess job the first two run in a forked child (:class:`NativeMeasures`):
the first while the registration runs, the second while this process segments
the tissues; :func:`compute_iqms` puts them together.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ants
import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from mriaudit import chain, isolation, records, template
from mriaudit.artefacts import artefact_metrics
from mriaudit.intensity import finite
from mriaudit.iqm.masks import artifact_mask, distance_mm, frame_mask, tissue_masks
from mriaudit.iqm.metrics import (
    AXES,
    IQM_NAMES,
    MIN_REGION_VOXELS,
    SUMMARY_STATS,
    TISSUES,
    _noise_spread,
    cjv,
    cnr,
    efc,
    fber,
    field_range,
    fuzzy_jaccard,
    fwhm,
    image_top,
    qi_1,
    rpve,
    snr,
    snr_dietrich,
    summary_stats,
    volume_fractions,
    wm2max,
)
from mriaudit.iqm.tissues import SegmentationUnavailable, _bbox, segment_tissues

if TYPE_CHECKING:
    from mriaudit.preprocess.images import Handoff

log = logging.getLogger(__name__)


STAGE = "iqm"
#: MRIQC's glabella (0, 90, -14) and inion (0, -120, -14) share this MNI height (mm).
HAT_MNI_Z_MM = -14.0
#: Without a registration, the same level is taken this far below the top of the head (mm).
HAT_BELOW_VERTEX_MM = 90.0
#: Air starts this far outside the head mask (mm), clear of the skin's partial volume.
HEAD_MARGIN_MM = 4.0
#: Plausible volume of the warped brain mask relative to the template's (the affine's
#: scaling): outside it the registration is not usable (typically the whole head was
#: fitted to the template brain).
BRAIN_VOLUME_RATIO = (0.5, 1.6)
#: Share of the warped brain mask that must fall inside the head mask.
MIN_BRAIN_IN_HEAD = 0.8


def _itk_threads(threads: int) -> None:
    # ANTs reads the thread count from the environment (as ants.set_ants_deterministic does).
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(1, int(threads)))


def _ras_affine(img: ants.ANTsImage) -> np.ndarray:
    """Voxel index -> RAS mm affine of an ANTs image (ITK is LPS)."""
    direction = np.asarray(img.direction, dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(img.spacing, dtype=np.float64)
    lps[:3, 3] = img.origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


@dataclass(frozen=True)
class _Grid:
    """The native grid and its closest-RAS ("canonical") voxel order."""

    image: ants.ANTsImage
    ornt: np.ndarray
    affine: np.ndarray  # canonical voxel -> RAS mm
    spacing: tuple[float, float, float]  # canonical axes, mm

    @classmethod
    def of(cls, image: ants.ANTsImage) -> _Grid:
        native_affine = _ras_affine(image)
        ornt = nib.orientations.io_orientation(native_affine)
        shape = tuple(int(n) for n in image.shape)
        affine = native_affine @ nib.orientations.inv_ornt_aff(ornt, shape)
        native_spacing = np.asarray(image.spacing, dtype=np.float64)
        spacing = tuple(float(s) for s in native_spacing[np.argsort(ornt[:, 0])])
        return cls(image=image, ornt=ornt, affine=affine, spacing=spacing)

    def canonical(self, array: np.ndarray) -> np.ndarray:
        """A native-ordered array (or a crop of one) in canonical voxel order."""
        return np.ascontiguousarray(nib.orientations.apply_orientation(array, self.ornt))

    def reference(self, box: tuple[slice, ...]) -> ants.ANTsImage:
        """Empty ANTs image covering the canonical ``box`` of the native grid."""
        lower = np.zeros(3)
        shape = [0, 0, 0]
        for axis, (target, flip) in enumerate(self.ornt.astype(int)):
            size = int(self.image.shape[axis])
            start, stop = box[target].start, box[target].stop
            lower[axis] = start if flip > 0 else size - stop
            shape[axis] = stop - start
        direction = np.asarray(self.image.direction, dtype=np.float64).reshape(3, 3)
        spacing = np.asarray(self.image.spacing, dtype=np.float64)
        origin = np.asarray(self.image.origin, dtype=np.float64) + direction @ (spacing * lower)
        return ants.from_numpy(
            np.zeros(shape, dtype=np.float32),
            origin=tuple(float(v) for v in origin),
            spacing=tuple(float(v) for v in spacing),
            direction=direction,
        )


@lru_cache(maxsize=2)
def _ants_priors(resolution: int) -> tuple[ants.ANTsImage, ...]:
    maps = template.load_tissue_priors(resolution=resolution)
    out = []
    for name in TISSUES:
        img = nib.Nifti1Image(np.asarray(maps[name].dataobj, dtype=np.float32), maps[name].affine)
        img.header.set_xyzt_units("mm", "sec")
        out.append(ants.from_nibabel_nifti(img))
    return tuple(out)


@lru_cache(maxsize=2)
def _template_brain(resolution: int) -> tuple[np.ndarray, float]:
    """The template brain mask's bounding-box corners (4, 8), MNI RAS mm (homogeneous), and volume (mL)."""
    mask = template.load_brain_mask(resolution=resolution)
    inside = np.asarray(mask.dataobj) > 0
    volume_ml = np.count_nonzero(inside) * abs(np.linalg.det(mask.affine[:3, :3])) / 1000.0
    index = np.nonzero(inside)
    low = [int(i.min()) for i in index]
    high = [int(i.max()) for i in index]
    corners = np.array(
        [
            [a, b, c, 1.0]
            for a in (low[0], high[0])
            for b in (low[1], high[1])
            for c in (low[2], high[2])
        ]
    ).T
    return mask.affine @ corners, float(volume_ml)


def _point_affine(tx: ants.ANTsTransform) -> np.ndarray:
    """4x4 matrix of a linear ANTs transform's point mapping (LPS mm -> LPS mm)."""
    origin = np.asarray(tx.apply_to_point((0.0, 0.0, 0.0)), dtype=np.float64)
    matrix = np.eye(4)
    for axis in range(3):
        unit = [0.0, 0.0, 0.0]
        unit[axis] = 1.0
        matrix[:3, axis] = np.asarray(tx.apply_to_point(tuple(unit))) - origin
    matrix[:3, 3] = origin
    return matrix


def _read_transform(path: Path) -> tuple[np.ndarray | None, str]:
    """Native RAS mm -> MNI RAS mm affine from the registration's ``.mat``, or (None, why)."""
    if not path.is_file() or path.stat().st_size == 0:
        return None, "no registration transform (registration failed or skipped)"
    try:
        tx = ants.read_transform(str(path))
        native_to_mni = np.linalg.inv(_point_affine(tx))
    except (RuntimeError, ValueError, np.linalg.LinAlgError) as error:
        return None, f"unreadable registration transform: {error}".strip().splitlines()[0]
    # ANTs maps fixed (MNI) points to moving (native) points, both in LPS.
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine = flip @ native_to_mni @ flip
    if not np.all(np.isfinite(affine)):
        return None, "registration transform is not finite"
    return affine, ""


def _hat_mask(
    shape: tuple[int, ...],
    *,
    vox_to_mni: np.ndarray | None,
    head: np.ndarray,
    spacing_mm: Sequence[float],
) -> np.ndarray:
    """Voxels above MRIQC's glabella-inion level, boolean (canonical RAS grid).

    With a registration, voxels whose MNI height is at least -14 mm. Without
    one, the level is taken 90 mm below the top of the head mask along the
    canonical superior axis (about where MNI z = -14 mm lies on an adult head).
    """
    if vox_to_mni is not None:
        row = vox_to_mni[2]
        # The (X, Y) plane's height first, so only one pass touches the whole volume.
        plane = (
            row[3]
            + row[0] * np.arange(shape[0], dtype=np.float64)[:, None]
            + row[1] * np.arange(shape[1], dtype=np.float64)[None, :]
        ).astype(np.float32)
        rise = (row[2] * np.arange(shape[2], dtype=np.float64)).astype(np.float32)
        return np.greater_equal(plane[:, :, None], np.float32(HAT_MNI_Z_MM) - rise[None, None, :])
    slices = np.nonzero(head.any(axis=(0, 1)))[0]
    top = int(slices.max()) if slices.size else shape[2] - 1
    level = top - HAT_BELOW_VERTEX_MM / spacing_mm[2]
    index = np.arange(shape[2])[None, None, :]
    return np.broadcast_to(index >= level, shape).copy()


def _brain_box(
    vox_to_mni: np.ndarray, shape: tuple[int, ...], spacing: Sequence[float], resolution: int
) -> tuple[slice, ...]:
    """Canonical-grid box holding the warped template brain (plus 5 mm), clipped to the grid.

    Raises ``SegmentationUnavailable`` when the affine scales the brain implausibly
    or puts it outside the field of view.
    """
    corners, template_ml = _template_brain(resolution)
    # mm^3 of native space per mm^3 of MNI space: the warped brain's volume ratio.
    ratio = float(np.prod(spacing)) / abs(float(np.linalg.det(vox_to_mni[:3, :3])))
    if not BRAIN_VOLUME_RATIO[0] <= ratio <= BRAIN_VOLUME_RATIO[1]:
        message = (
            f"the registration scales the template brain to {ratio * template_ml:.0f} mL "
            f"({ratio:.2f} x the template's): not a usable alignment"
        )
        raise SegmentationUnavailable(message)
    corners = np.linalg.inv(vox_to_mni) @ corners
    margin = [math.ceil(5.0 / s) for s in spacing]
    box = []
    for axis, n in enumerate(shape):
        start = max(0, math.floor(corners[axis].min()) - margin[axis])
        stop = min(n, math.ceil(corners[axis].max()) + margin[axis] + 1)
        if stop - start < 2:
            message = "the warped template brain lies outside the field of view"
            raise SegmentationUnavailable(message)
        box.append(slice(start, stop))
    return tuple(box)


def _stat_metrics(name: str, result: Mapping[str, float] | None) -> dict[str, float]:
    return {
        f"iqm_summary_{name}_{stat}": (result[stat] if result else math.nan)
        for stat in SUMMARY_STATS
    }


def _load(path: Path, what: str) -> ants.ANTsImage:
    try:
        img = ants.image_read(str(path))
    except (RuntimeError, ValueError, OSError) as error:
        message = f"cannot read the {what} image: {error}".strip().splitlines()[0]
        raise records.StageError(message) from error
    if img.dimension != 3:
        message = f"the {what} image is {img.dimension}-D, expected 3-D"
        raise records.StageError(message)
    return img


def _tissues(
    grid: _Grid,
    data: np.ndarray,
    head: np.ndarray,
    transform: Path,
    vox_to_mni: np.ndarray,
    resolution: int,
) -> tuple[tuple[slice, ...], dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """Tissue maps inside the brain's box of the canonical grid.

    Returns the box, the partial-volume maps and the warped template priors per
    tissue (each of the box's shape) and the mixture's fit. Raises
    ``SegmentationUnavailable`` when the warped brain is implausible.
    """
    box = _brain_box(vox_to_mni, data.shape, grid.spacing, resolution)
    reference = grid.reference(box)
    templates = _ants_priors(resolution)
    # One (K, X, Y, Z) array filled in place: large temporaries cost more than the arithmetic.
    priors = np.empty((len(templates), *(b.stop - b.start for b in box)), dtype=np.float32)
    for k, prior in enumerate(templates):
        moved = ants.apply_transforms(
            fixed=reference,
            moving=prior,
            transformlist=[str(transform)],
            whichtoinvert=[True],
            interpolator="linear",
        )
        np.clip(grid.canonical(moved.numpy()), 0.0, 1.0, out=priors[k])
    brain_prob = priors.sum(axis=0)
    brain = brain_prob > 0.5
    n_brain = int(np.count_nonzero(brain))
    volume_ml = n_brain * float(np.prod(grid.spacing)) / 1000.0
    if n_brain == 0:
        message = "the warped brain mask is empty"
        raise SegmentationUnavailable(message)
    head_box = head[box]
    in_head = np.count_nonzero(brain & head_box) / n_brain
    if in_head < MIN_BRAIN_IN_HEAD:
        message = f"only {in_head:.0%} of the warped brain mask lies inside the head mask"
        raise SegmentationUnavailable(message)
    brain &= head_box
    priors /= np.maximum(brain_prob, 1e-6)
    priors[:, ~brain] = 0.0
    try:
        posteriors, fit = segment_tissues(data[box], brain, priors)
    except ValueError as error:
        raise SegmentationUnavailable(str(error)) from error
    fit["brain_volume_ml"] = round(volume_ml, 1)
    pvms = dict(zip(TISSUES, posteriors, strict=True))
    tpms = dict(zip(TISSUES, priors, strict=True))
    return box, pvms, tpms, fit


def _array(path: Path, what: str, handoff: Handoff | None) -> np.ndarray:
    """The data of the image at ``path``: kept in ``handoff`` (as the file holds it), or read."""
    kept = handoff.get(path) if handoff is not None else None
    if kept is None:
        return _load(path, what).numpy()
    if kept.data.ndim != 3:
        message = f"the {what} image is {kept.data.ndim}-D, expected 3-D"
        raise records.StageError(message)
    return kept.data


def _native_arrays(
    raw_image: Path, n4_image: Path, head_mask: Path, handoff: Handoff | None
) -> tuple[_Grid, np.ndarray, np.ndarray, np.ndarray]:
    """The grid (as ITK reads the converted image) and the converted image, the bias-
    corrected one (clipped at 0) and the head mask on its canonical axes."""
    raw_img = _load(raw_image, "converted")
    n4 = _array(n4_image, "bias-corrected", handoff)
    mask = _array(head_mask, "head mask", handoff)
    if not tuple(raw_img.shape) == n4.shape == mask.shape:
        message = f"grids differ: raw {raw_img.shape}, n4 {n4.shape}, head mask {mask.shape}"
        raise records.StageError(message)
    grid = _Grid.of(raw_img)
    raw = grid.canonical(raw_img.numpy())
    data = grid.canonical(finite(n4.astype(np.float32, copy=False), inf_to_zero=False))
    if np.shares_memory(data, n4):  # the kept image is read-only, and shared
        data = data.copy()
    np.clip(data, 0.0, None, out=data)
    head = grid.canonical(mask > 0)
    if not np.any(data > 0):
        message = "the bias-corrected image holds no signal"
        raise records.StageError(message)
    if not head.any():
        message = "the head mask is empty"
        raise records.StageError(message)
    return grid, raw, data, head


@dataclass
class _Part:
    """Some of the IQMs of one subject: metrics, warnings and details, in their order."""

    metrics: dict[str, float]
    warnings: list[str]
    details: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "warnings": self.warnings, "details": self.details}


@dataclass
class _Air:
    """The background's measures (:func:`_background_measures`) and what the tissue
    metrics take from it: the air's intensities (None when too few) and statistics."""

    part: _Part
    values: np.ndarray | None
    stats: dict[str, float] | None


def _native_measures(
    grid: _Grid, raw: np.ndarray, data: np.ndarray, head: np.ndarray
) -> tuple[_Part, np.ndarray, np.ndarray]:
    """The IQMs that need no registration (sizes, EFC, FBER, artefacts, FWHM; ``top``,
    the image's p99.95, in ``details``), the zero-filled frame and the distance to the
    head (mm) that the background needs."""
    spacing = grid.spacing
    metrics: dict[str, float] = {}
    warnings: list[str] = []
    for axis, n, s in zip(AXES, data.shape, spacing, strict=True):
        metrics[f"iqm_size_{axis}"] = int(n)
        metrics[f"iqm_spacing_{axis}"] = round(s, 6)
    frame = frame_mask(finite(raw, inf_to_zero=False))
    head_distance = distance_mm(head, spacing)
    metrics["iqm_efc"] = efc(data, frame)
    metrics["iqm_fber"] = fber(data, head, frame)
    metrics.update(artefact_metrics(data, head, frame=frame))
    if not math.isfinite(metrics["iqm_fber"]):
        warnings.append("FBER undefined: the air outside the head is zero-filled")
    # Smoothness inside the head, two voxels away from its edge (the skin/air step
    # would dominate the differences).
    head_box = _bbox(head)
    inner = np.zeros(data.shape, dtype=bool)
    inner[head_box] = ndi.binary_erosion(
        head[head_box], structure=ndi.generate_binary_structure(3, 2), iterations=2
    )
    for axis, value in zip(AXES, fwhm(data, inner, spacing), strict=True):
        metrics[f"iqm_fwhm_{axis}"] = value
    del inner
    metrics["iqm_fwhm_avg"] = float(np.mean([metrics[f"iqm_fwhm_{a}"] for a in AXES]))
    return _Part(metrics, warnings, {"top": image_top(data)}), frame, head_distance


def _registration(transform: Path, grid: _Grid) -> tuple[np.ndarray | None, str]:
    """Canonical voxel -> MNI RAS mm affine from the registration's ``.mat``, or (None, why)."""
    vox_to_mni, problem = _read_transform(Path(transform))
    return (vox_to_mni @ grid.affine if vox_to_mni is not None else None), problem


def _background_measures(
    data: np.ndarray,
    head: np.ndarray,
    frame: np.ndarray,
    head_distance: np.ndarray,
    spacing: Sequence[float],
    vox_to_mni: np.ndarray | None,
) -> _Air:
    """Air above the glabella-inion level, clear of the head and the frame: QI1, the
    artefacts and the background's statistics."""
    air = _hat_mask(data.shape, vox_to_mni=vox_to_mni, head=head, spacing_mm=spacing)
    air &= (head_distance > HEAD_MARGIN_MM) & ~frame
    artifacts = artifact_mask(data, air, head_distance)
    air &= ~artifacts
    metrics = {"iqm_qi_1": qi_1(air, artifacts)}
    details: dict[str, Any] = {
        "air_voxels": int(np.count_nonzero(air)),
        "artifact_voxels": int(np.count_nonzero(artifacts)),
        "frame_voxels": int(np.count_nonzero(frame)),
        "hat": "registration" if vox_to_mni is not None else "head top - 90 mm",
    }
    del artifacts
    warnings = []
    (bg_mask,) = tissue_masks({"bg": air}, spacing).values()
    del air
    air_values = data[bg_mask] if np.count_nonzero(bg_mask) >= MIN_REGION_VOXELS else None
    if air_values is None:
        warnings.append(
            f"too little air background ({np.count_nonzero(bg_mask)} voxels): "
            "background metrics undefined"
        )
    air_stats = summary_stats(air_values) if air_values is not None else None
    metrics.update(_stat_metrics("bg", air_stats))
    return _Air(_Part(metrics, warnings, details), air_values, air_stats)


def _tissue_measures(
    grid: _Grid,
    raw: np.ndarray,
    data: np.ndarray,
    head: np.ndarray,
    transform: Path,
    registration: tuple[np.ndarray | None, str],
    resolution: int,
) -> tuple[_Part, dict[str, np.ndarray] | None]:
    """The IQMs of the tissue classes that need no air; and the tissues' intensities for
    :func:`_air_tissue_measures` (None, with a warning, when there is no segmentation)."""
    vox_to_mni, transform_problem = registration
    try:
        if vox_to_mni is None:
            raise SegmentationUnavailable(transform_problem)
        box, pvms, tpms, fit = _tissues(grid, data, head, Path(transform), vox_to_mni, resolution)
        masks = tissue_masks(pvms, grid.spacing)
        values = {name: data[box][masks[name]] for name in TISSUES}
        small = [name for name in TISSUES if values[name].size < MIN_REGION_VOXELS]
        if small:
            message = f"too few confident voxels for {', '.join(small)}"
            raise SegmentationUnavailable(message)
    except SegmentationUnavailable as error:
        warning = f"no tissue segmentation: {error}; tissue-based metrics undefined"
        log.warning("no tissue segmentation: %s", error)
        return _Part({}, [warning], {}), None
    metrics: dict[str, float] = {}
    for name in TISSUES:
        metrics.update(_stat_metrics(name, summary_stats(values[name])))
        metrics[f"iqm_snr_{name}"] = snr(values[name])
    metrics["iqm_snr_total"] = float(np.mean([metrics[f"iqm_snr_{n}"] for n in TISSUES]))
    metrics["iqm_cjv"] = cjv(values["wm"], values["gm"])
    metrics["iqm_inu_wm_range"] = field_range(raw[box][masks["wm"]], values["wm"])
    for name, fraction in volume_fractions(pvms).items():
        metrics[f"iqm_icvs_{name}"] = fraction
    for name in TISSUES:
        metrics[f"iqm_rpve_{name}"] = rpve(pvms[name])
        metrics[f"iqm_tpm_overlap_{name}"] = fuzzy_jaccard(pvms[name], tpms[name])
    return _Part(metrics, [], {"segmentation": fit}), values


def _air_tissue_measures(
    values: dict[str, np.ndarray], air: _Air, data: np.ndarray, top: float
) -> dict[str, float]:
    """The tissue metrics that need the air (SNRd, CNR) or the image's maximum (wm2max)."""
    metrics: dict[str, float] = {}
    if air.values is not None and air.stats is not None:
        sigma = _noise_spread(air.stats)
        for name in TISSUES:
            metrics[f"iqm_snrd_{name}"] = snr_dietrich(values[name], sigma_air=sigma)
        metrics["iqm_snrd_total"] = float(np.mean([metrics[f"iqm_snrd_{n}"] for n in TISSUES]))
        metrics["iqm_cnr"] = cnr(values["wm"], values["gm"], air.values)
    metrics["iqm_wm2max"] = wm2max(data, values["wm"], top=top)
    return metrics


def _combine(
    native: _Part, air: _Part, tissues: _Part, extra: dict[str, float], timings: dict[str, float]
) -> tuple[dict[str, float], list[str], dict[str, Any]]:
    """The record's metrics (every name of ``IQM_NAMES``), warnings and details."""
    metrics = dict.fromkeys(IQM_NAMES, math.nan)
    for part in (native.metrics, air.metrics, tissues.metrics, extra):
        metrics.update(part)
    warnings = native.warnings + air.warnings + tissues.warnings
    details = air.details | {"timings_s": timings} | tissues.details
    return metrics, warnings, details


class NativeMeasures:
    """The IQMs computed beside the registration (the preprocess job).

    In ``chain.run_chain``'s child, :meth:`start` (once the N4 stage has kept its
    images in ``handoff``) puts the native images on the canonical grid here and
    forks a child, on the other core, that computes the measures that need no
    registration (:func:`_native_measures`) while this process registers, then
    waits for the registration (:meth:`registered`) and computes the background's
    measures (:func:`_background_measures`) while this process segments the
    tissues. The IQM stage collects them (:func:`compute_iqms`). The child only
    reads what this process had: the results are those of the stage computing
    everything itself, which it does where nothing was started. A failure or
    crash of the child is the IQM stage's, with its reason.
    """

    def __init__(self, raw_image: Path, n4_image: Path, head_mask: Path, *, handoff: Handoff):
        self.images = (Path(raw_image), Path(n4_image), Path(head_mask))
        self.handoff = handoff
        self.arrays: tuple[_Grid, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._problem: Exception | None = None
        self._finish: Callable[[], isolation.ChildOutcome] | None = None
        self._to_child = self._air_values = -1
        self._load_s = 0.0

    @property
    def started(self) -> bool:
        return self._finish is not None or self._problem is not None

    def start(self) -> None:
        """Start the child (when in a chain, N4 kept its images and Linux has memory files)."""
        _, n4_image, head_mask = self.images
        if not (chain.in_chain() and n4_image in self.handoff and head_mask in self.handoff):
            return
        if not hasattr(os, "memfd_create"):
            return
        started = time.perf_counter()
        try:
            self.arrays = _native_arrays(*self.images, self.handoff)
        except Exception as error:  # the IQM stage's failure: raised when it collects
            self._problem = error
            return
        self._load_s = round(time.perf_counter() - started, 3)
        grid, raw, data, head = self.arrays
        from_parent, self._to_child = os.pipe()
        air_values = self._air_values = os.memfd_create("iqm-air")

        def measure() -> dict[str, Any]:
            os.close(self._to_child)
            try:
                begun = time.perf_counter()
                native, frame, head_distance = _native_measures(grid, raw, data, head)
                middle = time.perf_counter()
                with os.fdopen(from_parent, "rb") as pipe:
                    message = pipe.read()
                if not message:  # the IQM stage is skipped
                    return {"skipped": True}
                vox_to_mni = json.loads(message)["vox_to_mni"]
                vox_to_mni = None if vox_to_mni is None else np.asarray(vox_to_mni)
                waited = time.perf_counter()
                air = _background_measures(
                    data, head, frame, head_distance, grid.spacing, vox_to_mni
                )
                if air.values is not None:
                    with open(air_values, "wb", closefd=False) as stream:
                        np.save(stream, air.values)
            except Exception as error:
                log.exception("iqm: the measures beside the registration failed")
                return {"error": f"{STAGE}: {type(error).__name__}: {error}"[:300]}
            timings = {
                "native": round(middle - begun, 3),
                "background": round(time.perf_counter() - waited, 3),
            }
            return {
                "native": native.as_json(),
                "air": air.part.as_json() | {"stats": air.stats},
                "timings": timings,
            }

        self._finish = isolation.start_in_child(measure, what=f"{STAGE} (beside registration)")
        os.close(from_parent)

    def native_arrays(self) -> tuple[_Grid, np.ndarray, np.ndarray, np.ndarray]:
        """The canonical grid and images the child works on; raises the problem that
        kept :meth:`start` from making them."""
        if self._problem is not None:
            raise self._problem
        if self.arrays is None:
            message = "the measures beside the registration were not started"
            raise RuntimeError(message)
        return self.arrays

    def registered(self, vox_to_mni: np.ndarray | None) -> None:
        """Let the child go on with the background (the registration's affine, or None)."""
        if self._to_child >= 0:
            matrix = None if vox_to_mni is None else np.asarray(vox_to_mni).tolist()
            with contextlib.suppress(BrokenPipeError):  # a child that died: see collect
                os.write(self._to_child, json.dumps({"vox_to_mni": matrix}).encode())
            os.close(self._to_child)
            self._to_child = -1

    def collect(self) -> tuple[_Part, _Air, dict[str, Any]]:
        """The child's native and background measures and its cost; raises
        ``records.StageError`` where they failed."""
        if self._problem is not None:
            raise self._problem
        if self._finish is None:
            message = "the measures beside the registration were not started"
            raise RuntimeError(message)
        self.registered(None)  # (no-op once sent)
        outcome = self._finish()
        self._finish = None
        result = outcome.result
        if result is None:
            message = f"{STAGE}: crashed ({outcome.how}) beside the registration"
            raise records.StageError(message)
        if "error" in result:
            raise records.StageError(result["error"])
        native = _Part(**result["native"])
        air_json = dict(result["air"])
        stats = air_json.pop("stats")
        values = None
        if stats is not None:
            with open(self._air_values, "rb", closefd=False) as stream:
                stream.seek(0)
                values = np.load(stream)
        air = _Air(_Part(**air_json), values, stats)
        cost = {"load_s": self._load_s, **result["timings"], **outcome.cost}
        return native, air, cost

    def close(self) -> None:
        """Let a child that was started go (the IQM stage was skipped) and wait for it."""
        if self._to_child >= 0:
            os.close(self._to_child)  # end of file: the child stops
            self._to_child = -1
        if self._finish is not None:
            self._finish()
            self._finish = None
        if self._air_values >= 0:
            os.close(self._air_values)
            self._air_values = -1
        self.arrays = None


def compute_iqms(
    raw_image: Path,
    n4_image: Path,
    head_mask: Path,
    transform: Path,
    *,
    resolution: int = 2,
    handoff: Handoff | None = None,
    beside: NativeMeasures | None = None,
) -> tuple[dict[str, float], list[str], dict[str, Any]]:
    """Every IQM of one subject: (metrics named ``iqm_*``, warnings, details).

    Images as in :func:`iqm_subject`. Metrics that cannot be computed are NaN
    and a warning says why. Raises ``records.StageError`` when the images
    cannot be read, differ in grid or hold no signal. With a ``handoff``, the
    bias-corrected image and the head mask kept there (by the N4 stage of the
    same process) are taken from memory; the converted image is read for its
    grid as ITK sees it (ANTs' geometry of the file, as the tissue priors are
    warped onto it). ``beside``: a started :class:`NativeMeasures`, which
    computes the native and background measures in its child (``details``
    then hold its cost as ``beside_registration``).
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    if beside is not None and beside.started:
        grid, raw, data, head = beside.native_arrays()
        registration = _registration(transform, grid)
        beside.registered(registration[0])
        tissues, values = _tissue_measures(
            grid, raw, data, head, transform, registration, resolution
        )
        timings["tissues"] = round(time.perf_counter() - started, 3)
        native, air, cost = beside.collect()
        timings["collect"] = round(time.perf_counter() - started - timings["tissues"], 3)
    else:
        grid, raw, data, head = _native_arrays(raw_image, n4_image, head_mask, handoff)
        timings["load"] = round(time.perf_counter() - started, 3)
        native, frame, head_distance = _native_measures(grid, raw, data, head)
        timings["native"] = round(time.perf_counter() - started - sum(timings.values()), 3)
        registration = _registration(transform, grid)
        air = _background_measures(data, head, frame, head_distance, grid.spacing, registration[0])
        del frame, head_distance
        timings["background"] = round(time.perf_counter() - started - sum(timings.values()), 3)
        tissues, values = _tissue_measures(
            grid, raw, data, head, transform, registration, resolution
        )
        timings["tissues"] = round(time.perf_counter() - started - sum(timings.values()), 3)
        cost = None
    extra = _air_tissue_measures(values, air, data, native.details["top"]) if values else {}
    metrics, warnings, details = _combine(native, air.part, tissues, extra, timings)
    if cost is not None:
        details["beside_registration"] = cost
    return metrics, warnings, details


def iqm_subject(
    raw_image: Path,
    n4_image: Path,
    head_mask: Path,
    transform: Path,
    *,
    record_path: Path,
    upstream: Sequence[Path],
    resolution: int = 2,
    threads: int = 1,
    handoff: Handoff | None = None,
    beside: NativeMeasures | None = None,
) -> dict:
    """Stage ``iqm``: MRIQC-style metrics of one subject, written to its status record.

    ``raw_image``: the converted native T1w (any orientation); ``n4_image``: its
    bias-corrected version on the same grid; ``head_mask``: uint8 head mask on
    that grid; ``transform``: ANTs affine ``.mat`` from the registration
    (fixed = MNI152 template, moving = native image); ``resolution``: template
    grid (mm) whose tissue priors are warped; ``threads``: ITK threads. The
    record's ``metrics`` hold every name in ``IQM_NAMES`` (``None`` where
    undefined, with a warning saying why); ``details`` hold mask sizes and the
    tissue mixture's fit. A scan that cannot be read ends as a ``failed``
    record. With a ``handoff`` (stages in one process), the images the N4 stage
    kept there are taken from memory (see :func:`compute_iqms`); ``beside``: the
    measures started beside the registration (:class:`NativeMeasures`), collected
    here. Returns the record.
    """
    _itk_threads(threads)

    def work() -> dict[str, Any]:
        metrics, warnings, details = compute_iqms(
            Path(raw_image),
            Path(n4_image),
            Path(head_mask),
            Path(transform),
            resolution=resolution,
            handoff=handoff,
            beside=beside,
        )
        return records.make_record(STAGE, metrics=metrics, warnings=warnings, details=details)

    try:
        return records.run_stage(STAGE, work, record_path=record_path, upstream=upstream)
    finally:
        if beside is not None:
            beside.close()
