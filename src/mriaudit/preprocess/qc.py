"""Registration QC: was the image put onto the template, and is it a T1-weighted head?

Similarity inside the template brain mask (``masked_correlation``,
``mutual_information``), the affine's scale, and per contrast check
(``CONTRAST_CHECKS``) whether the registered image correlates with the template
the way a T1 does; ``registration_problems`` turns them into the reasons a
registration failed (wrong contrast, no anatomy, implausible scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ants
import numpy as np
from scipy import ndimage as ndi

from mriaudit.preprocess.images import voxel_sizes


@dataclass(frozen=True)
class ContrastCheck:
    """How a registration to the (T1) template is judged for one audited contrast.

    ``reg_similarity`` is ``sign`` times the Pearson correlation with the T1
    template inside its brain mask eroded by ``erosion_mm``. A correct
    registration reaches ``min_similarity``; from ``settled_similarity`` up it
    is not second-guessed by turned starts (``HEADER_ROTATIONS``).
    """

    sign: float
    erosion_mm: float
    min_similarity: float | None
    settled_similarity: float | None

    @property
    def correlates(self) -> bool:
        """Whether the contrast's correlation with the T1 template says anything
        (False: only its mutual information and the affine's scale are judged)."""
        return self.min_similarity is not None


# Calibrated on the real scans of ../shared (affine, 2 mm grid).
# T1w: correct whole-head registrations (3D at 0.9-1.6 mm, 2D sagittal supine and
# prone, 2D axial) correlate 0.48-0.60 inside the whole brain mask, skull-stripped
# and contrast-enhanced T1 0.35-0.54; a wrong start gives 0.12-0.25, a head turned
# 180 degrees up to 0.30, a partial-coverage slab 0.16, PD 0.25 and T2 below 0.
# T2w: CSF is bright, so T2 anti-correlates with the T1 template. The brain's rim
# is bright CSF in a T2 with skull but black after skull stripping, so only the
# brain 6 mm in from the mask's edge is compared. There, correct registrations of
# the five real T2 (healthy, stroke with skull, glioma skull-stripped) give
# 0.25-0.49, the same images shifted 10 mm -0.01 to 0.21, one registration of
# the ARC stroke T2 tilted by about 15 degrees 0.18, and T1 scans -0.30 to -0.55.
CONTRAST_CHECKS: dict[str, ContrastCheck] = {
    "T1w": ContrastCheck(sign=1.0, erosion_mm=0.0, min_similarity=0.3, settled_similarity=0.45),
    "T2w": ContrastCheck(sign=-1.0, erosion_mm=6.0, min_similarity=0.2, settled_similarity=0.3),
    # FLAIR: CSF dark as in a T1, white matter darker than grey matter as in a T2; its
    # correlation with the T1 template says neither (-0.37 to 0.18 on the real FLAIR of
    # ../shared), so a FLAIR registered without its T1w is judged by mutual information
    # and scale only, and no turned start can prove itself better than the header's.
    "FLAIR": ContrastCheck(sign=1.0, erosion_mm=0.0, min_similarity=None, settled_similarity=None),
}
CONTRASTS: tuple[str, ...] = tuple(CONTRAST_CHECKS)
# Volume scale (template to subject): 0.61-0.96 on the same scans, since the
# MNI152 brain is larger than most.
SCALE_RANGE = (0.6, 1.6)
# Mutual information with the template inside its brain mask (nats) below which
# an image shows no anatomy at all: pure noise gives 0.002-0.015, while a head
# registered upside down still gives 0.05-0.08 and T2, PD or FLAIR 0.12-0.17.
NO_ANATOMY_INFORMATION = 0.03


def masked_correlation(first: np.ndarray, second: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of two same-shape images inside ``mask`` (higher is better).

    NaN when either image is constant inside the mask or the mask is empty.
    """
    inside = np.asarray(mask, dtype=bool)
    a = np.asarray(first, dtype=np.float64)[inside]
    b = np.asarray(second, dtype=np.float64)[inside]
    if a.size < 2:
        return float("nan")
    a = a - a.mean()
    b = b - b.mean()
    norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
    if norm == 0.0:
        return float("nan")
    return float((a * b).sum() / norm)


def mutual_information(first: np.ndarray, second: np.ndarray, *, bins: int = 32) -> float:
    """Mutual information (nats, >= 0; higher is more similar) of two paired samples."""
    a = np.asarray(first, dtype=np.float64).ravel()
    b = np.asarray(second, dtype=np.float64).ravel()
    if a.size == 0 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    joint, _, _ = np.histogram2d(a, b, bins=bins)
    joint /= joint.sum()
    outer = joint.sum(axis=1, keepdims=True) @ joint.sum(axis=0, keepdims=True)
    nonzero = joint > 0
    return float((joint[nonzero] * np.log(joint[nonzero] / outer[nonzero])).sum())


def affine_scale(matrix: np.ndarray) -> float:
    """Volume scale of an affine: determinant of its 3x3 linear part."""
    return float(np.linalg.det(np.asarray(matrix, dtype=np.float64)[:3, :3]))


def transform_matrix(path: Path) -> np.ndarray:
    """3x3 linear part of an ANTs/ITK affine ``.mat`` (maps template to subject, LPS mm)."""
    transform = ants.read_transform(str(path))
    return np.asarray(transform.parameters[:9], dtype=np.float64).reshape(3, 3)


def contrast_check(contrast: str) -> ContrastCheck:
    """The registration check of an audited ``contrast`` (one of ``CONTRASTS``)."""
    if contrast not in CONTRAST_CHECKS:
        message = f"unknown contrast {contrast!r}; expected one of {CONTRASTS}"
        raise ValueError(message)
    return CONTRAST_CHECKS[contrast]


def similarity_mask(brain: np.ndarray, affine: np.ndarray, *, contrast: str) -> np.ndarray:
    """Where ``reg_similarity`` is measured: the template ``brain`` mask less its rim.

    The rim is ``contrast_check(contrast).erosion_mm`` deep (mm, along the
    ``affine``'s voxel sizes); no rim for T1w.
    """
    inside = np.asarray(brain, dtype=bool)
    depth = contrast_check(contrast).erosion_mm
    if depth <= 0:
        return inside
    return ndi.distance_transform_edt(inside, sampling=voxel_sizes(affine)) > depth


def _similarity_problems(similarity: float, check: ContrastCheck, contrast: str) -> list[str]:
    if not np.isfinite(similarity):
        return ["registered image is constant inside the template brain mask"]
    if similarity < -check.min_similarity:
        return [
            f"registered image has the opposite contrast to {contrast} (similarity "
            f"{similarity:.2f}): inverted or other contrast, or a failed registration"
        ]
    if similarity < check.min_similarity:
        return [f"low similarity to the template ({similarity:.2f} < {check.min_similarity})"]
    return []


def registration_problems(
    *,
    similarity: float,
    scale: float,
    information: float | None = None,
    contrast: str = "T1w",
) -> list[str]:
    """Why a registration is implausible (empty list when it looks right).

    ``similarity`` is ``reg_similarity`` (signed correlation with the template,
    see ``ContrastCheck``; higher is better), ``scale`` is ``reg_scale`` and
    ``information`` ``reg_mutual_information`` (nats, higher is better).
    ``contrast`` is the contrast the image should have (``CONTRASTS``); the
    similarity is not judged where it says nothing (``ContrastCheck.correlates``).
    """
    check = contrast_check(contrast)
    problems = []
    if information is not None and information < NO_ANATOMY_INFORMATION:
        problems.append(
            f"no anatomy to register (mutual information with the template {information:.3f})"
        )
    if check.correlates:
        problems += _similarity_problems(similarity, check, contrast)
    low, high = SCALE_RANGE
    if not np.isfinite(scale) or not low <= scale <= high:
        problems.append(f"implausible volume scale {scale:.2f} (expected {low} to {high})")
    return problems
