"""Bias-field correction (N4) and affine registration to MNI152, with their QC metrics.

Both stages use ANTsPy. Images are read with nibabel and handed to ANTs with
the geometry nibabel reports (RAS+ affine turned into ITK's LPS origin,
spacing and direction), and written back with nibabel, so the bias-corrected
image keeps the converted image's grid, affine and header exactly and the
registered image lies on the template grid. Spacings and distances are in mm.

The nilearn MNI152 template is skull-stripped, while most inputs show the whole
head: registration therefore measures similarity inside the template brain mask
only, and starts from several candidate head positions (intensity centre of
mass, and a brain centre estimated from the top of the head) so that a long neck
or a large field of view does not trap it far from the brain.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ants
import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from mriaudit import records, template
from mriaudit.intensity import finite

log = logging.getLogger(__name__)

N4_STAGE = "n4"
REGISTER_STAGE = "register"

# N4 fits a smooth field, so it runs on one voxel of every ~6 mm block (not the
# block means: those blur the tissue peaks N4 sharpens, and it then took out
# less than half of a linear field). Four fitting levels from knots 200 mm
# apart (25 mm at the finest, as ANTs' defaults) with 20 iterations each: on a
# real 1 mm T1, a +-20 % field leaves the white-matter CV within 3 % of the
# unbiased image's, and a 20 mm lesion keeps 90 % of its contrast. A finer mesh
# (100 mm knots) removes the field as well but flattens the lesion to 20 %. The
# log field is then interpolated back onto the image grid.
N4_GRID_MM = 6.0
N4_ITERATIONS = (20, 20, 20, 20)
N4_TOLERANCE = 1e-3
N4_SPLINE_DISTANCE_MM = 200.0
#: Sampled voxels N4 needs inside the mask; smaller heads are sampled finer.
MIN_N4_SAMPLES = 27

# Registration pyramid (mm): a short rigid search from each candidate start at
# 8 mm (on copies of both images on a 4 mm grid, so that each start costs
# little), rigid then affine at 4 mm from the best starts, and the affine on
# the template grid (2 mm; 1 mm too for the 1 mm template) for the best of them.
COARSE_GRID_MM = 4.0
COARSE_LEVELS_MM = (8.0,)
COARSE_ITERATIONS = (30,)
COARSE_SAMPLING_RATE = 0.5
RIGID_LEVELS_MM = (4.0,)
RIGID_ITERATIONS = (50,)
AFFINE_LEVELS_MM = (4.0,)
AFFINE_ITERATIONS = (50,)
FINE_LEVELS_MM = (2.0,)
FINE_ITERATIONS = (15,)
# Fraction of the template grid's points that the metric samples: on real 1 mm
# T1 heads 0.1 lands within 2 mm (max over the brain; 0.2-0.8 mm on average) of a
# 0.5-rate, 300-iteration registration, 30% faster than 0.25.
SAMPLING_RATE = 0.1
# Starts refined in full: the best ones on the coarse grid that do not land
# within SAME_START_MM of a better one.
REFINED_STARTS = 2
SAME_START_MM = 4.0
# ANTs seeds its sampling from the clock unless told; a fixed seed makes runs
# repeatable (exactly with one thread, to ~1e-4 mm with more: ITK's parallel sums).
RANDOM_SEED = 20240
# Distance from the top of the scalp down to the template brain's centre of mass
# is the template's own (brain top to centre) plus a typical scalp and skull.
SCALP_MM = 10.0

# A mistyped patient position (prone/supine, head/feet first, decubitus) leaves
# the anatomy turned against the header. When the header's registration fails,
# these turns (LPS, template to subject) are tried; one is kept only when it
# passes every check and beats the header's correlation by the margin.
HEADER_ROTATIONS = {
    "turned 180 degrees about the superior axis": np.diag([-1.0, -1.0, 1.0]),
    "turned 180 degrees about the anterior axis": np.diag([-1.0, 1.0, -1.0]),
    "turned 180 degrees about the left-right axis": np.diag([1.0, -1.0, -1.0]),
    "turned 90 degrees about the superior axis": np.array(
        [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    ),
    "turned -90 degrees about the superior axis": np.array(
        [[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    ),
}
HEADER_ROTATION_MARGIN = 0.1


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
    min_similarity: float
    settled_similarity: float


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
}
CONTRASTS: tuple[str, ...] = tuple(CONTRAST_CHECKS)
# Volume scale (template to subject): 0.61-0.96 on the same scans, since the
# MNI152 brain is larger than most.
SCALE_RANGE = (0.6, 1.6)
# Mutual information with the template inside its brain mask (nats) below which
# an image shows no anatomy at all: pure noise gives 0.002-0.015, while a head
# registered upside down still gives 0.05-0.08 and T2, PD or FLAIR 0.12-0.17.
NO_ANATOMY_INFORMATION = 0.03


# ---------------------------------------------------------------------------
# Small pure helpers


def otsu_threshold(values: np.ndarray, *, bins: int = 256) -> float:
    """Otsu's threshold of a 1D sample: maximises the between-class variance.

    Returns the threshold in the units of ``values`` (a histogram bin centre,
    the middle of the gap when two classes are cleanly separated). A constant
    sample returns its value.
    """
    sample = np.asarray(values, dtype=np.float64).ravel()
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        message = "otsu_threshold needs at least one finite value"
        raise ValueError(message)
    low, high = float(sample.min()), float(sample.max())
    if not high > low:
        return low
    counts, edges = np.histogram(sample, bins=bins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    cumulative = np.cumsum(counts * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_low = cumulative / weight_low
        mean_high = (cumulative[-1] - cumulative) / weight_high
        between = weight_low * weight_high * (mean_low - mean_high) ** 2
    between = np.where(weight_high > 0, between, -np.inf)
    # Every threshold inside an empty gap between the classes scores the same:
    # take the middle of the tied run rather than its first bin.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float((centres[best[0]] + centres[best[-1]]) / 2)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndi.label(mask)
    if count <= 1:
        return labels > 0
    # Sizes counted inside each component's bounding box: a bincount of the whole
    # label volume costs a 64-bit copy of it (0.6 s for a 1 mm head).
    boxes = ndi.find_objects(labels)
    sizes = [np.count_nonzero(labels[box] == i) for i, box in enumerate(boxes, start=1)]
    return labels == 1 + int(np.argmax(sizes))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region that does not reach the volume's border filled.

    The same result as ``scipy.ndimage.binary_fill_holes`` (6-connected background),
    from one labelling of the background instead of a dilation repeated until it
    settles (seconds on a 1 mm head).
    """
    labels, count = ndi.label(~mask)
    faces = [labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]]
    outside = np.zeros(count + 1, dtype=bool)
    outside[np.concatenate([face.ravel() for face in faces])] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[labels]


