"""The IQMs of a T2w or FLAIR, on its own native grid, with the T1w's definitions.

MRIQC defines its anatomical IQMs for the T2w as for the T1w (the same
formulas on the T2w's own tissue classes); mriaudit does the same, and for the
FLAIR, which MRIQC does not audit, keeps those whose meaning survives the
sequence. The tissue classes are the MNI152 priors warped to the contrast's
grid through its co-registration to the T1w and the T1w's template transform
(one composed affine), weighting the mixture of ``mriaudit.iqm.tissues``: the
mixture's means are fitted, not ordered, so it needs no assumption of which
tissue is bright.

The tissue assumptions of each contrast (``TISSUE_ORDER``):

- T2w: CSF brightest, white matter darkest. Every IQM is defined; ``wm2max``
  (white matter's median over the image's top) is low by nature and judged
  against the cohort's T2w, never against a T1w.
- FLAIR: CSF nulled by the inversion (near the noise floor), white matter
  darker than grey matter, lesions and oedema bright. The CSF's SNR, SNRd and
  summary statistics measure how well the inversion nulls it, not the image's
  noise, so they are undefined (``FLAIR_UNDEFINED``) and the SNR totals are the
  means over grey and white matter.

The bias field's spread (``iqm_inu_range``) comes from the contrast's own N4,
as the T1w's does.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import ants
import numpy as np

from mriaudit.iqm.grid import Grid, point_affine, registration_affine
from mriaudit.iqm.measures import (
    air_tissue_measures,
    background_measures,
    combine,
    native_measures,
    tissue_measures,
)
from mriaudit.iqm.metrics import SUMMARY_STATS, TISSUES, image_top
from mriaudit.preprocess.images import ants_image

#: Tissues from darkest to brightest in each contrast's core (documentation, and the
#: report's reading of the summary statistics).
TISSUE_ORDER: dict[str, tuple[str, ...]] = {
    "T1w": ("csf", "gm", "wm"),
    "T2w": ("wm", "gm", "csf"),
    "FLAIR": ("csf", "wm", "gm"),
}
#: The IQMs that mean nothing for a FLAIR: its CSF is nulled, so they measure the
#: inversion, not the image's noise.
FLAIR_UNDEFINED: tuple[str, ...] = (
    "iqm_snr_csf",
    "iqm_snrd_csf",
    # Its voxel count ("n") still measures the CSF.
    *(f"iqm_summary_csf_{stat}" for stat in SUMMARY_STATS if stat != "n"),
)
#: Tissues whose SNR makes a contrast's SNR totals.
SNR_TISSUES: dict[str, tuple[str, ...]] = {"FLAIR": ("gm", "wm")}


def template_transform(to_t1w: Path, t1w_to_template: Path, out: Path) -> Path:
    """One affine ``.mat`` (written to ``out``) mapping template points to the contrast's,
    as a registration's transform does: first ``t1w_to_template`` (template -> T1w),
    then ``to_t1w`` (T1w -> contrast). Returns ``out``."""
    first = point_affine(ants.read_transform(str(t1w_to_template)))
    then = point_affine(ants.read_transform(str(to_t1w)))
    # ANTs' composite transforms are not linear transform files: multiply the matrices.
    composed = then @ first
    transform = ants.create_ants_transform(
        transform_type="AffineTransform",
        dimension=3,
        matrix=composed[:3, :3],
        offset=composed[:3, 3],
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    ants.write_transform(transform, str(out))
    return out


def _contrast_rules(contrast: str, metrics: dict[str, float]) -> None:
    """Blank the IQMs that mean nothing for ``contrast`` and make its SNR totals (in place)."""
    if contrast != "FLAIR":
        return
    for name in FLAIR_UNDEFINED:
        metrics[name] = math.nan
    for kind in ("snr", "snrd"):
        values = [metrics.get(f"iqm_{kind}_{t}", math.nan) for t in SNR_TISSUES[contrast]]
        finite = [v for v in values if math.isfinite(v)]
        metrics[f"iqm_{kind}_total"] = float(np.mean(finite)) if finite else math.nan


def contrast_iqms(
    raw: np.ndarray,
    corrected: np.ndarray,
    head: np.ndarray,
    affine: np.ndarray,
    *,
    contrast: str,
    transform: Path | None,
    inu: dict[str, float],
    resolution: int = 2,
) -> tuple[dict[str, float], list[str], dict[str, Any]]:
    """The IQMs of one contrast image: (metrics named ``iqm_*``, warnings, details).

    ``raw`` (X, Y, Z) the converted image, ``corrected`` its bias-corrected
    version, ``head`` its head mask (bool), all on the grid of the RAS+
    ``affine`` (mm); ``transform``: the template -> contrast affine
    (:func:`template_transform`), or None when there is none (then the tissue
    metrics are NaN and a warning says why). ``inu``: the N4 field's
    ``iqm_inu_*`` (``preprocess.bias.bias_field_stats``). Metrics that cannot be
    computed are NaN; FLAIR's CSF metrics are NaN by definition
    (``FLAIR_UNDEFINED``).
    """
    if contrast not in TISSUE_ORDER:
        message = f"no tissue assumptions for contrast {contrast!r}; known: {sorted(TISSUE_ORDER)}"
        raise ValueError(message)
    grid = Grid.of(ants_image(np.asarray(raw, dtype=np.float32), affine))
    raw_c = grid.canonical(raw)
    data = grid.canonical(np.clip(np.nan_to_num(corrected, nan=0.0), 0.0, None).astype(np.float32))
    head_c = grid.canonical(np.asarray(head, dtype=bool))
    # The measures of the air and of the image as a whole (EFC, FBER, ghosts, spikes, FWHM)
    # on the image as acquired: N4 fits its field inside the head, and its extrapolation
    # into the air draws structure there (a normal FLAIR's spectral peak rose from 1.51 to
    # 1.88 through it, past the spike detector's cohort).
    acquired = np.clip(np.nan_to_num(raw_c, nan=0.0), 0.0, None).astype(np.float32)
    native, frame, head_distance = native_measures(grid, raw_c, acquired, head_c)
    if transform is None:
        registration: tuple[np.ndarray | None, str] = (None, "no template transform")
    else:
        registration = registration_affine(transform, grid)
    air = background_measures(data, head_c, frame, head_distance, grid.spacing, registration[0])
    del frame, head_distance
    tissues, values = tissue_measures(
        grid, raw_c, data, head_c, Path(transform or ""), registration, resolution
    )
    # wm2max on one scale: white matter and the image's top both from the corrected image.
    extra = air_tissue_measures(values, air, data, image_top(data)) if values else {}
    metrics, warnings, details = combine(native, air.part, tissues, extra, {})
    metrics.update({k: v for k, v in inu.items() if k.startswith("iqm_inu_")})
    _contrast_rules(contrast, metrics)
    details.pop("timings_s", None)
    details["tissue_order"] = list(TISSUE_ORDER[contrast])
    if values:
        medians = {name: float(np.median(values[name])) for name in TISSUES}
        details["tissue_medians"] = {k: round(v, 3) for k, v in medians.items()}
    return metrics, warnings, details
