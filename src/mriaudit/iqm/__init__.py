"""MRIQC-style image quality metrics (IQMs) of the native T1-weighted image.

Modules: ``metrics`` (the formulas on arrays, MRIQC's names and definitions),
``masks`` (frame, hat, air, artefact and tissue masks), ``tissues`` (the prior-
weighted Gaussian mixture), ``grid`` (the images on the native grid in RAS order,
the registration's affine), ``priors`` (the template's tissue priors warped
there), ``measures`` (the IQMs of one subject on that grid, in three parts),
``beside`` (the parts computed in a child beside the registration), ``stage``
(the iqm stage of one subject: :func:`iqm_subject`).
"""

from mriaudit.iqm.beside import NativeMeasures
from mriaudit.iqm.masks import HEAD_MARGIN_MM, artifact_mask, distance_mm, frame_mask, tissue_masks
from mriaudit.iqm.metrics import (
    IQM_CAUSES,
    IQM_DIRECTIONS,
    IQM_NAMES,
    IQM_TITLES,
    SUMMARY_STATS,
    air_sigma,
    cjv,
    cnr,
    efc,
    fber,
    field_range,
    fuzzy_jaccard,
    fwhm,
    qi_1,
    rpve,
    snr,
    snr_dietrich,
    summary_stats,
    volume_fractions,
    wm2max,
)
from mriaudit.iqm.stage import STAGE, compute_iqms, iqm_subject
from mriaudit.iqm.tissues import SegmentationUnavailable, segment_tissues

__all__ = [
    "HEAD_MARGIN_MM",
    "IQM_CAUSES",
    "IQM_DIRECTIONS",
    "IQM_NAMES",
    "IQM_TITLES",
    "STAGE",
    "SUMMARY_STATS",
    "NativeMeasures",
    "SegmentationUnavailable",
    "air_sigma",
    "artifact_mask",
    "cjv",
    "cnr",
    "compute_iqms",
    "distance_mm",
    "efc",
    "fber",
    "field_range",
    "frame_mask",
    "fuzzy_jaccard",
    "fwhm",
    "iqm_subject",
    "qi_1",
    "rpve",
    "segment_tissues",
    "snr",
    "snr_dietrich",
    "summary_stats",
    "tissue_masks",
    "volume_fractions",
    "wm2max",
]
