"""Model inputs: registered images on the template grid, the brain crop,
reference selection, folds and the training-data hash.

Volumes are indexed ``(x, y, z)`` on the MNI152 grid (the template's voxel
axes, RAS+); the model works on axial slices ``volume[:, :, z]`` of the brain
bounding box, intensities normalised inside the template brain mask to [0, 1]
(1st and 99th percentiles; up to 1.5 above), then standardised: each volume's
histogram landmarks are mapped onto the reference subjects' mean landmarks
(``mriaudit.intensity.standardize_histogram``), by train and score alike.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np

from mriaudit import files
from mriaudit.intensity import LANDMARK_PERCENTILES, normalize_intensity
from mriaudit.template import load_brain_mask, load_template

#: The network halves the slice size this many times, so crops are multiples of 2**DEPTH.
DEPTH = 3
#: Voxels of background kept around the brain bounding box (in x and y).
MARGIN = 2
NORMALISATION = {
    "method": "percentile",
    "lower_percentile": 1.0,
    "upper_percentile": 99.0,
    "standardisation": "histogram landmarks",
    "landmark_percentiles": list(LANDMARK_PERCENTILES),
}


class ImageError(ValueError):
    """A registered image that cannot be used (missing or empty, wrong grid, flat)."""


@dataclass(frozen=True)
class BrainGrid:
    """The template grid, its brain mask and the crop the model sees.

    ``crop`` holds ``(start, stop)`` voxel indices per axis; the cropped shape
    is a multiple of ``2**DEPTH`` in x and y.
    """

    resolution: int
    shape: tuple[int, int, int]
    affine: np.ndarray
    mask: np.ndarray
    crop: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

    @property
    def index(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in self.crop)

    @property
    def crop_mask(self) -> np.ndarray:
        return self.mask[self.index]

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel in ml."""
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0


def _span(low: int, high: int, size: int, multiple: int) -> tuple[int, int]:
    """A range holding [low, high) grown to a multiple of ``multiple``, kept inside [0, size)."""
    length = -(-(high - low) // multiple) * multiple
    length = min(length, size - size % multiple)
    start = max(0, low - (length - (high - low)) // 2)
    start = min(start, size - length)
    return int(start), int(start + length)


@lru_cache(maxsize=2)
def brain_grid(resolution: int = 2) -> BrainGrid:
    """Template grid at ``resolution`` mm with the brain crop (about 80 x 96 x 78 voxels at 2 mm)."""
    template = load_template(resolution=resolution)
    mask = np.asarray(load_brain_mask(resolution=resolution).get_fdata()) > 0
    inside = np.argwhere(mask)
    low, high = inside.min(axis=0), inside.max(axis=0) + 1
    multiple = 2**DEPTH
    crop_x = _span(
        max(0, low[0] - MARGIN), min(mask.shape[0], high[0] + MARGIN), mask.shape[0], multiple
    )
    crop_y = _span(
        max(0, low[1] - MARGIN), min(mask.shape[1], high[1] + MARGIN), mask.shape[1], multiple
    )
    crop_z = (int(low[2]), int(high[2]))
    return BrainGrid(
        resolution=resolution,
        shape=tuple(int(s) for s in mask.shape),
        affine=np.asarray(template.affine, dtype=float),
        mask=mask,
        crop=(crop_x, crop_y, crop_z),
    )


def load_normalised(path: str | Path, *, grid: BrainGrid) -> np.ndarray:
    """Registered image at ``path`` normalised inside the brain mask, cropped.

    Returns float32 of the crop shape, 0 outside the brain mask. Raises
    ``ImageError`` for a missing or empty file, an unreadable file, a grid other
    than the template's, or an image without contrast inside the brain.
    """
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        message = f"registered image {path.name} is missing or empty"
        raise ImageError(message)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
    except Exception as error:
        message = f"registered image {path.name} cannot be read: {type(error).__name__}: {error}"
        raise ImageError(message) from error
    data = np.squeeze(data)
    if data.shape != grid.shape:
        message = f"registered image {path.name} has shape {data.shape}, not the template grid {grid.shape}"
        raise ImageError(message)
    if not np.allclose(img.affine, grid.affine, atol=1e-3):
        message = f"registered image {path.name} has an affine other than the template's"
        raise ImageError(message)
    try:
        normalised = normalize_intensity(data, grid.mask)
    except ValueError as error:
        message = f"registered image {path.name}: {error}"
        raise ImageError(message) from error
    return normalised[grid.index]


#: Findings of a register (or contrast) record that keep a subject out of the reference.
UNFIT_FINDINGS = {
    "registration_failed": "registration failed",
    "contrast_mismatch": "does not match its T1w (another head or session?)",
    "contrast_unexpected": "its contrast is not the one its name says",
}


def reference_problem(image: str | Path, record: str | Path) -> str:
    """Why a subject cannot train the model ("" when it can).

    A reference subject needs a register record (or, for another contrast's model,
    its ``contrast`` record) with status ``ok``, without a finding that makes its
    image unfit (``UNFIT_FINDINGS``), and a non-empty registered image.
    """
    record = Path(record)
    try:
        content = json.loads(record.read_text())
    except (OSError, ValueError) as error:
        return f"register record unreadable ({type(error).__name__})"
    status = content.get("status")
    if status != "ok":
        return f"register status {status}"
    unfit = [f for f in content.get("findings", []) if f in UNFIT_FINDINGS]
    if unfit:
        return UNFIT_FINDINGS[unfit[0]]
    image = Path(image)
    if not image.is_file() or image.stat().st_size == 0:
        return "registered image missing or empty"
    return ""


def fold_count(n_subjects: int, folds: int) -> int:
    """Folds actually used for ``n_subjects`` usable reference subjects.

    Each model should train on at least two subjects' worth of other folds, so
    with fewer than ``2 * folds`` subjects the count drops to ``n // 2`` (at
    least 2). Returns 0 when fewer than 3 subjects make training impossible.
    """
    if n_subjects < 3:
        return 0
    return max(2, min(int(folds), n_subjects // 2))


def assign_folds(
    subjects: Sequence[str],
    *,
    folds: int,
    seed: int,
    groups: Mapping[str, str] | None = None,
) -> dict[str, int]:
    """Deterministic, balanced fold of each subject: ``{subject: 0..folds-1}``.

    With ``groups`` (``{subject: group}``), folds are dealt to groups and every
    subject of a group shares its fold (a subject without a group is a group
    of its own): scans of one person never sit on both sides of a fold.
    Subjects are sorted first, so the assignment depends only on the set of
    subjects, the groups and the seed, not on their order.
    """
    groups = groups or {}
    group_of = {s: groups.get(s, f"subject:{s}") for s in set(subjects)}
    ordered = sorted(set(group_of.values()))
    order = np.random.default_rng([int(seed), 0xF01D]).permutation(len(ordered))
    fold_of = {ordered[i]: int(rank % folds) for rank, i in enumerate(order)}
    return {s: fold_of[g] for s, g in sorted(group_of.items())}


def group_count(subjects: Sequence[str], groups: Mapping[str, str] | None) -> int:
    """Distinct fold groups among ``subjects`` (see ``assign_folds``)."""
    return len({(groups or {}).get(s, f"subject:{s}") for s in subjects})


def data_hash(images: dict[str, Path]) -> str:
    """sha256 over the sorted training subjects and the sha256 of each one's image."""
    digest = hashlib.sha256()
    for subject in sorted(images):
        digest.update(subject.encode())
        digest.update(b"\0")
        digest.update(files.sha256(images[subject]).encode())
        digest.update(b"\n")
    return digest.hexdigest()