def _close(mask: np.ndarray, *, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Binary closing by about ``radius_mm``, along axes whose voxels are finer than it."""
    steps = max(1, round(radius_mm / float(spacing.min())))
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1, 1, 1] = True
    for axis in range(3):
        if spacing[axis] <= radius_mm:
            index = [1, 1, 1]
            for offset in (0, 2):
                index[axis] = offset
                structure[tuple(index)] = True
    # Pad so that the erosion half of the closing does not eat a head that
    # touches the edge of the field of view (scipy erodes from a zero border).
    padded = np.pad(mask, steps, mode="edge")
    closed = ndi.binary_closing(padded, structure=structure, iterations=steps)
    return closed[(slice(steps, -steps),) * 3]


def head_mask(
    data: np.ndarray,
    *,
    spacing_mm: tuple[float, float, float],
    smoothing_mm: float = 1.5,
    closing_mm: float = 3.0,
) -> np.ndarray:
    """Mask of the head (everything that is not background air), bool of ``data``'s shape.

    ``data`` is a 3D image of any orientation and contrast with a dark
    background; ``spacing_mm`` its voxel size in mm. The image is smoothed
    (``smoothing_mm`` sigma), thresholded halfway between the mean background
    level and Otsu's threshold (Otsu alone cuts dark skull and surface CSF off
    a T1; halfway from the background stays above its noise), hole-filled,
    reduced to the largest connected component, closed (``closing_mm``) and
    hole-filled again. An empty or constant image gives an empty mask.
    """
    volume = finite(np.asarray(data, dtype=np.float32))
    if volume.ndim != 3:
        message = f"head_mask needs a 3D image, got shape {volume.shape}"
        raise ValueError(message)
    spacing = np.asarray(spacing_mm, dtype=float)
    if spacing.shape != (3,) or not np.all(spacing > 0):
        message = f"spacing_mm must be three positive sizes in mm, got {spacing_mm!r}"
        raise ValueError(message)
    smoothed = ndi.gaussian_filter(volume, sigma=smoothing_mm / spacing)
    # A strided sample is enough for the histogram and keeps large images fast.
    sample = smoothed.ravel()[:: max(1, smoothed.size // 400_000)]
    low, high = np.percentile(sample, [0.5, 99.5])
    if not high > low:
        return np.zeros(volume.shape, dtype=bool)
    sample = np.clip(sample, low, high)
    threshold = otsu_threshold(sample)
    background = float(sample[sample <= threshold].mean())
    mask = smoothed > background + 0.5 * (threshold - background)
    if not mask.any():
        return mask
    # Fill before picking the largest component: the scalp is a closed shell
    # that the dark skull separates from the brain.
    mask = _largest_component(fill_holes(mask))
    mask = _close(mask, radius_mm=closing_mm, spacing=spacing)
    return fill_holes(mask)


def block_sample(
    data: np.ndarray, factors: Sequence[int], *, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One voxel per block of ``factors`` voxels: the one at index ``j * factor + (factor - 1) // 2``.

    Edges are padded by repetition to whole blocks. Returns ``(values, inside)``
    of the reduced shape ``ceil(shape / factors)``: the sampled intensities
    (0 where the sampled voxel is outside ``mask``) and whether it is inside
    (all True without a mask). Sampling, unlike block means, keeps the tissue
    intensities unmixed, so the histogram N4 sharpens keeps its peaks.
    """
    values = np.asarray(data, dtype=np.float64)
    inside = np.ones(values.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    factors = [int(f) for f in factors]
    pad = [(0, (-size) % factor) for size, factor in zip(values.shape, factors, strict=True)]
    take = tuple(slice((factor - 1) // 2, None, factor) for factor in factors)
    sampled_inside = np.pad(inside, pad, mode="edge")[take]
    sampled = np.where(sampled_inside, np.pad(values, pad, mode="edge")[take], 0.0)
    return sampled, sampled_inside


def _interpolation_matrix(size: int, factor: int, reduced: int) -> np.ndarray:
    """Linear interpolation from the sampled voxels back to ``size`` voxels (edges held)."""
    position = np.clip((np.arange(size) - (factor - 1) // 2) / factor, 0, reduced - 1)
    lower = np.floor(position).astype(int)
    upper = np.minimum(lower + 1, reduced - 1)
    fraction = position - lower
    matrix = np.zeros((size, reduced))
    matrix[np.arange(size), lower] += 1 - fraction
    matrix[np.arange(size), upper] += fraction
    return matrix


def block_upsample(reduced: np.ndarray, factors: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Trilinear interpolation of a ``block_sample`` result back onto the full grid of ``shape``.

    Separable (one small matrix product per axis), so a smooth field reaches a
    1 mm grid in a fraction of a second. Beyond the outermost sampled voxels
    values are held constant.
    """
    result = np.asarray(reduced, dtype=np.float64)
    for axis, (size, factor) in enumerate(zip(shape, factors, strict=True)):
        matrix = _interpolation_matrix(int(size), int(factor), result.shape[axis])
        result = np.moveaxis(np.tensordot(matrix, np.moveaxis(result, axis, 0), axes=1), 0, axis)
    return result


def bias_field_stats(field: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """MRIQC-style statistics of a multiplicative bias field inside ``mask``.

    ``iqm_inu_med``: median of the field (the field is scaled to unit geometric
    mean, so 1 for a flat or symmetric field). ``iqm_inu_range``: p95 - p5 of
    the field (0 for a flat field; lower is better). ``n4_p05``/``n4_p95``: the
    5th and 95th percentiles themselves.
    """
    values = np.asarray(field, dtype=np.float64)[np.asarray(mask, dtype=bool)]
    if values.size == 0:
        message = "bias_field_stats needs a non-empty mask"
        raise ValueError(message)
    p05, median, p95 = np.percentile(values, [5, 50, 95])
    return {
        "iqm_inu_med": float(median),
        "iqm_inu_range": float(p95 - p05),
        "n4_p05": float(p05),
        "n4_p95": float(p95),
    }


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


def is_flat(data: np.ndarray) -> bool:
    """True when an image holds no usable contrast (empty, constant or non-finite).

    The percentiles come from about a million evenly strided voxels: the same
    verdict as from all of them, for a tenth of the time on a 1 mm head.
    """
    flat = np.asarray(data).ravel()
    values = flat[:: max(1, flat.size // 1_000_000)].astype(np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return True
    low, high = np.percentile(values, [1, 99.9])
    return not (high - low) > 1e-6 * max(abs(high), abs(low), 1e-12)


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
    ``contrast`` is the contrast the image should have (``CONTRASTS``).
    """
    check = contrast_check(contrast)
    problems = []
    if information is not None and information < NO_ANATOMY_INFORMATION:
        problems.append(
            f"no anatomy to register (mutual information with the template {information:.3f})"
        )
    if not np.isfinite(similarity):
        problems.append("registered image is constant inside the template brain mask")
    elif similarity < -check.min_similarity:
        problems.append(
            f"registered image has the opposite contrast to {contrast} (similarity "
            f"{similarity:.2f}): inverted or other contrast, or a failed registration"
        )
    elif similarity < check.min_similarity:
        problems.append(
            f"low similarity to the template ({similarity:.2f} < {check.min_similarity})"
        )
    low, high = SCALE_RANGE
    if not np.isfinite(scale) or not low <= scale <= high:
        problems.append(f"implausible volume scale {scale:.2f} (expected {low} to {high})")
    return problems


# ---------------------------------------------------------------------------
# ANTs plumbing


def ants_image(data: np.ndarray, affine: np.ndarray) -> ants.ANTsImage:
    """An ANTs image of ``data`` (3D, voxel order kept) placed by a nibabel RAS+ ``affine``.

    ITK works in LPS: the first two rows of the affine change sign. A sheared
    affine (rare) is projected onto the nearest rotation, since ITK's direction
    must be orthonormal.
    """
    to_lps = np.diag([-1.0, -1.0, 1.0])
    linear = to_lps @ np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        left, _, right = np.linalg.svd(direction)
        direction = left @ right
        log.warning("sheared affine: direction projected onto the nearest rotation for ANTs")
    return ants.from_numpy(
        np.ascontiguousarray(data, dtype=np.float32),
        origin=tuple(float(v) for v in to_lps @ np.asarray(affine, dtype=np.float64)[:3, 3]),
        spacing=tuple(float(v) for v in spacing),
        direction=direction,
    )


def physical_points(image: ants.ANTsImage, indices: np.ndarray) -> np.ndarray:
    """LPS mm coordinates (3, N) of voxel ``indices`` (3, N) of an ANTs image."""
    indices = np.asarray(indices, dtype=np.float64)
    if indices.ndim != 2 or indices.shape[0] != 3:
        message = f"voxel indices must have shape (3, N), got {indices.shape}"
        raise ValueError(message)
    linear = np.asarray(image.direction) * np.asarray(image.spacing)
    return np.asarray(image.origin)[:, None] + linear @ indices


@contextmanager
def ants_environment(*, threads: int) -> Iterator[Path]:
    """Run ANTs with ``threads`` threads, a fixed seed and a private temporary folder.

    ants.registration writes its transforms (and temporaries) under the
    process's temporary folder and never deletes them: the folder given to ANTs
    (as TMPDIR and ``tempfile.tempdir``) is yielded and removed on exit, and the
    previous settings are restored. ITK reads its thread count once, when it
    first starts its thread pool, so the first call in a process sets it.
    """
    names = ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "ANTS_RANDOM_SEED", "TMPDIR")
    saved_environ = {name: os.environ.get(name) for name in names}
    saved_tempdir = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="mriaudit-ants-") as folder:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(1, int(threads)))
        os.environ["ANTS_RANDOM_SEED"] = str(RANDOM_SEED)
        os.environ["TMPDIR"] = folder
        tempfile.tempdir = folder
        try:
            yield Path(folder)
        finally:
            tempfile.tempdir = saved_tempdir
            for name, value in saved_environ.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


# ---------------------------------------------------------------------------
# Image input and output


def load_volume(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """The NIfTI image and its 3D data as float32 (non-finite values set to 0).

    A 4D image with several volumes gives its first volume (logged). Unreadable
    files and images that are not 3D raise ``records.StageError``.
    """
    try:
        image = nib.load(str(path))
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as error:
        reason = f"cannot read {Path(path).name}: {type(error).__name__}: {error}"
        raise records.StageError(reason) from error
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        log.warning("%s has %d volumes: using the first", Path(path).name, data.shape[3])
        data = data[..., 0]
    if data.ndim != 3 or min(data.shape) < 1:
        reason = f"{Path(path).name} is not a 3D image (shape {data.shape})"
        raise records.StageError(reason)
    return image, finite(data)


def voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis (column norms of the affine)."""
    sizes = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(sizes[0]), float(sizes[1]), float(sizes[2]))


def save_like(data: np.ndarray, reference: nib.Nifti1Image, path: Path, *, dtype: type) -> None:
    """Write ``data`` with the grid, affine and header of ``reference`` (no intensity scaling)."""
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    image = nib.Nifti1Image(np.asarray(data).astype(dtype), reference.affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))


def save_on_template(data: np.ndarray, affine: np.ndarray, path: Path, *, dtype: type) -> None:
    """Write an image on the template grid, labelled as MNI152 space."""
    image = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    image.header.set_sform(affine, code="mni")
    image.header.set_qform(affine, code="mni")
    image.header.set_xyzt_units("mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))


# ---------------------------------------------------------------------------
# N4 bias correction


def n4_bias_field(
    data: np.ndarray,
    mask: np.ndarray,
    *,
    spacing_mm: tuple[float, float, float],
    grid_mm: float = N4_GRID_MM,
) -> np.ndarray:
    """N4 bias field of ``data`` (3D) estimated inside ``mask``, on ``data``'s grid.

    N4 runs on one voxel per block of about ``grid_mm`` (see ``block_sample``;
    voxels of the mask with positive intensity only, since N4 works on log
    intensities) and the log field is interpolated back. N4 fixes the field only up to a global factor that drifts
    with the iterations, so the field is scaled to unit geometric mean inside
    the mask: dividing by it keeps the image's intensity level. Returns float32,
    > 0; ``data / field`` is the corrected image.
    """
    spacing = np.asarray(spacing_mm, dtype=float)
    usable = np.asarray(mask, dtype=bool) & (np.asarray(data) > 0)
    if not usable.any():
        message = "the mask holds no voxel with positive intensity: nothing for N4 to fit"
        raise ValueError(message)
    factors = [max(1, round(grid_mm / size)) for size in spacing]
    for attempt in (factors, [max(1, f // 2) for f in factors]):
        samples, reduced_mask = block_sample(data, attempt, mask=usable)
        if reduced_mask.sum() >= MIN_N4_SAMPLES:
            break
    factors = attempt  # very small heads (or masks) are sampled finer for the spline
    image = ants.from_numpy(
        samples.astype(np.float32),
        spacing=tuple(float(s * f) for s, f in zip(spacing, factors, strict=True)),
    )
    field = ants.n4_bias_field_correction(
        image,
        mask=image.new_image_like(reduced_mask.astype(np.float32)),
        shrink_factor=1,
        convergence={"iters": list(N4_ITERATIONS), "tol": N4_TOLERANCE},
        spline_param=N4_SPLINE_DISTANCE_MM,
        return_bias_field=True,
    ).numpy()
    log_field = block_upsample(np.log(np.clip(field, 1e-6, None)), factors, data.shape)
    log_field -= log_field[usable].mean()
    return np.exp(log_field).astype(np.float32)


def bias_correct_subject(
    in_image: Path,
    *,
    out_image: Path,
    out_mask: Path,
    record_path: Path,
    upstream: Sequence[Path],
    threads: int = 1,
) -> dict[str, Any]:
    """Stage ``n4``: N4 bias correction inside a head mask, on the converted image's own grid.

    Writes the corrected image (float32) to ``out_image`` and the head mask
    (uint8) to ``out_mask``, both with ``in_image``'s grid, affine and header.
    Metrics: ``iqm_inu_med``, ``iqm_inu_range``, ``n4_p05``, ``n4_p95`` (see
    ``bias_field_stats``) and ``n4_head_volume_ml``. An empty or constant image
    ends the stage ``failed``. Returns the record.
    """

    def work() -> dict[str, Any]:
        image, data = load_volume(in_image)
        spacing = voxel_sizes(image.affine)
        reason = "image is empty or constant: no head to bias-correct"
        if is_flat(data):
            raise records.StageError(reason)
        mask = head_mask(data, spacing_mm=spacing)
        if not (mask & (data > 0)).any():
            raise records.StageError(reason)
        head_ml = float(mask.sum() * np.prod(spacing) / 1000.0)
        with ants_environment(threads=threads):
            field = n4_bias_field(data, mask, spacing_mm=spacing)
        corrected = data / field
        save_like(corrected, image, out_image, dtype=np.float32)
        save_like(mask, image, out_mask, dtype=np.uint8)
        metrics = {**bias_field_stats(field, mask), "n4_head_volume_ml": round(head_ml, 1)}
        log.info("n4: %s", metrics)
        return records.make_record(N4_STAGE, metrics=metrics)

    return records.run_stage(
        N4_STAGE,
        work,
        record_path=record_path,
        image_outputs=[out_image, out_mask],
        upstream=upstream,
    )


# ---------------------------------------------------------------------------
# Registration


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


def linear_stage(
    kind: str,
    moving: ants.ANTsImage,
    fixed: ants.ANTsImage,
    fixed_mask: ants.ANTsImage,
    start: str | Path,
    *,
    levels_mm: Sequence[float],
    iterations: Sequence[int],
    sampling_rate: float,
    prefix: Path,
) -> Path:
    """One ANTs ``kind`` (``Rigid`` or ``Affine``) registration from the ``start`` transform.

    Multi-resolution over ``levels_mm`` (shrink factors of the template grid,
    Gaussian smoothing of half the level), Mattes mutual information inside
    ``fixed_mask``. Returns the ``.mat`` ANTs writes at ``prefix``: it maps
    template points to subject points (ITK convention) and includes ``start``.
    """
    result = ants.registration(
        fixed,
        moving,
        kind,
        initial_transform=[str(start)],
        mask=fixed_mask,
        aff_iterations=tuple(iterations),
        aff_random_sampling_rate=sampling_rate,
        outprefix=str(prefix),
        **_registration_options(levels_mm, float(np.min(fixed.spacing))),
    )
    return Path(result["fwdtransforms"][0])


def settle_affine(
    moving: ants.ANTsImage,
    fixed: ants.ANTsImage,
    fixed_mask: ants.ANTsImage,
    start: str | Path,
    *,
    workdir: Path,
) -> Path:
    """Rigid, then affine registration on the coarser levels, from ``start``; the ANTs ``.mat``."""
    rigid = linear_stage(
        "Rigid",
        moving,
        fixed,
        fixed_mask,
        start,
        levels_mm=RIGID_LEVELS_MM,
        iterations=RIGID_ITERATIONS,
        sampling_rate=SAMPLING_RATE,
        prefix=workdir / "rigid_",
    )
    return linear_stage(
        "Affine",
        moving,
        fixed,
        fixed_mask,
        rigid,
        levels_mm=AFFINE_LEVELS_MM,
        iterations=AFFINE_ITERATIONS,
        sampling_rate=SAMPLING_RATE,
        prefix=workdir / "affine_",
    )


def finish_affine(
    moving: ants.ANTsImage,
    fixed: ants.ANTsImage,
    fixed_mask: ants.ANTsImage,
    start: str | Path,
    *,
    workdir: Path,
) -> Path:
    """Affine registration on the finest levels (down to the template grid); the ANTs ``.mat``."""
    resolution = float(np.min(fixed.spacing))
    levels = [level for level in FINE_LEVELS_MM if level >= resolution]
    iterations = list(FINE_ITERATIONS[: len(levels)])
    if not levels or resolution < min(levels):
        # A finer template grid gets its own last level.
        levels.append(resolution)
        iterations.append(FINE_ITERATIONS[-1])
    return linear_stage(
        "Affine",
        moving,
        fixed,
        fixed_mask,
        start,
        levels_mm=levels,
        iterations=iterations,
        sampling_rate=SAMPLING_RATE,
        prefix=workdir / "fine_",
    )


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


def affine_to_template(
    moving: ants.ANTsImage,
    fixed: ants.ANTsImage,
    fixed_mask: ants.ANTsImage,
    *,
    workdir: Path,
    rotation: np.ndarray | None = None,
) -> tuple[Path, str]:
    """Rigid then affine registration of ``moving`` to ``fixed``: ANTs ``.mat`` and chosen start.

    ``moving`` should already be anti-aliased and resampled near the template
    resolution. The ``REFINED_STARTS`` best distinct starts of ``coarse_starts``
    go through ``settle_affine`` (a start that scores best on the coarse grid
    can still settle a few mm off), and the one with the highest mutual
    information inside the template brain goes through ``finish_affine``.
    """
    coarse = CoarseTemplate.of(fixed, fixed_mask)
    scored = coarse_starts(coarse_copy(moving), coarse, workdir=workdir, rotation=rotation)
    starts = distinct_starts(
        scored, coarse.landmarks, count=REFINED_STARTS, tolerance_mm=SAME_START_MM
    )
    inside = fixed_mask.numpy() > 0
    template_values = fixed.numpy()[inside]
    results = []
    for _, name, start in starts:
        folder = workdir / f"settle_{name}"
        folder.mkdir()
        transform = settle_affine(moving, fixed, fixed_mask, start, workdir=folder)
        warped = ants.apply_transforms(fixed, moving, [str(transform)]).numpy()
        score = mutual_information(warped[inside], template_values)
        log.debug("registration from %s: mutual information %.3f", name, score)
        results.append((score, name, transform))
    _, name, settled = max(results, key=lambda result: result[0])
    return finish_affine(moving, fixed, fixed_mask, settled, workdir=workdir), name


def _centre_transform(moving: ants.ANTsImage, fixed: ants.ANTsImage, path: Path) -> Path:
    """Fallback transform: the image's geometric centre onto the template's."""
    centre = physical_points(moving, (np.asarray(moving.shape)[:, None] - 1) / 2)[:, 0]
    fixed_centre = physical_points(fixed, (np.asarray(fixed.shape)[:, None] - 1) / 2)[:, 0]
    return start_transform_file(fixed_centre, centre, path)


@dataclass(frozen=True)
class _Criteria:
    """What an attempt is judged by: the template brain (mutual information), the
    part of it where the correlation is measured, and the expected contrast."""

    brain: np.ndarray
    compared: np.ndarray
    contrast: str


@dataclass
class _Attempt:
    """One registration and its quality on the template grid."""

    transform: Path
    start: str
    registered: np.ndarray
    similarity: float
    information: float
    scale: float
    problems: list[str]


def _attempt(
    transform: Path,
    start: str,
    moving: ants.ANTsImage,
    fixed: ants.ANTsImage,
    criteria: _Criteria,
    problems: Sequence[str] = (),
) -> _Attempt:
    registered = ants.apply_transforms(
        fixed, moving, [str(transform)], interpolator="linear"
    ).numpy()
    template_data = fixed.numpy()
    sign = contrast_check(criteria.contrast).sign
    similarity = sign * masked_correlation(registered, template_data, criteria.compared)
    brain = criteria.brain
    information = mutual_information(registered[brain], template_data[brain])
    scale = affine_scale(transform_matrix(transform))
    found = list(problems) or registration_problems(
        similarity=similarity, scale=scale, information=information, contrast=criteria.contrast
    )
    return _Attempt(transform, start, registered, similarity, information, scale, found)


def _best_turn(
    prepared: ants.ANTsImage,
    fixed: ants.ANTsImage,
    fixed_mask: ants.ANTsImage,
    *,
    workdir: Path,
) -> tuple[str, Path, str] | None:
    """The ``HEADER_ROTATIONS`` turn whose best coarse start scores highest, registered.

    Returns ``(turn name, ANTs .mat, start name)``, or None when ANTs fails on
    every turn. On real heads given a wrong header the right turn ranks first.
    """
    coarse = CoarseTemplate.of(fixed, fixed_mask)
    coarse_moving = coarse_copy(prepared)
    turns = []
    for index, (name, rotation) in enumerate(HEADER_ROTATIONS.items()):
        folder = workdir / f"turn{index}"
        folder.mkdir()
        try:
            scored = coarse_starts(coarse_moving, coarse, workdir=folder, rotation=rotation)
        except (RuntimeError, ValueError) as error:
            log.warning("registration %s failed: %s", name, error)
            continue
        score, start, path = max(scored, key=lambda candidate: candidate[0])
        turns.append((score, name, start, path, folder))
    if not turns:
        return None
    _, name, start, path, folder = max(turns, key=lambda turn: turn[0])
    settled = settle_affine(prepared, fixed, fixed_mask, path, workdir=folder)
    return name, finish_affine(prepared, fixed, fixed_mask, settled, workdir=folder), start


def _register_moving(
    moving: ants.ANTsImage,
    fixed: ants.ANTsImage,
    fixed_mask: ants.ANTsImage,
    criteria: _Criteria,
    *,
    workdir: Path,
    resolution: int,
) -> tuple[_Attempt, str | None]:
    """Register as the header says, then, if that is doubtful, as a mislabelled header would.

    Returns the attempt kept and, when a turned start won, the header error it
    implies. A turn (``_best_turn``) is tried when the header's registration
    fails or stays below the contrast's ``settled_similarity``, unless the
    image shows no anatomy or has the opposite contrast (no turn makes a T2
    look like a T1). It is kept only when it passes every plausibility check
    and beats the header's similarity by ``HEADER_ROTATION_MARGIN``.
    """
    check = contrast_check(criteria.contrast)
    try:
        prepared = ants.resample_image(
            moving, (float(resolution),) * 3, use_voxels=False, interp_type=0
        )
        transform, start = affine_to_template(prepared, fixed, fixed_mask, workdir=workdir)
    except (RuntimeError, ValueError) as error:
        log.error("ANTs registration failed: %s", error)
        fallback = _centre_transform(moving, fixed, workdir / "centre.mat")
        failed = [f"ANTs error: {error}"]
        return _attempt(fallback, "none", moving, fixed, criteria, failed), None
    attempt = _attempt(transform, start, moving, fixed, criteria)
    settled = not attempt.problems and attempt.similarity >= check.settled_similarity
    hopeless = attempt.information < NO_ANATOMY_INFORMATION
    if settled or hopeless or attempt.similarity < -check.min_similarity:
        return attempt, None
    try:
        turn = _best_turn(prepared, fixed, fixed_mask, workdir=workdir)
    except (RuntimeError, ValueError) as error:
        log.warning("registration from turned starts failed: %s", error)
        turn = None
    if turn is None:
        return attempt, None
    name, transform, start = turn
    turned = _attempt(transform, start, moving, fixed, criteria)
    log.info("registration %s: r=%.3f, scale %.2f", name, turned.similarity, turned.scale)
    baseline = attempt.similarity if np.isfinite(attempt.similarity) else -1.0
    if not turned.problems and turned.similarity > baseline + HEADER_ROTATION_MARGIN:
        return turned, name
    return attempt, None


def register_subject(
    in_image: Path,
    *,
    out_image: Path,
    out_mask: Path,
    out_transform: Path,
    record_path: Path,
    upstream: Sequence[Path],
    threads: int = 1,
    resolution: int = 2,
    contrast: str = "T1w",
) -> dict[str, Any]:
    """Stage ``register``: affine registration of the bias-corrected image to MNI152.

    Writes the image resampled onto the template grid of ``resolution`` mm
    (float32, linear interpolation, intensities as in ``in_image``) to
    ``out_image``, the template brain mask (uint8) to ``out_mask`` and the ANTs
    affine (template to subject, ``.mat``) to ``out_transform``.

    The similarity metric (mutual information) is contrast-independent; the
    check of the result depends on the ``contrast`` the image should have
    (``CONTRAST_CHECKS``: ``T1w`` or ``T2w``).

    Metrics: ``reg_similarity`` (Pearson correlation with the T1 template inside
    its brain mask, negated and without the brain's 6 mm rim for T2w; higher is
    better; null for a constant result),
    ``reg_scale`` (volume scale of the affine, template to subject; 0.6-1.0 for
    adults) and ``reg_mutual_information`` (nats, inside the brain mask; higher
    is better, contrast-independent). The record's ``registration_start`` names
    the start that won (see ``candidate_centres``; ``none`` when nothing ran).

    Findings (status stays ``ok``, the reason goes to ``warnings``):
    ``registration_failed`` for an implausible result (``registration_problems``),
    an empty image or an ANTs error; ``header_orientation`` when the anatomy
    only registers turned against its header (``HEADER_ROTATIONS``), as after
    a wrongly entered patient position. Returns the record, whose
    ``contrast`` names the check applied.
    """
    contrast_check(contrast)  # a wrong name is the caller's error, not the scan's

    def work() -> dict[str, Any]:
        image, data = load_volume(in_image)
        fixed_nii = template.load_template(resolution=resolution)
        template_data = fixed_nii.get_fdata(dtype=np.float32)
        brain = template.load_brain_mask(resolution=resolution).get_fdata() > 0
        compared = similarity_mask(brain, fixed_nii.affine, contrast=contrast)
        criteria = _Criteria(brain=brain, compared=compared, contrast=contrast)
        findings: list[str] = []
        warnings: list[str] = []
        with ants_environment(threads=threads) as workdir:
            fixed = ants_image(template_data, fixed_nii.affine)
            fixed_mask = ants_image(brain.astype(np.float32), fixed_nii.affine)
            moving = _smooth_to(ants_image(data, image.affine), float(resolution))
            if is_flat(data):
                fallback = _centre_transform(moving, fixed, workdir / "centre.mat")
                attempt = _attempt(
                    fallback, "none", moving, fixed, criteria, ["image is empty or constant"]
                )
                header_error = None
            else:
                attempt, header_error = _register_moving(
                    moving, fixed, fixed_mask, criteria, workdir=workdir, resolution=resolution
                )
            out_transform.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(attempt.transform, out_transform)
        save_on_template(attempt.registered, fixed_nii.affine, out_image, dtype=np.float32)
        save_on_template(brain, fixed_nii.affine, out_mask, dtype=np.uint8)
        similarity = attempt.similarity
        metrics = {
            "reg_similarity": round(similarity, 4) if np.isfinite(similarity) else None,
            "reg_scale": round(attempt.scale, 4),
            "reg_mutual_information": round(attempt.information, 4),
        }
        if header_error is not None:
            findings.append("header_orientation")
            warnings.append(
                f"header_orientation: the anatomy is {header_error} from where the header "
                "places it (patient position entered wrong?); registered from the turned start"
            )
        if attempt.problems:
            findings.append("registration_failed")
            warnings.append("registration_failed: " + "; ".join(attempt.problems))
        for line in warnings:
            log.warning("%s", line)
        log.info("register: %s", metrics)
        return records.make_record(
            REGISTER_STAGE,
            findings=findings,
            metrics=metrics,
            warnings=warnings,
            registration_start=attempt.start,
            contrast=contrast,
        )

    return records.run_stage(
        REGISTER_STAGE,
        work,
        record_path=record_path,
        image_outputs=[out_image, out_mask, out_transform],
        upstream=upstream,
    )
