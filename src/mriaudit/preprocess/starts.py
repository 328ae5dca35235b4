"""Where a registration starts: candidate head positions and coarse trial registrations.

A whole-head image with a long neck or a large field of view traps a registration
that starts at the image centre. ``candidate_centres`` proposes starts (the
intensity centre of mass, and a brain centre estimated from the top of the head,
``SCALP_MM`` below the scalp); ``coarse_starts`` registers each briefly on a 4 mm
copy of both images (``CoarseTemplate``) and ``distinct_starts`` keeps the best
ones that land apart, for the full registration to refine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ants
import numpy as np
from scipy import ndimage as ndi

from mriaudit.preprocess.images import physical_points
from mriaudit.preprocess.masks import head_mask
from mriaudit.preprocess.qc import mutual_information

log = logging.getLogger(__name__)


# Registration pyramid (mm): a short rigid search from each candidate start at
# 8 mm (on copies of both images on a 4 mm grid, so that each start costs
# little), rigid then affine at 4 mm from the best starts, and the affine on
# the template grid (2 mm; 1 mm too for the 1 mm template) for the best of them.
COARSE_GRID_MM = 4.0
COARSE_LEVELS_MM = (8.0,)
COARSE_ITERATIONS = (30,)
COARSE_SAMPLING_RATE = 0.5
SAME_START_MM = 4.0
# Distance from the top of the scalp down to the template brain's centre of mass
# is the template's own (brain top to centre) plus a typical scalp and skull.
SCALP_MM = 10.0


def _smooth_to(image: ants.ANTsImage, resolution_mm: float) -> ants.ANTsImage:
    """Anti-alias an image for sampling at ``resolution_mm`` (no-op when already that coarse)."""
    spacing = np.asarray(image.spacing, dtype=float)
    sigma = np.sqrt(np.clip(resolution_mm**2 - spacing**2, 0, None)) / 2.355
    if not np.any(sigma > 0):
        return image
    return ants.smooth_image(image, list(sigma), sigma_in_physical_coordinates=True)


def _shrink(level_mm: float, resolution_mm: float) -> int:
    return max(1, round(level_mm / resolution_mm))


def start_transform_file(
    fixed_centre: np.ndarray,
    moving_centre: np.ndarray,
    path: Path,
    *,
    rotation: np.ndarray | None = None,
) -> Path:
    """ITK affine taking ``fixed_centre`` onto ``moving_centre`` (LPS mm), written to ``path``.

    ``rotation`` (3x3, template to subject directions; identity by default) turns
    the template about its centre first.
    """
    transform = ants.create_ants_transform(
        transform_type="AffineTransform",
        dimension=3,
        matrix=np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64),
        center=tuple(float(v) for v in fixed_centre),
        translation=tuple(float(v) for v in moving_centre - fixed_centre),
    )
    ants.write_transform(transform, str(path))
    return path


def candidate_centres(
    moving: ants.ANTsImage,
    *,
    brain_top_to_centre_mm: float,
    superior: Sequence[float] = (0.0, 0.0, 1.0),
) -> dict[str, np.ndarray]:
    """Where the brain's centre may be in ``moving`` (LPS mm), by name.

    ``com``: intensity centre of mass (the usual ANTs start; pulled down by a
    long neck or a large field of view). ``top``: below the top of the head
    (its head-mask voxel furthest along ``superior``, the subject's superior
    direction in LPS, +z when the header is right) by ``brain_top_to_centre_mm``
    plus the scalp, centred on the upper 100 mm of the head. ``mid``: halfway
    between the two. ``top`` and ``mid`` are missing when no head is found.
    """
    data = moving.numpy()
    weights = np.clip(data, 0, None)
    if weights.sum() > 0:
        index = np.array(ndi.center_of_mass(weights))
    else:
        index = (np.asarray(data.shape) - 1) / 2
    centre_of_mass = physical_points(moving, index[:, None])[:, 0]
    centres = {"com": centre_of_mass}
    mask = head_mask(data, spacing_mm=tuple(float(s) for s in moving.spacing))
    if mask.sum() > 100:
        up = np.asarray(superior, dtype=np.float64) / np.linalg.norm(superior)
        points = physical_points(moving, np.argwhere(mask).T.astype(np.float64))
        height = up @ points
        top = float(height.max())
        upper = points[:, height > top - 100.0].mean(axis=1)
        top_centre = upper + up * (top - SCALP_MM - brain_top_to_centre_mm - up @ upper)
        centres["top"] = top_centre
        centres["mid"] = (top_centre + centre_of_mass) / 2
    return centres


def _registration_options(levels_mm: Sequence[float], resolution_mm: float) -> dict[str, Any]:
    return {
        "aff_shrink_factors": tuple(_shrink(level, resolution_mm) for level in levels_mm),
        "aff_smoothing_sigmas": tuple(level / 2 for level in levels_mm),
        "smoothing_in_mm": True,
        "aff_metric": "mattes",
        "aff_sampling": 32,
    }


def coarse_copy(image: ants.ANTsImage) -> ants.ANTsImage:
    """Anti-aliased copy of an image on a ``COARSE_GRID_MM`` grid (same origin and axes)."""
    return ants.resample_image(
        _smooth_to(image, COARSE_GRID_MM), (COARSE_GRID_MM,) * 3, use_voxels=False, interp_type=0
    )


@dataclass
class CoarseTemplate:
    """The template on the coarse grid, for the search over registration starts.

    ``mask``: brain mask on that grid; ``inside``: the brain dilated by two
    voxels (bool array), where starts are scored; ``centre``: the brain's centre
    of mass (LPS mm); ``top_to_centre_mm``: from the top of the brain down to it.
    """

    image: ants.ANTsImage
    mask: ants.ANTsImage
    inside: np.ndarray
    centre: np.ndarray
    top_to_centre_mm: float

    @property
    def landmarks(self) -> np.ndarray:
        """The brain centre and points 40 mm from it along each axis (3, 7; LPS mm)."""
        offsets = np.hstack([np.zeros((3, 1)), 40.0 * np.eye(3), -40.0 * np.eye(3)])
        return self.centre[:, None] + offsets

    @classmethod
    def of(cls, fixed: ants.ANTsImage, fixed_mask: ants.ANTsImage) -> CoarseTemplate:
        image = coarse_copy(fixed)
        mask = ants.resample_image(
            fixed_mask, (COARSE_GRID_MM,) * 3, use_voxels=False, interp_type=1
        )
        points = physical_points(fixed, np.argwhere(fixed_mask.numpy() > 0).T.astype(np.float64))
        centre = points.mean(axis=1)
        inside = ndi.binary_dilation(mask.numpy() > 0, iterations=2)
        return cls(image, mask, inside, centre, float(points[2].max() - centre[2]))

    def score(self, moving: ants.ANTsImage, transform: str) -> float:
        """Mutual information with ``moving`` brought onto the grid by ``transform`` (higher is better)."""
        warped = ants.apply_transforms(self.image, moving, [transform]).numpy()
        return mutual_information(warped[self.inside], self.image.numpy()[self.inside])


def coarse_starts(
    moving: ants.ANTsImage,
    coarse: CoarseTemplate,
    *,
    workdir: Path,
    rotation: np.ndarray | None = None,
) -> list[tuple[float, str, str]]:
    """A short rigid registration on the coarse grid from each ``candidate_centres`` start.

    ``moving`` is a ``coarse_copy`` of the subject image. ``rotation`` (3x3,
    LPS, template to subject) turns every start, for anatomy that the header
    places turned. Returns ``(CoarseTemplate.score, start name, ANTs .mat
    path)`` per start; ANTs' files are written in ``workdir``.
    """
    turn = np.eye(3) if rotation is None else np.asarray(rotation, dtype=np.float64)
    centres = candidate_centres(
        moving, brain_top_to_centre_mm=coarse.top_to_centre_mm, superior=turn[:, 2]
    )
    scored = []
    for name, centre in centres.items():
        start = start_transform_file(
            coarse.centre, centre, workdir / f"start_{name}.mat", rotation=turn
        )
        result = ants.registration(
            coarse.image,
            moving,
            "Rigid",
            initial_transform=[str(start)],
            mask=coarse.mask,
            aff_iterations=COARSE_ITERATIONS,
            aff_random_sampling_rate=COARSE_SAMPLING_RATE,
            outprefix=str(workdir / f"coarse_{name}_"),
            **_registration_options(COARSE_LEVELS_MM, COARSE_GRID_MM),
        )
        score = coarse.score(moving, result["fwdtransforms"][0])
        log.debug("registration start %s: mutual information %.3f", name, score)
        scored.append((score, name, result["fwdtransforms"][0]))
    return scored


def map_points(transform: str | Path, points: np.ndarray) -> np.ndarray:
    """Points (3, N; LPS mm) mapped by an ANTs transform file (template to subject)."""
    mapping = ants.read_transform(str(transform))
    return np.array([mapping.apply_to_point(tuple(point)) for point in points.T]).T


def distinct_starts(
    scored: Sequence[tuple[float, str, str]],
    landmarks: np.ndarray,
    *,
    count: int,
    tolerance_mm: float,
) -> list[tuple[float, str, str]]:
    """Up to ``count`` best-scoring starts that put ``landmarks`` in different places.

    ``scored`` holds ``(score, name, transform path)``; a start whose landmarks
    (3, N; LPS mm) all land within ``tolerance_mm`` of a better start's is the
    same start and is dropped.
    """
    kept: list[tuple[np.ndarray, tuple[float, str, str]]] = []
    for candidate in sorted(scored, key=lambda item: item[0], reverse=True):
        placed = map_points(candidate[2], landmarks)
        if all(np.abs(placed - other).max() > tolerance_mm for other, _ in kept):
            kept.append((placed, candidate))
        if len(kept) == count:
            break
    return [candidate for _, candidate in kept]


def _centre_transform(moving: ants.ANTsImage, fixed: ants.ANTsImage, path: Path) -> Path:
    """Fallback transform: the image's geometric centre onto the template's."""
    centre = physical_points(moving, (np.asarray(moving.shape)[:, None] - 1) / 2)[:, 0]
    fixed_centre = physical_points(fixed, (np.asarray(fixed.shape)[:, None] - 1) / 2)[:, 0]
    return start_transform_file(fixed_centre, centre, path)
