"""The IQMs of one subject on its canonical grid, in three parts.

Those that need no registration (:func:`native_measures`: frame, EFC, FBER,
artefacts, FWHM), the background's (:func:`background_measures`: air, QI1) and
the tissues' (:func:`tissue_measures`, then :func:`air_tissue_measures` for
those that also need the air); :func:`combine` makes them the record's metrics.
Metrics that need the tissue classes are NaN when no usable segmentation exists
(failed registration, non-brain image); likewise the background metrics when
there is no air (zero-filled background); a warning says why.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from mriaudit.artefacts import artefact_metrics
from mriaudit.intensity import finite
from mriaudit.iqm.grid import Grid
from mriaudit.iqm.masks import (
    HEAD_MARGIN_MM,
    artifact_mask,
    distance_mm,
    frame_mask,
    hat_mask,
    tissue_masks,
)
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
from mriaudit.iqm.priors import tissue_maps
from mriaudit.iqm.tissues import SegmentationUnavailable, _bbox

log = logging.getLogger(__name__)


@dataclass
class Part:
    """Some of the IQMs of one subject: metrics, warnings and details, in their order."""

    metrics: dict[str, float]
    warnings: list[str]
    details: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "warnings": self.warnings, "details": self.details}


@dataclass
class Air:
    """The background's measures (:func:`background_measures`) and what the tissue
    metrics take from it: the air's intensities (None when too few) and statistics."""

    part: Part
    values: np.ndarray | None
    stats: dict[str, float] | None


def _stat_metrics(name: str, result: Mapping[str, float] | None) -> dict[str, float]:
    return {
        f"iqm_summary_{name}_{stat}": (result[stat] if result else math.nan)
        for stat in SUMMARY_STATS
    }


def native_measures(
    grid: Grid, raw: np.ndarray, data: np.ndarray, head: np.ndarray
) -> tuple[Part, np.ndarray, np.ndarray]:
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
    return Part(metrics, warnings, {"top": image_top(data)}), frame, head_distance


def background_measures(
    data: np.ndarray,
    head: np.ndarray,
    frame: np.ndarray,
    head_distance: np.ndarray,
    spacing: Sequence[float],
    vox_to_mni: np.ndarray | None,
) -> Air:
    """Air above the glabella-inion level, clear of the head and the frame: QI1, the
    artefacts and the background's statistics."""
    air = hat_mask(data.shape, vox_to_mni=vox_to_mni, head=head, spacing_mm=spacing)
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
    return Air(Part(metrics, warnings, details), air_values, air_stats)


def tissue_measures(
    grid: Grid,
    raw: np.ndarray,
    data: np.ndarray,
    head: np.ndarray,
    transform: Path,
    registration: tuple[np.ndarray | None, str],
    resolution: int,
) -> tuple[Part, dict[str, np.ndarray] | None]:
    """The IQMs of the tissue classes that need no air; and the tissues' intensities for
    :func:`air_tissue_measures` (None, with a warning, when there is no segmentation)."""
    vox_to_mni, transform_problem = registration
    try:
        if vox_to_mni is None:
            raise SegmentationUnavailable(transform_problem)
        box, pvms, tpms, fit = tissue_maps(
            grid, data, head, Path(transform), vox_to_mni, resolution
        )
        masks = tissue_masks(pvms, grid.spacing)
        values = {name: data[box][masks[name]] for name in TISSUES}
        small = [name for name in TISSUES if values[name].size < MIN_REGION_VOXELS]
        if small:
            message = f"too few confident voxels for {', '.join(small)}"
            raise SegmentationUnavailable(message)
    except SegmentationUnavailable as error:
        warning = f"no tissue segmentation: {error}; tissue-based metrics undefined"
        log.warning("no tissue segmentation: %s", error)
        return Part({}, [warning], {}), None
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
    return Part(metrics, [], {"segmentation": fit}), values


def air_tissue_measures(
    values: dict[str, np.ndarray], air: Air, data: np.ndarray, top: float
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


def combine(
    native: Part, air: Part, tissues: Part, extra: dict[str, float], timings: dict[str, float]
) -> tuple[dict[str, float], list[str], dict[str, Any]]:
    """The record's metrics (every name of ``IQM_NAMES``), warnings and details."""
    metrics = dict.fromkeys(IQM_NAMES, math.nan)
    for part in (native.metrics, air.metrics, tissues.metrics, extra):
        metrics.update(part)
    warnings = native.warnings + air.warnings + tissues.warnings
    details = air.details | {"timings_s": timings} | tissues.details
    return metrics, warnings, details
