"""Demo cohort: realistic DICOM subjects made from the MNI152 template, with labels.

``python -m mriaudit.demo OUTDIR`` writes one folder per subject under OUTDIR
and a labels TSV (columns ``subject``, ``label``, ``kind``, ``description`` and
the lesion centre in MNI mm). Everything is deterministic for a seed.

Anatomy is nilearn's MNI152 2009a 1 mm T1, which is brain-extracted; a
synthetic skull and scalp shell is added around it so the images look like
heads. Per subject: a smooth random deformation, pose, scale and contrast; a
3D T1 acquisition grid (sagittal or axial, sometimes oblique) resampled in one
``map_coordinates`` pass; a bias field and Rician noise; vendor-like headers
(Siemens, GE, Philips; 1.5 T and 3 T). Most subjects also get a localizer and
a few a 2D axial T2 as distractor series.

A labelled minority is anomalous (label 1): lesions, motion ghosting, k-space
spikes, wrap-around, heavy noise, strong bias, missing slices, wrong contrast;
plus broken inputs: a truncated DICOM file, an empty folder, a subject with
only a localizer.

``plan_real_heads`` and ``write_cohort`` run the same machinery on real heads
(``mriaudit.heads``) instead of the template: the detection benchmark.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import BaseTag, Tag
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from scipy import ndimage

from mriaudit.cohort import bids_label
from mriaudit.template import load_brain_mask, load_template

logger = logging.getLogger(__name__)

ANOMALY_KINDS = (
    "lesion",
    "ghosting",
    "missing_slices",
    "wrong_contrast",
    "spike",
    "noise",
    "wraparound",
    "bias",
)
BROKEN_KINDS = ("truncated_file", "empty_folder", "localizer_only")
KINDS = ("normal", *ANOMALY_KINDS, *BROKEN_KINDS)
MIN_SUBJECTS = len(BROKEN_KINDS) + 2
FULL_MIX_SUBJECTS = 24
ANOMALY_FRACTION = 0.3
# Second instances get the other variant, so a 30-subject cohort has both lesion
# contrasts and both ways of losing slices.
VARIANTS = {"lesion": ("hyper", "hypo", "ring"), "missing_slices": ("zeroed", "removed")}
# Order in which anomalies are handed out: small cohorts get the first few kinds,
# FULL_MIX_SUBJECTS or more get all of them, larger cohorts cycle again.
_ANOMALY_SEQUENCE = (*ANOMALY_KINDS, "lesion", "missing_slices")
_STREAMS = (
    "anatomy",
    "acquisition",
    "anomaly",
    "noise",
    "scanner",
    "scaling",
    "study",
    "files",
    "extra",
    "contrast",
)
# Intensity of white matter on the working scale; noise and scaling refer to it.
_WM = 0.85
# Working-scale value that maps to 95 % of the stored range (headroom for bias and noise).
_FULL_SCALE = 1.6


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class SubjectPlan:
    """What one subject folder will hold; the random draws derive from ``seed`` and ``number``."""

    folder: str
    number: int
    kind: str
    variant: str = ""
    has_localizer: bool = True
    has_t2: bool = False
    seed: int = 0
    #: Whose head: ``""`` for the template head, else a person of ``mriaudit.heads``
    #: whose prepared head volume is ``head_path``.
    person: str = ""
    head_path: str = ""

    @property
    def label(self) -> int:
        """1 = anomalous or broken (should be excluded), 0 = normal."""
        return 0 if self.kind == "normal" else 1

    def rng(self, stream: str) -> np.random.Generator:
        """Independent generator per aspect, so an anomaly never changes the other draws."""
        sequence = np.random.SeedSequence(
            self.seed, spawn_key=(self.number, _STREAMS.index(stream))
        )
        return np.random.default_rng(sequence)


def _anomaly_count(n_subjects: int) -> int:
    if n_subjects >= FULL_MIX_SUBJECTS:
        return max(len(_ANOMALY_SEQUENCE), round(ANOMALY_FRACTION * n_subjects))
    wanted = max(1, round(ANOMALY_FRACTION * n_subjects))
    # Small cohorts keep at least two normals so a reference exists.
    return max(1, min(wanted, n_subjects - len(BROKEN_KINDS) - 2))


def _folder_names(n_subjects: int) -> list[str]:
    width = max(3, len(str(n_subjects)))
    names = [f"sub-{number:0{width}d}" for number in range(1, n_subjects + 1)]
    # One messy archive name (spaces, parentheses, non-ASCII); its BIDS label stays unique.
    messy = min(7, n_subjects)
    names[messy - 1] = f"Patient {messy} (ü)"
    return names


def plan_cohort(n_subjects: int, *, seed: int) -> list[SubjectPlan]:
    """One plan per subject, in folder order; kinds are shuffled over the folders."""
    if n_subjects < MIN_SUBJECTS:
        message = (
            f"the demo cohort needs at least {MIN_SUBJECTS} subjects "
            f"(3 broken inputs, one anomaly, one normal), got {n_subjects}"
        )
        raise ValueError(message)
    n_anomalies = _anomaly_count(n_subjects)
    n_normal = n_subjects - len(BROKEN_KINDS) - n_anomalies
    counts: dict[str, int] = {}
    kinds: list[tuple[str, str]] = []
    for index in range(n_anomalies):
        kind = _ANOMALY_SEQUENCE[index % len(_ANOMALY_SEQUENCE)]
        variants = VARIANTS.get(kind, ("",))
        kinds.append((kind, variants[counts.get(kind, 0) % len(variants)]))
        counts[kind] = counts.get(kind, 0) + 1
    kinds += [(kind, "") for kind in BROKEN_KINDS] + [("normal", "")] * n_normal
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    order = rng.permutation(n_subjects)
    has_localizer = rng.random(n_subjects) < 0.85
    has_t2 = rng.random(n_subjects) < 0.2
    plans = []
    for number, folder in enumerate(_folder_names(n_subjects), start=1):
        kind, variant = kinds[order[number - 1]]
        plans.append(
            SubjectPlan(
                folder=folder,
                number=number,
                kind=kind,
                variant=variant,
                has_localizer=bool(has_localizer[number - 1]) or kind == "localizer_only",
                has_t2=bool(has_t2[number - 1]) and kind != "localizer_only",
                seed=seed,
            )
        )
    labels = [bids_label(p.folder) for p in plans]
    if len(set(labels)) != len(labels):
        message = f"demo folder names collide on their BIDS labels: {labels}"
        raise RuntimeError(message)
    return plans


def plan_real_heads(
    heads: dict[str, str | Path], *, renditions: int, per_kind: int, seed: int
) -> list[SubjectPlan]:
    """A benchmark cohort on real heads (``mriaudit.heads``): no normal is the template.

    Every person of ``heads`` (``{person: prepared head path}``) is a normal
    ``renditions`` times, each with its own deformation, pose, grid, vendor and
    noise; every anomaly kind appears ``per_kind`` times on people taken in
    turn (lesion contrasts and ways of losing slices alternate). No broken
    inputs: the cohort measures detection. Folder order is shuffled.
    """
    if not heads or renditions < 1 or per_kind < 1:
        message = f"need people, renditions >= 1 and per_kind >= 1, got {len(heads)}, {renditions}, {per_kind}"
        raise ValueError(message)
    people = sorted(heads)
    entries: list[tuple[str, str, str]] = [
        ("normal", "", name) for name in people for _ in range(renditions)
    ]
    turn = 0
    for kind in ANOMALY_KINDS:
        variants = VARIANTS.get(kind, ("",))
        for index in range(per_kind):
            entries.append((kind, variants[index % len(variants)], people[turn % len(people)]))
            turn += 1
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    order = rng.permutation(len(entries))
    width = max(3, len(str(len(entries))))
    plans = []
    for number in range(1, len(entries) + 1):
        kind, variant, name = entries[order[number - 1]]
        plans.append(
            SubjectPlan(
                folder=f"sub-{number:0{width}d}",
                number=number,
                kind=kind,
                variant=variant,
                has_localizer=bool(rng.random() < 0.85),
                has_t2=bool(rng.random() < 0.2),
                seed=seed,
                person=name,
                head_path=str(heads[name]),
            )
        )
    return plans


# ---------------------------------------------------------------------- anatomy


@lru_cache(maxsize=1)
def _template() -> tuple[np.ndarray, np.ndarray]:
    """MNI152 1 mm T1 (float32, (197, 233, 189), [0, 1]) and its voxel-to-RAS affine (4, 4)."""
    img = load_template(resolution=1)
    return np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32), img.affine.copy()


# Skull and scalp as (distance outside the brain outline in mm, T1 intensity):
# CSF, inner table, diploe (marrow fat), outer table, muscle, fat, skin, air.
_SHELL_MM = np.array([0, 1.5, 2.2, 3.4, 4.2, 5.2, 5.9, 6.9, 7.6, 8.6, 9.4, 11.8, 12.6, 13.4, 14.2])
_SHELL_T1 = np.array(
    [0.15, 0.15, 0.04, 0.04, 0.5, 0.5, 0.04, 0.04, 0.4, 0.4, 0.9, 0.9, 0.45, 0.45, 0]
)


@lru_cache(maxsize=1)
def _head_volume() -> np.ndarray:
    """Template brain plus a synthetic skull and scalp; float32 (197, 233, 189), WM about 0.85.

    The shell follows a closed (smoothed) brain outline, computed on a 2 mm grid
    because distance transforms at 1 mm cost seconds.
    """
    brain, _ = _template()
    coarse = brain[::2, ::2, ::2] > 0.02
    outside = ndimage.distance_transform_edt(~coarse, sampling=2.0)
    dilated = outside <= 8.0
    closed = (ndimage.distance_transform_edt(dilated, sampling=2.0) > 8.0) | coarse
    distance = ndimage.distance_transform_edt(~closed, sampling=2.0).astype(np.float32)
    # Skull and scalp thickness vary smoothly around the head (fixed pattern).
    pattern = np.random.default_rng(20090).standard_normal(distance.shape).astype(np.float32)
    pattern = ndimage.gaussian_filter(pattern, 6.0)
    pattern /= np.abs(pattern).max()
    distance /= 1.0 + 0.25 * pattern
    zoom = np.array(brain.shape) / np.array(distance.shape)
    distance = ndimage.zoom(distance, zoom, order=1, grid_mode=True, mode="nearest")
    shell = np.interp(distance, _SHELL_MM, _SHELL_T1).astype(np.float32)
    head = np.where(brain > 0.02, brain, shell)
    return head.astype(np.float32)


@lru_cache(maxsize=1)
def _head_points() -> np.ndarray:
    """Template voxel indices (n, 3) sampling the head, used to fit fields of view."""
    head = _head_volume()
    return np.argwhere(head[::3, ::3, ::3] > 0.05).astype(np.float64) * 3.0


@lru_cache(maxsize=8)
def _real_head(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A prepared real head (``mriaudit.heads``) and its sample points, as the template's."""
    from mriaudit.heads import load_head

    head = load_head(path)
    return head, np.argwhere(head[::3, ::3, ::3] > 0.05).astype(np.float64) * 3.0


def _head(plan: SubjectPlan) -> tuple[np.ndarray, np.ndarray]:
    """The plan's head volume on the template 1 mm grid and its sample points (n, 3)."""
    if plan.head_path:
        return _real_head(plan.head_path)
    return _head_volume(), _head_points()


@dataclass(frozen=True)
class Anatomy:
    """A subject's head in the scanner: template deformed, scaled, rotated and shifted.

    Scanner coordinates are DICOM patient coordinates (LPS, mm). ``displacement``
    is (3, gx, gy, gz) in template voxels (mm) on a grid of ``grid_step`` voxels.
    """

    rotation: np.ndarray
    scale: np.ndarray
    centre_template_lps: np.ndarray
    centre_scanner: np.ndarray
    displacement: np.ndarray
    #: Template voxel indices (n, 3) sampling the head, used to fit fields of view.
    head_points: np.ndarray
    grid_step: float = 8.0

    def scanner_from_template_lps(self, points: np.ndarray) -> np.ndarray:
        """(n, 3) template points in LPS mm -> (n, 3) scanner LPS mm (deformation ignored)."""
        return (
            points - self.centre_template_lps
        ) * self.scale @ self.rotation.T + self.centre_scanner

    def scanner_from_mni(self, points_ras: np.ndarray) -> np.ndarray:
        """(n, 3) MNI mm (RAS) -> (n, 3) scanner LPS mm; off by the deformation, a few mm."""
        return self.scanner_from_template_lps(np.asarray(points_ras, dtype=float) * [-1, -1, 1])

    def template_index_affine(self) -> np.ndarray:
        """(4, 4) affine from scanner LPS mm to template voxel indices (before deformation)."""
        _, template_affine = _template()
        to_lps = np.eye(4)
        to_lps[:3, :3] = self.rotation.T / self.scale[:, None]
        to_lps[:3, 3] = self.centre_template_lps - to_lps[:3, :3] @ self.centre_scanner
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        return np.linalg.inv(template_affine) @ flip @ to_lps


def _rotation(angles_deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _draw_anatomy(rng: np.random.Generator, points: np.ndarray) -> Anatomy:
    template, template_affine = _template()
    lo, hi = points.min(axis=0), points.max(axis=0)
    centre_ras = template_affine[:3, :3] @ ((lo + hi) / 2) + template_affine[:3, 3]
    step = 8.0
    grid_shape = tuple(int(np.ceil(n / step)) + 1 for n in template.shape)
    noise = rng.standard_normal((3, *grid_shape))
    field_ = np.stack([ndimage.gaussian_filter(c, 1.5, mode="nearest") for c in noise])
    field_ *= rng.uniform(2.0, 4.0) / np.abs(field_).max()
    table = np.array([rng.uniform(-5, 5), rng.uniform(-25, 25), rng.uniform(-40, 40)])
    return Anatomy(
        rotation=_rotation(rng.uniform(-8.0, 8.0, size=3)),
        scale=rng.uniform(0.95, 1.05) * rng.uniform(0.98, 1.02, size=3),
        centre_template_lps=centre_ras * [-1, -1, 1],
        centre_scanner=table + rng.uniform(-8.0, 8.0, size=3),
        displacement=field_.astype(np.float32),
        head_points=points,
        grid_step=step,
    )


@dataclass(frozen=True)
class Lesion:
    """One lesion: centre in MNI mm (RAS), radius in mm, contrast hypo/hyper/ring."""

    centre_mni_mm: tuple[float, float, float]
    radius_mm: float
    contrast: str


def _lesion_radius(plan: SubjectPlan, rng: np.random.Generator) -> float:
    # Cycle through sizes so a cohort holds small and large lesions.
    sizes = (14.0, 7.0, 18.0, 10.0, 5.0)
    return float(np.clip(sizes[plan.number % len(sizes)] + rng.uniform(-1.5, 1.5), 5.0, 20.0))


def _lesion_centre(radius: float, rng: np.random.Generator) -> np.ndarray:
    """Template voxel index (3,) of a centre whose ball (radius + 2 mm) lies inside the brain mask."""
    mask = np.asarray(load_brain_mask(resolution=1).dataobj) > 0
    candidates = np.argwhere(mask[::2, ::2, ::2]) * 2
    reach = int(np.ceil(radius + 2))
    offsets = np.mgrid[-reach : reach + 1, -reach : reach + 1, -reach : reach + 1]
    ball = (offsets**2).sum(axis=0) <= (radius + 2) ** 2
    for _ in range(2000):
        centre = candidates[rng.integers(len(candidates))]
        lo, hi = centre - reach, centre + reach + 1
        if (lo < 0).any() or (hi > mask.shape).any():
            continue
        box = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        if box[ball].mean() >= 0.995:
            return centre.astype(float)
    message = f"no place inside the brain mask for a lesion of radius {radius:.1f} mm"
    raise RuntimeError(message)


def _smooth_noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise with unit standard deviation, float32."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (noise / (noise.std() + 1e-12)).astype(np.float32)


def _add_lesion(head: np.ndarray, plan: SubjectPlan) -> tuple[np.ndarray, Lesion]:
    """Copy of ``head`` with one lesion.

    Lobulated outline (0.6-1.35 x the radius), 1.5 mm edge, heterogeneous inside;
    hyperintense and ring lesions sit in a few mm of mildly hypointense oedema.
    """
    rng = plan.rng("anomaly")
    radius = _lesion_radius(plan, rng)
    centre = _lesion_centre(radius, rng)
    reach = int(np.ceil(radius * 1.35 + 8))
    lo = np.maximum(centre.astype(int) - reach, 0)
    hi = np.minimum(centre.astype(int) + reach + 1, head.shape)
    grid = np.mgrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float32)
    offset = grid - centre[:, None, None, None].astype(np.float32)
    distance = np.sqrt((offset**2).sum(axis=0)) + 1e-6
    unit = offset / distance
    # Outline: radius modulated by low-order functions of the direction plus smooth lumps.
    shape_terms = np.stack([unit[0], unit[1], unit[2], unit[0] * unit[1], unit[1] * unit[2]])
    angular = np.tensordot(rng.normal(0, 0.12, 5), shape_terms, axes=1)
    lumps = _smooth_noise(distance.shape, max(2.0, radius / 4), rng)
    local_radius = radius * np.clip(1.0 + angular + 0.12 * lumps, 0.6, 1.35)
    weight = np.clip((local_radius - distance) / 1.5 + 0.5, 0.0, 1.0)
    texture = 1.0 + 0.1 * _smooth_noise(distance.shape, 1.5, rng)
    oedema = np.zeros_like(weight)
    if plan.variant == "hypo":
        value = rng.uniform(0.2, 0.3) * texture
    elif plan.variant == "ring":
        rim = np.clip((distance - (local_radius - 3.0)) / 1.0, 0.0, 1.0)
        value = (rng.uniform(0.2, 0.3) * (1 - rim) + rng.uniform(1.0, 1.1) * rim) * texture
    else:
        value = rng.uniform(1.05, 1.15) * texture
    if plan.variant in ("hyper", "ring"):
        width = rng.uniform(3.0, 6.0)
        oedema = np.clip((local_radius + width - distance) / 2.0, 0.0, 1.0) * (1 - weight)
    out = head.copy()
    box = out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    box[...] = box * (1 - weight) * (1 - 0.2 * oedema) + weight * value
    _, template_affine = _template()
    centre_mni = template_affine[:3, :3] @ centre + template_affine[:3, 3]
    lesion = Lesion(
        centre_mni_mm=tuple(round(float(v), 1) for v in centre_mni),
        radius_mm=round(radius, 1),
        contrast={"hypo": "hypointense", "ring": "ring"}.get(plan.variant, "hyperintense"),
    )
    return out, lesion


# -------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Grid:
    """A slice stack in scanner LPS mm; voxel (k, r, c) = slice, row, column.

    ``row_dir`` is the first ImageOrientationPatient triplet (direction of
    increasing column index), ``col_dir`` the second (increasing row index),
    slices advance along their cross product.
    """

    origin: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    pixel_mm: float
    slice_mm: float
    shape: tuple[int, int, int]

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    def affine(self) -> np.ndarray:
        """(4, 4) from (k, r, c, 1) to LPS mm."""
        out = np.eye(4)
        out[:3, 0] = self.normal * self.slice_mm
        out[:3, 1] = self.col_dir * self.pixel_mm
        out[:3, 2] = self.row_dir * self.pixel_mm
        out[:3, 3] = self.origin
        return out

    def positions(self) -> np.ndarray:
        """ImagePositionPatient of every slice, (n_slices, 3) mm."""
        return self.origin + np.arange(self.shape[0])[:, None] * self.slice_mm * self.normal

    def orientation(self) -> np.ndarray:
        return np.concatenate([self.row_dir, self.col_dir])

    def cropped(self, axis: int, start: int, length: int) -> Grid:
        """The same grid restricted to ``length`` voxels from ``start`` along axis 1 (rows) or 2."""
        step = self.col_dir if axis == 1 else self.row_dir
        shape = list(self.shape)
        shape[axis] = length
        return replace(self, origin=self.origin + start * self.pixel_mm * step, shape=tuple(shape))


_BASE_AXES = {
    # Sagittal: columns run anterior->posterior, rows superior->inferior.
    "sagittal": (np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])),
    "coronal": (np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0])),
    # Axial: columns run right->left, rows anterior->posterior.
    "axial": (np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])),
}


def _axes(orientation: str, tilt_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Orientation triplets, tilted about the left-right axis (an oblique plan); rounded for DS."""
    tilt = _rotation(np.array([tilt_deg, 0.0, 0.0]))
    row, col = (tilt @ v for v in _BASE_AXES[orientation])
    row = np.round(row, 6)
    col = col - (col @ row) / (row @ row) * row
    return row / np.linalg.norm(row), np.round(col / np.linalg.norm(col), 6)


def _fit_grid(
    anatomy: Anatomy,
    *,
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    pixel_mm: float,
    slice_mm: float,
    margins_mm: np.ndarray,
) -> Grid:
    """Grid covering the posed head plus ``margins_mm`` (slice, row, column axes) on each side."""
    _, template_affine = _template()
    points = anatomy.head_points @ template_affine[:3, :3].T + template_affine[:3, 3]
    scanner = anatomy.scanner_from_template_lps(points * [-1, -1, 1])
    normal = np.cross(row_dir, col_dir)
    axes = (normal, col_dir, row_dir)
    spacing = (slice_mm, pixel_mm, pixel_mm)
    start = np.zeros(3)
    shape = []
    for i, (axis, step) in enumerate(zip(axes, spacing, strict=True)):
        proj = scanner @ axis
        extent = proj.max() - proj.min() + 2 * margins_mm[i]
        n = int(np.ceil(extent / step / 2) * 2)
        start[i] = (proj.max() + proj.min()) / 2 - (n - 1) * step / 2
        shape.append(n)
    origin = np.round(start[0] * normal + start[1] * col_dir + start[2] * row_dir, 4)
    return Grid(origin, row_dir, col_dir, pixel_mm, slice_mm, (shape[0], shape[1], shape[2]))


def _interp_matrix(n: int, knots: np.ndarray) -> np.ndarray:
    """(n, len(knots)) linear interpolation weights from knot positions to 0..n-1."""
    eye = np.eye(len(knots))
    return np.stack([np.interp(np.arange(n), knots, eye[j]) for j in range(len(knots))], axis=1)


def _sample(volume: np.ndarray, anatomy: Anatomy, grid: Grid, *, step: int = 4) -> np.ndarray:
    """Resample ``volume`` (template grid) onto ``grid``: float32 (slices, rows, columns).

    Pose, scale, deformation and acquisition grid are composed into one set of
    template coordinates. The deformation is evaluated on every ``step``-th voxel
    and the coordinates are interpolated linearly in between, which is exact for
    the affine part and costs three small matrix products instead of three
    full-size interpolations.
    """
    knots = [np.unique(np.r_[np.arange(0, n, step), n - 1]).astype(float) for n in grid.shape]
    kk, rr, cc = np.meshgrid(*knots, indexing="ij")
    voxels = np.stack([kk, rr, cc, np.ones_like(kk)]).reshape(4, -1)
    to_template = anatomy.template_index_affine() @ grid.affine()
    coarse = (to_template @ voxels)[:3]
    for i in range(3):
        coarse[i] += ndimage.map_coordinates(
            anatomy.displacement[i], coarse / anatomy.grid_step, order=1, mode="nearest"
        )
    coarse = coarse.reshape(3, *kk.shape).astype(np.float32)
    wk, wr, wc = (
        _interp_matrix(n, k).astype(np.float32) for n, k in zip(grid.shape, knots, strict=True)
    )
    (na, nb, nc), (nk, nr, ncol) = coarse.shape[1:], grid.shape
    coords = np.empty((3, *grid.shape), dtype=np.float32)
    for i in range(3):
        # One 2D matrix product per axis (batched matmul is far slower).
        cols = (coarse[i].reshape(na * nb, nc) @ wc.T).reshape(na, nb, ncol)
        rows = (wr @ cols.transpose(1, 0, 2).reshape(nb, na * ncol)).reshape(nr, na, ncol)
        coords[i] = (wk @ rows.transpose(1, 0, 2).reshape(na, nr * ncol)).reshape(nk, nr, ncol)
    return ndimage.map_coordinates(volume, coords, order=1, cval=0.0, output=np.float32)


# -------------------------------------------------------------------- physics


def _contrast_lut(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Monotone intensity map (x, y) on the working scale: gamma plus tissue-level jitter."""
    x = np.array([0.0, 0.1, 0.2, 0.45, 0.65, 0.87, 1.0, 2.0])
    y = x ** rng.uniform(0.85, 1.2)
    y[2:6] += rng.uniform(-0.03, 0.03, size=4)
    y[-1] = y[-2] + (x[-1] - x[-2])
    return x, np.maximum.accumulate(y)


# T1 working scale -> T2-like: CSF bright, grey above white matter, fat and bone moderate.
_T2_LUT = (
    np.array([0.0, 0.05, 0.1, 0.2, 0.35, 0.6, 0.8, 0.95, 2.0]),
    np.array([0.0, 0.05, 0.5, 0.95, 0.8, 0.62, 0.42, 0.45, 0.45]),
)


def _t2_lut(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``_T2_LUT`` with per-subject tissue-level jitter: the 3D T2 of a T2w cohort."""
    x, y = _T2_LUT
    return x, y * np.r_[1.0, 1.0, rng.uniform(0.95, 1.05, size=y.size - 2)]


def _legendre(n: int) -> np.ndarray:
    """(3, n) Legendre polynomials of degree 0..2 on [-1, 1]."""
    x = np.linspace(-1.0, 1.0, n)
    return np.stack([np.ones(n), x, 1.5 * x**2 - 0.5])


def _bias_field(amplitude: float, coef: np.ndarray, *, head: np.ndarray) -> np.ndarray:
    """Smooth multiplicative field on the grid of ``head`` (bool, slices x rows x columns).

    ``coef`` (3, 3, 3) weighs products of Legendre polynomials of degree 0..2 per
    axis. The field spans [1 - amplitude, 1 + amplitude] inside the head (float32);
    outside it may reach further, floored at 0.2.
    """
    coef = coef.copy()
    coef[0, 0, 0] = 0.0
    pk, pr, pc = (_legendre(n) for n in head.shape)
    field_ = np.einsum("abc,ak,br,cs->krs", coef, pk, pr, pc, optimize=True).astype(np.float32)
    field_ -= np.median(field_[head])
    field_ *= amplitude / np.abs(field_[head]).max()
    return np.maximum(1.0 + field_, 0.2)


def _ghosting(signal: np.ndarray, axis: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Periodic phase errors on phase-encode lines: shifted replicas along ``axis``."""
    period = int(rng.integers(3, 6))
    phase = rng.uniform(0.6, 1.0)
    kspace = np.fft.fft(signal, axis=axis)
    lines = np.arange(signal.shape[axis]) % period == rng.integers(period)
    modulation = np.where(lines, np.exp(1j * phase), 1.0)
    shape = [1, 1, 1]
    shape[axis] = -1
    out = np.fft.ifft(kspace * modulation.reshape(shape), axis=axis).astype(np.complex64)
    return (
        out,
        f"motion ghosting: phase errors on every {period}th phase-encode line ({phase:.1f} rad)",
    )


def _spike(signal: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A k-space spike pair: herringbone stripes over the whole volume."""
    freqs = rng.uniform(0.12, 0.3, size=2) * rng.choice([-1, 1], size=2)
    freq_k = rng.uniform(-0.05, 0.05)
    amplitude = rng.uniform(0.12, 0.2) * _WM
    waves = [
        np.exp(2j * np.pi * f * np.arange(n))
        for f, n in zip((freq_k, *freqs), signal.shape, strict=True)
    ]
    plane = waves[0][:, None, None] * waves[1][None, :, None] * waves[2][None, None, :]
    stripes = amplitude * np.real(plane * np.exp(1j * rng.uniform(0, 2 * np.pi)))
    note = f"k-space spike: stripes of amplitude {amplitude / _WM:.0%} of white matter"
    return (signal + stripes.astype(np.float32)), note


def _fold(signal: np.ndarray, axis: int, keep: float) -> tuple[np.ndarray, int]:
    """Wrap-around: shrink the field of view along ``axis`` to ``keep`` and alias the rest in."""
    n = signal.shape[axis]
    length = int(round(n * keep / 2) * 2)
    start = (n - length) // 2
    out_shape = list(signal.shape)
    out_shape[axis] = length
    out = np.zeros(out_shape, dtype=signal.dtype)
    for i in range(n):
        target = [slice(None)] * 3
        target[axis] = (i - start) % length
        source = [slice(None)] * 3
        source[axis] = i
        out[tuple(target)] += signal[tuple(source)]
    return out, start


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of ``signal`` plus complex Gaussian noise of ``sigma`` per channel."""
    real = np.real(signal).astype(np.float32) + sigma * rng.standard_normal(
        signal.shape, dtype=np.float32
    )
    imag = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    if np.iscomplexobj(signal):
        imag += np.imag(signal).astype(np.float32)
    return np.sqrt(real**2 + imag**2)


@dataclass(frozen=True)
class Scaling:
    """Stored = (value - intercept) / slope in uint16 with ``bits_stored`` bits."""

    slope: float
    intercept: float
    gain: float
    bits_stored: int

    def store(self, image: np.ndarray) -> np.ndarray:
        top = 2**self.bits_stored - 1
        stored = np.rint((image * self.gain - self.intercept) / self.slope)
        return np.clip(stored, 0, top).astype(np.uint16)


def _draw_scaling(rng: np.random.Generator, bits_stored: int) -> Scaling:
    slope = 1.0 if rng.random() < 0.5 else float(f"{rng.uniform(0.25, 4.0):.5g}")
    intercept = 0.0 if rng.random() < 0.8 else round(float(rng.uniform(-10.0, 10.0)), 2)
    gain = 0.95 * (2**bits_stored - 1) * slope / _FULL_SCALE
    return Scaling(slope=slope, intercept=intercept, gain=gain, bits_stored=bits_stored)


# --------------------------------------------------------------------- vendors


@dataclass(frozen=True)
class Vendor:
    """Vendor-like protocol names and sequence parameters (TR, TE, TI in ms, flip in degrees)."""

    name: str
    manufacturer: str
    models: dict[float, tuple[str, ...]]
    t1_description: dict[str, str]
    t1_tags: dict[str, object]
    t1_timing: dict[float, tuple[float, float, float, float]]
    t2_description: str
    t2_tags: dict[str, object]
    t2_3d_description: dict[str, str]
    t2_3d_sequence: str
    localizer_description: str
    bits_stored: int
    series_step: int


VENDORS = (
    Vendor(
        name="Siemens",
        manufacturer="SIEMENS",
        models={3.0: ("Prisma_fit", "Skyra"), 1.5: ("Avanto_fit", "Aera")},
        t1_description={"sagittal": "t1_mprage_sag_p2_iso", "axial": "t1_mprage_tra_p2_iso"},
        t1_tags={
            "SequenceName": "*tfl3d1_16ns",
            "ScanningSequence": ["GR", "IR"],
            "SequenceVariant": ["SK", "SP", "MP"],
            "ScanOptions": "IR",
        },
        t1_timing={3.0: (2300.0, 2.98, 900.0, 9.0), 1.5: (2400.0, 3.61, 1000.0, 8.0)},
        t2_description="t2_tse_tra",
        t2_tags={
            "SequenceName": "*tse2d1_15",
            "ScanningSequence": "SE",
            "SequenceVariant": ["SK", "SP", "OSP"],
        },
        t2_3d_description={"sagittal": "t2_spc_sag_p2_iso", "axial": "t2_spc_tra_p2_iso"},
        t2_3d_sequence="*spc_282ns",
        localizer_description="localizer",
        bits_stored=12,
        series_step=1,
    ),
    Vendor(
        name="GE",
        manufacturer="GE MEDICAL SYSTEMS",
        models={3.0: ("DISCOVERY MR750", "SIGNA Premier"), 1.5: ("Optima MR450w", "SIGNA Artist")},
        t1_description={"sagittal": "Sag T1 BRAVO", "axial": "Ax T1 BRAVO"},
        t1_tags={
            "SequenceName": "efgre3d",
            "ScanningSequence": ["GR", "IR"],
            "SequenceVariant": ["SS", "SK", "MP"],
            "ScanOptions": ["FAST_GEMS", "EDR_GEMS", "ACC_GEMS"],
        },
        t1_timing={3.0: (8.2, 3.2, 450.0, 12.0), 1.5: (10.4, 4.2, 600.0, 10.0)},
        t2_description="Ax T2 FSE",
        t2_tags={
            "SequenceName": "fse-xl",
            "ScanningSequence": "SE",
            "SequenceVariant": ["SK", "OSP"],
        },
        t2_3d_description={"sagittal": "Sag CUBE T2", "axial": "Ax CUBE T2"},
        t2_3d_sequence="cube",
        localizer_description="3Plane Localizer",
        bits_stored=16,
        series_step=1,
    ),
    Vendor(
        name="Philips",
        manufacturer="Philips Medical Systems",
        models={3.0: ("Ingenia", "Achieva dStream"), 1.5: ("Ingenia", "Achieva")},
        t1_description={"sagittal": "sT1W_3D_TFE", "axial": "T1W_3D_TFE"},
        t1_tags={
            "SequenceName": "T1TFE",
            "ScanningSequence": "GR",
            "SequenceVariant": ["SP", "MP"],
            "ScanOptions": "OTHER",
        },
        t1_timing={3.0: (8.1, 3.7, 950.0, 8.0), 1.5: (7.5, 3.5, 900.0, 8.0)},
        t2_description="T2W_TSE",
        t2_tags={"SequenceName": "TSE", "ScanningSequence": "SE", "SequenceVariant": "SK"},
        t2_3d_description={"sagittal": "sT2W_3D_TSE", "axial": "T2W_3D_TSE"},
        t2_3d_sequence="TSE3D",
        localizer_description="Survey localizer",
        bits_stored=12,
        series_step=100,
    ),
)


@dataclass(frozen=True)
class Scanner:
    vendor: Vendor
    field_t: float
    model: str


def _draw_scanner(rng: np.random.Generator) -> Scanner:
    vendor = VENDORS[int(rng.integers(len(VENDORS)))]
    field_t = 3.0 if rng.random() < 0.6 else 1.5
    models = vendor.models[field_t]
    return Scanner(vendor, field_t, models[int(rng.integers(len(models)))])


# --------------------------------------------------------------------- series


@dataclass
class Series:
    """One DICOM series: frames (n, rows, columns) uint16 with per-frame geometry.

    ``positions`` (n, 3) and ``orientations`` (n, 6) are ImagePositionPatient
    and ImageOrientationPatient; ``dropped`` frames are not written (files removed).
    """

    role: str
    number: int
    description: str
    frames: np.ndarray
    positions: np.ndarray
    orientations: np.ndarray
    pixel_mm: float
    thickness_mm: float
    spacing_mm: float
    scaling: Scaling
    tags: dict[str, object]
    dropped: frozenset[int] = frozenset()


@dataclass
class SubjectScan:
    """Everything rendered for one subject; ``notes`` feed the labels' description."""

    plan: SubjectPlan
    scanner: Scanner
    anatomy: Anatomy
    series: list[Series] = field(default_factory=list)
    lesion: Lesion | None = None
    notes: list[str] = field(default_factory=list)

    def t1(self) -> Series | None:
        return next((s for s in self.series if s.role == "t1"), None)


@dataclass(frozen=True)
class Acquisition:
    """The T1 protocol of a subject: plane, tilt (degrees), voxel (mm), SNR, bias, contrast."""

    orientation: str
    tilt_deg: float
    pixel_mm: float
    slice_mm: float
    margins_mm: np.ndarray
    snr: float
    bias: float
    bias_coef: np.ndarray
    lut: tuple[np.ndarray, np.ndarray]


def _draw_acquisition(rng: np.random.Generator, voxel_size_mm: float) -> Acquisition:
    orientation = "sagittal" if rng.random() < 0.6 else "axial"
    tilt = 0.0 if rng.random() < 0.5 else float(rng.uniform(-8.0, 8.0))
    return Acquisition(
        orientation=orientation,
        tilt_deg=tilt,
        pixel_mm=round(voxel_size_mm * rng.uniform(0.9, 1.1), 4),
        slice_mm=round(voxel_size_mm * rng.uniform(0.9, 1.1), 4),
        margins_mm=rng.uniform(8.0, 18.0, size=3),
        snr=float(rng.uniform(15.0, 40.0)),
        bias=float(rng.uniform(0.03, 0.1)),
        bias_coef=rng.standard_normal((3, 3, 3)),
        lut=_contrast_lut(rng),
    )


def _phase_axis(orientation: str) -> int:
    """Array axis of the in-plane phase encoding (anterior-posterior): 2 = columns, 1 = rows."""
    return 2 if orientation == "sagittal" else 1


def _t1_artefacts(
    signal: np.ndarray, grid: Grid, plan: SubjectPlan, acq: Acquisition, rng: np.random.Generator
) -> tuple[np.ndarray, Grid, list[str]]:
    """Acquisition artefacts of the anomaly kinds that act on the complex signal."""
    notes: list[str] = []
    if plan.kind == "ghosting":
        signal, note = _ghosting(signal, _phase_axis(acq.orientation), rng)
        notes.append(note)
    elif plan.kind == "spike":
        signal, note = _spike(signal, rng)
        notes.append(note)
    elif plan.kind == "wraparound":
        keep = float(rng.uniform(0.68, 0.76))
        axis = _phase_axis(acq.orientation)
        signal, start = _fold(signal, axis, keep)
        grid = grid.cropped(axis, start, signal.shape[axis])
        notes.append(f"wrap-around: phase field of view cut to {keep:.0%}, the head folds over")
    return signal, grid, notes


def _render_t1(
    plan: SubjectPlan,
    head: np.ndarray,
    anatomy: Anatomy,
    scanner: Scanner,
    voxel_size_mm: float,
    contrast: str = "T1w",
) -> tuple[Series, list[str]]:
    """The audited 3D series (T1, or T2 for ``contrast="T2w"``) with the plan's anomaly,
    and notes describing it and the protocol."""
    acq = _draw_acquisition(plan.rng("acquisition"), voxel_size_mm)
    anomaly = plan.rng("anomaly")
    row_dir, col_dir = _axes(acq.orientation, acq.tilt_deg)
    grid = _fit_grid(
        anatomy,
        row_dir=row_dir,
        col_dir=col_dir,
        pixel_mm=acq.pixel_mm,
        slice_mm=acq.slice_mm,
        margins_mm=acq.margins_mm,
    )
    notes: list[str] = []
    if contrast == "T2w":
        lut = acq.lut if plan.kind == "wrong_contrast" else _t2_lut(plan.rng("contrast"))
        wrong = "T1-like (CSF dark, white matter bright) labelled as T2"
    else:
        lut = _T2_LUT if plan.kind == "wrong_contrast" else acq.lut
        wrong = "T2-like (CSF bright, white matter dark) labelled as T1"
    if plan.kind == "wrong_contrast":
        notes.append(f"wrong contrast: {wrong}")
    image = np.interp(_sample(head, anatomy, grid), *lut).astype(np.float32)
    bias = float(anomaly.uniform(0.35, 0.45)) if plan.kind == "bias" else acq.bias
    if plan.kind == "bias":
        notes.append(f"strong bias field: +-{bias:.0%}")
    image *= _bias_field(bias, acq.bias_coef, head=image > 0.1)
    signal, grid, artefact_notes = _t1_artefacts(image, grid, plan, acq, anomaly)
    notes += artefact_notes
    snr = float(anomaly.uniform(3.0, 5.0)) if plan.kind == "noise" else acq.snr
    if plan.kind == "noise":
        notes.append(f"heavy noise: SNR {snr:.1f} (white matter / noise sigma)")
    magnitude = _rician(signal, _WM / snr, plan.rng("noise"))
    scaling = _draw_scaling(plan.rng("scaling"), scanner.vendor.bits_stored)
    frames = scaling.store(magnitude)
    dropped: frozenset[int] = frozenset()
    if plan.kind == "missing_slices":
        n = grid.shape[0]
        count = int(anomaly.integers(4, 9) if plan.variant == "zeroed" else anomaly.integers(3, 7))
        count = min(count, max(2, n // 6))
        # A block in the middle third, so a central slice of the other planes crosses it.
        first = int(anomaly.integers(n // 3, max(n // 3 + 1, 2 * n // 3 - count + 1)))
        block = range(first, first + count)
        if plan.variant == "removed":
            dropped = frozenset(block)
            notes.append(f"missing slices: files of slices {first + 1}-{first + count} removed")
        else:
            frames[first : first + count] = 0
            notes.append(f"missing slices: slices {first + 1}-{first + count} all zero")
    vendor = scanner.vendor
    if contrast == "T2w":
        # Variable-flip-angle turbo spin echo (SPACE, CUBE, VISTA): long TR and TE.
        tags = {**vendor.t2_tags, "SequenceName": vendor.t2_3d_sequence}
        timing = {"RepetitionTime": 3200.0, "EchoTime": 408.0, "FlipAngle": 120.0}
        description = vendor.t2_3d_description[acq.orientation]
        train = 282
    else:
        tags = dict(vendor.t1_tags)
        tr, te, ti, flip = vendor.t1_timing[scanner.field_t]
        timing = {"RepetitionTime": tr, "EchoTime": te, "InversionTime": ti, "FlipAngle": flip}
        description = vendor.t1_description[acq.orientation]
        train = 1 if vendor.name == "Siemens" else 150
    tags.update(
        MRAcquisitionType="3D",
        **timing,
        ImageType=["ORIGINAL", "PRIMARY", "M", "ND"],
        InPlanePhaseEncodingDirection="ROW" if _phase_axis(acq.orientation) == 2 else "COL",
        EchoTrainLength=train,
    )
    summary = (
        f"{vendor.name} {scanner.model} {scanner.field_t:g}T, {acq.orientation} 3D "
        f"{contrast.removesuffix('w')} "
        f"{acq.pixel_mm:.2f}x{acq.pixel_mm:.2f}x{acq.slice_mm:.2f} mm"
        + (f" tilted {acq.tilt_deg:.1f} deg" if acq.tilt_deg else "")
        + f", SNR {snr:.0f}"
    )
    series = Series(
        role="t1",
        number=0,
        description=description,
        frames=frames,
        positions=grid.positions(),
        orientations=np.tile(grid.orientation(), (grid.shape[0], 1)),
        pixel_mm=acq.pixel_mm,
        thickness_mm=acq.slice_mm,
        spacing_mm=acq.slice_mm,
        scaling=scaling,
        tags=tags,
        dropped=dropped,
    )
    return series, [*notes, summary]


def _render_localizer(
    head: np.ndarray,
    anatomy: Anatomy,
    scanner: Scanner,
    voxel_size_mm: float,
    rng: np.random.Generator,
) -> Series:
    """Three orthogonal low-resolution slices through the head centre, one series."""
    pixel = round(2.0 * voxel_size_mm, 4)
    n = int(np.ceil(280.0 / pixel / 2) * 2)
    frames, positions, orientations = [], [], []
    centre = anatomy.centre_scanner
    for plane in ("sagittal", "coronal", "axial"):
        row_dir, col_dir = _axes(plane, 0.0)
        origin = centre - (n - 1) * pixel / 2 * (row_dir + col_dir)
        grid = Grid(np.round(origin, 4), row_dir, col_dir, pixel, 7.0, (1, n, n))
        image = _sample(head, anatomy, grid) ** 0.7
        frames.append(_rician(image, 0.07, rng)[0])
        positions.append(grid.origin)
        orientations.append(grid.orientation())
    scaling = _draw_scaling(rng, scanner.vendor.bits_stored)
    tags = {
        "MRAcquisitionType": "2D",
        "SequenceName": "*fl2d1" if scanner.vendor.name == "Siemens" else "fgre",
        "ScanningSequence": "GR",
        "SequenceVariant": ["SP", "OSP"],
        "RepetitionTime": 8.6,
        "EchoTime": 4.0,
        "FlipAngle": 20.0,
        "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"],
        "InPlanePhaseEncodingDirection": "ROW",
    }
    return Series(
        role="localizer",
        number=0,
        description=scanner.vendor.localizer_description,
        frames=scaling.store(np.stack(frames)),
        positions=np.stack(positions),
        orientations=np.stack(orientations),
        pixel_mm=pixel,
        thickness_mm=7.0,
        spacing_mm=7.0,
        scaling=scaling,
        tags=tags,
    )


def _render_t2(
    head: np.ndarray,
    anatomy: Anatomy,
    scanner: Scanner,
    voxel_size_mm: float,
    rng: np.random.Generator,
) -> Series:
    """A small 2D axial T2 (thick slices with a 20 % gap): a distractor series."""
    pixel = round(2.0 * voxel_size_mm, 4)
    thickness = round(4.0 * voxel_size_mm, 4)
    row_dir, col_dir = _axes("axial", 0.0)
    grid = _fit_grid(
        anatomy,
        row_dir=row_dir,
        col_dir=col_dir,
        pixel_mm=pixel,
        slice_mm=round(thickness * 1.2, 4),
        margins_mm=np.array([-20.0, 10.0, 10.0]),
    )
    image = np.interp(_sample(head, anatomy, grid), *_T2_LUT).astype(np.float32)
    scaling = _draw_scaling(rng, scanner.vendor.bits_stored)
    tags = dict(scanner.vendor.t2_tags)
    tags.update(
        MRAcquisitionType="2D",
        RepetitionTime=float(rng.choice([4000.0, 4500.0, 5000.0])),
        EchoTime=float(rng.choice([85.0, 98.0, 102.0])),
        FlipAngle=150.0 if scanner.vendor.name == "Siemens" else 90.0,
        ImageType=["ORIGINAL", "PRIMARY", "M", "ND"],
        InPlanePhaseEncodingDirection="COL",
        EchoTrainLength=16,
    )
    return Series(
        role="t2",
        number=0,
        description=scanner.vendor.t2_description,
        frames=scaling.store(_rician(image, _WM / 20.0, rng)),
        positions=grid.positions(),
        orientations=np.tile(grid.orientation(), (grid.shape[0], 1)),
        pixel_mm=pixel,
        thickness_mm=thickness,
        spacing_mm=grid.slice_mm,
        scaling=scaling,
        tags=tags,
    )


def render_subject(
    plan: SubjectPlan, *, voxel_size_mm: float, contrast: str = "T1w"
) -> SubjectScan:
    """Render every series of one subject in memory (nothing written).

    The audited 3D series, T1 (``contrast="T1w"``) or T2 (``"T2w"``, protocol
    names of SPACE, CUBE and 3D TSE), has (slices, rows, columns) about head
    size / ``voxel_size_mm`` voxels; localizer and the 2D T2 are coarser (2x
    pixel size).
    """
    if contrast not in ("T1w", "T2w"):
        message = f"unknown contrast {contrast!r}; expected 'T1w' or 'T2w'"
        raise ValueError(message)
    scanner = _draw_scanner(plan.rng("scanner"))
    head, points = _head(plan)
    anatomy = _draw_anatomy(plan.rng("anatomy"), points)
    scan = SubjectScan(plan=plan, scanner=scanner, anatomy=anatomy)
    if plan.kind == "empty_folder":
        scan.notes.append("empty folder: no files at all")
        return scan
    if plan.kind == "lesion":
        head, scan.lesion = _add_lesion(head, plan)
        centre = ", ".join(f"{v:g}" for v in scan.lesion.centre_mni_mm)
        scan.notes.append(
            f"{scan.lesion.contrast} lesion, radius {scan.lesion.radius_mm:g} mm at MNI ({centre})"
        )
    extra = plan.rng("extra")
    if plan.has_localizer:
        scan.series.append(_render_localizer(head, anatomy, scanner, voxel_size_mm, extra))
    if plan.kind == "localizer_only":
        scan.notes.append("localizer only: no T1 (or any other image) series")
    else:
        if plan.has_t2:
            scan.series.append(_render_t2(head, anatomy, scanner, voxel_size_mm, extra))
        t1, notes = _render_t1(plan, head, anatomy, scanner, voxel_size_mm, contrast)
        scan.series.append(t1)
        scan.notes += notes
    if plan.kind == "truncated_file":
        scan.notes.insert(0, "truncated file: one T1 DICOM file cut inside its pixel data")
    step = scanner.vendor.series_step
    for position, series in enumerate(scan.series, start=1):
        series.number = position * step + (1 if step > 1 else 0)
    return scan


# ---------------------------------------------------------------------- DICOM


def _ds(value: float, decimals: int = 5) -> float:
    """A float that formats within the 16 characters of a DICOM DS (and never as -0)."""
    return float(round(float(value), decimals)) + 0.0


def _uid(plan: SubjectPlan, *parts: object) -> str:
    # generate_uid concatenates its sources without a separator, so join them here.
    key = "/".join(["mriaudit-demo", str(plan.seed), str(plan.number), *map(str, parts)])
    return str(generate_uid(entropy_srcs=[key]))


def _study_tags(scan: SubjectScan) -> tuple[dict[str, object], datetime]:
    """Patient, study and equipment tags shared by every series (fake PHI included), and the
    session start time."""
    plan, scanner = scan.plan, scan.scanner
    rng = plan.rng("study")
    study_day = date(2015, 1, 1) + timedelta(days=int(rng.integers(0, 3650)))
    age = int(rng.integers(20, 86))
    birth = study_day - timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
    start = datetime.combine(study_day, datetime.min.time()) + timedelta(
        minutes=int(rng.integers(7 * 60, 19 * 60))
    )
    software = {"Siemens": "syngo MR E11", "GE": ["28", "LX", "MR"], "Philips": "5.7.1"}
    tags: dict[str, object] = {
        "SpecificCharacterSet": "ISO_IR 100",
        "SOPClassUID": MRImageStorage,
        "Modality": "MR",
        "PatientName": f"DEMO^SUBJECT{plan.number:02d}",
        "PatientID": f"DEMO{plan.seed % 1000:03d}{plan.number:04d}",
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "PatientSex": str(rng.choice(["F", "M"])),
        "PatientAge": f"{age:03d}Y",
        "PatientWeight": round(float(rng.uniform(50, 100)), 1),
        "PatientPosition": "HFS",
        "StudyInstanceUID": _uid(plan, "study"),
        "FrameOfReferenceUID": _uid(plan, "frame-of-reference"),
        "StudyDate": study_day.strftime("%Y%m%d"),
        "StudyTime": start.strftime("%H%M%S"),
        "StudyID": str(int(rng.integers(1000, 99999))),
        "AccessionNumber": f"ACC{int(rng.integers(10**6, 10**7))}",
        "StudyDescription": "MRI BRAIN",
        "ReferringPhysicianName": "DEMO^REFERRER",
        "InstitutionName": "Demo Hospital",
        "InstitutionAddress": "1 Demo Street, Demo City",
        "StationName": f"DEMO-MR{plan.number % 3 + 1}",
        "Manufacturer": scanner.vendor.manufacturer,
        "ManufacturerModelName": scanner.model,
        "MagneticFieldStrength": scanner.field_t,
        "ImagingFrequency": round(42.577478 * scanner.field_t, 6),
        "ImagedNucleus": "1H",
        "BodyPartExamined": "BRAIN",
        "SoftwareVersions": software[scanner.vendor.name],
    }
    return tags, start


def _series_dataset(
    scan: SubjectScan, series: Series, study: tuple[dict[str, object], datetime]
) -> Dataset:
    """Dataset with every tag that is the same for all frames of ``series``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    tags, start = study
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    when = start + timedelta(minutes=4 * series.number // scan.scanner.vendor.series_step)
    rows, columns = series.frames.shape[1:]
    bits = series.scaling.bits_stored
    tags: dict[str, object] = {
        "SeriesInstanceUID": _uid(scan.plan, "series", series.number),
        "SeriesNumber": series.number,
        "SeriesDescription": series.description,
        "ProtocolName": series.description,
        "SeriesDate": when.strftime("%Y%m%d"),
        "SeriesTime": when.strftime("%H%M%S"),
        "AcquisitionDate": when.strftime("%Y%m%d"),
        "AcquisitionTime": when.strftime("%H%M%S.%f")[:13],
        "ContentDate": when.strftime("%Y%m%d"),
        "AcquisitionNumber": 1,
        "EchoNumbers": 1,
        "NumberOfAverages": 1,
        "Rows": rows,
        "Columns": columns,
        "PixelSpacing": [_ds(series.pixel_mm), _ds(series.pixel_mm)],
        "SliceThickness": _ds(series.thickness_mm),
        "SpacingBetweenSlices": _ds(series.spacing_mm),
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "BitsAllocated": 16,
        "BitsStored": bits,
        "HighBit": bits - 1,
        "PixelRepresentation": 0,
        "RescaleSlope": _ds(series.scaling.slope, 6),
        "RescaleIntercept": _ds(series.scaling.intercept, 3),
        "RescaleType": "US",
        "ImagesInAcquisition": len(series.frames),
    }
    tags.update(series.tags)
    # Frequency rows, frequency columns, phase rows, phase columns.
    phase_cols = series.tags.get("InPlanePhaseEncodingDirection") == "ROW"
    tags["AcquisitionMatrix"] = [rows, 0, 0, columns] if phase_cols else [0, columns, rows, 0]
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    physical = (
        series.frames[len(series.frames) // 2] * series.scaling.slope + series.scaling.intercept
    )
    low, high = np.percentile(physical, [1, 99.5])
    ds.WindowCenter = _ds((low + high) / 2, 1)
    ds.WindowWidth = _ds(max(high - low, 1.0), 1)
    return ds


class _Namer:
    """File names for one subject, in one of several archive styles (flat, nested, UIDs)."""

    STYLES = ("flat", "series_folders", "uid_names", "dicomdir_like")

    def __init__(self, rng: np.random.Generator) -> None:
        self.style = self.STYLES[int(rng.integers(len(self.STYLES)))]
        self.counter = 0

    def path(self, series: Series, instance: int, sop_uid: str, series_uid: str) -> Path:
        self.counter += 1
        if self.style == "flat":
            return Path(f"IM{self.counter:04d}")
        if self.style == "series_folders":
            return Path(
                "DICOM",
                f"S{series.number:04d}_{series.description.replace(' ', '_')}",
                f"IMG{instance:05d}.dcm",
            )
        if self.style == "uid_names":
            return Path(series_uid, f"{sop_uid}.dcm")
        return Path("DICOM", f"ST{series.number // 100:03d}", f"IM_{self.counter:04d}")


# Tags that change from file to file within a series; everything else is encoded once.
_PER_FILE = (
    "SOPInstanceUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceLocation",
    "PixelData",
)


def _encode(elements: list[DataElement]) -> bytes:
    """Explicit VR little endian encoding of ``elements`` (already in tag order)."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    for element in elements:
        write_data_element(buffer, element)
    return buffer.getvalue()


def _chunks(dataset: Dataset, varying: list[BaseTag]) -> list[bytes]:
    """Encoded static elements of ``dataset`` between consecutive ``varying`` tags (len + 1 chunks)."""
    groups: list[list[DataElement]] = [[] for _ in range(len(varying) + 1)]
    for element in dataset:
        if element.tag not in varying:
            groups[sum(element.tag > tag for tag in varying)].append(element)
    return [_encode(group) for group in groups]


class _SeriesEncoder:
    """Writes the files of one series: pydicom encodes the constant part once, then per file only
    the few elements that change, which is what dcmwrite would write (a unit test compares bytes)
    at a fraction of its per-element cost.
    """

    def __init__(self, dataset: Dataset) -> None:
        meta = FileMetaDataset(dataset.file_meta)
        meta.MediaStorageSOPClassUID = dataset.SOPClassUID
        meta.MediaStorageSOPInstanceUID = dataset.get("SOPInstanceUID", "1.2.3")
        validate_file_meta(meta, enforce_standard=True)  # adds version and implementation UID
        self.meta_tag = Tag("MediaStorageSOPInstanceUID")
        meta.pop(Tag("FileMetaInformationGroupLength"), None)
        self.meta_chunks = _chunks(meta, [self.meta_tag])
        self.tags = sorted(Tag(keyword) for keyword in _PER_FILE)
        self.chunks = _chunks(dataset, self.tags)

    def encode(self, per_file: Dataset) -> bytes:
        """Bytes of a DICOM file whose per-file elements (all of ``_PER_FILE``) come from ``per_file``."""
        uid = DataElement(self.meta_tag, "UI", per_file.SOPInstanceUID)
        meta = self.meta_chunks[0] + _encode([uid]) + self.meta_chunks[1]
        group_length = _encode([DataElement(0x00020000, "UL", len(meta))])
        parts = [b"\0" * 128, b"DICM", group_length, meta, self.chunks[0]]
        for tag, chunk in zip(self.tags, self.chunks[1:], strict=True):
            parts += [_encode([per_file[tag]]), chunk]
        return b"".join(parts)


def _frame_dataset(scan: SubjectScan, series: Series, index: int) -> Dataset:
    """The per-file elements of frame ``index`` (0-based) of ``series``."""
    ds = Dataset()
    ds.SOPInstanceUID = _uid(scan.plan, "sop", series.number, index + 1)
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [_ds(v) for v in series.positions[index]]
    ds.ImageOrientationPatient = [_ds(v, 6) for v in series.orientations[index]]
    normal = np.cross(series.orientations[index][:3], series.orientations[index][3:])
    ds.SliceLocation = _ds(series.positions[index] @ normal)
    ds.PixelData = series.frames[index].astype("<u2").tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def write_subject(scan: SubjectScan, subject_dir: Path) -> list[Path]:
    """Write ``scan`` as DICOM files under ``subject_dir``; returns the T1 file paths in slice order.

    A ``truncated_file`` subject has its middle T1 file cut halfway through the
    pixel data; ``dropped`` frames are skipped.
    """
    subject_dir.mkdir(parents=True, exist_ok=False)
    if not scan.series:
        return []
    study = _study_tags(scan)
    namer = _Namer(scan.plan.rng("files"))
    t1_files: list[Path] = []
    for series in scan.series:
        ds = _series_dataset(scan, series, study)
        encoder = _SeriesEncoder(ds)
        for index in range(len(series.frames)):
            if index in series.dropped:
                continue
            frame = _frame_dataset(scan, series, index)
            path = subject_dir / namer.path(
                series, index + 1, frame.SOPInstanceUID, ds.SeriesInstanceUID
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encoder.encode(frame))
            if series.role == "t1":
                t1_files.append(path)
    if scan.plan.kind == "truncated_file" and t1_files:
        victim = t1_files[len(t1_files) // 2]
        pixel_bytes = scan.t1().frames[0].nbytes
        with victim.open("r+b") as handle:
            handle.truncate(victim.stat().st_size - pixel_bytes // 2)
    return t1_files


# ---------------------------------------------------------------------- cohort

LABEL_COLUMNS = (
    "subject",
    "label",
    "kind",
    "description",
    "lesion_x_mm",
    "lesion_y_mm",
    "lesion_z_mm",
    "lesion_radius_mm",
    "person",
)
#: ``person`` of subjects made from the template head.
TEMPLATE_PERSON = "MNI152"


def _label_row(scan: SubjectScan) -> dict[str, object]:
    lesion = scan.lesion
    centre = lesion.centre_mni_mm if lesion else (np.nan, np.nan, np.nan)
    return {
        "subject": scan.plan.folder,
        "label": scan.plan.label,
        "kind": scan.plan.kind,
        "description": "; ".join(scan.notes) or "normal",
        "lesion_x_mm": centre[0],
        "lesion_y_mm": centre[1],
        "lesion_z_mm": centre[2],
        "lesion_radius_mm": lesion.radius_mm if lesion else np.nan,
        "person": scan.plan.person or TEMPLATE_PERSON,
    }


def _check_destination(out_dir: Path, labels_path: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        message = f"demo output folder {str(out_dir)!r} is not empty; remove it or choose another"
        raise FileExistsError(message)
    inside = labels_path.resolve().parent
    if inside != out_dir.resolve() and out_dir.resolve() in inside.parents:
        message = f"labels file {str(labels_path)!r} would sit inside a subject folder of {str(out_dir)!r}"
        raise ValueError(message)


def _make_subject(plan: SubjectPlan, out_dir: Path, voxel_size_mm: float) -> dict[str, object]:
    """Render and write one subject; returns its labels row."""
    started = time.perf_counter()
    scan = render_subject(plan, voxel_size_mm=voxel_size_mm)
    write_subject(scan, out_dir / plan.folder)
    logger.info("%s: %s (%.1f s)", plan.folder, plan.kind, time.perf_counter() - started)
    return _label_row(scan)


def _default_jobs(n_subjects: int, voxel_size_mm: float) -> int:
    # Worker processes pay off only at full resolution (about 2 s a subject); coarse
    # test cohorts take a fraction of a second a subject. Each worker needs ~0.5 GB.
    if voxel_size_mm >= 2.0:
        return 1
    return max(1, min(os.cpu_count() or 1, 4, n_subjects))


def _make_all(
    plans: list[SubjectPlan], out_dir: Path, voxel_size_mm: float, jobs: int
) -> list[dict[str, object]]:
    if jobs <= 1:
        return [_make_subject(plan, out_dir, voxel_size_mm) for plan in plans]
    # Build the cached anatomy once; forked workers share it instead of rebuilding it.
    for plan in plans:
        _head(plan)
    load_brain_mask(resolution=1)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(_make_subject, plan, out_dir, voxel_size_mm) for plan in plans]
        return [future.result() for future in futures]


def generate_cohort(
    out_dir: str | Path,
    *,
    n_subjects: int = 30,
    seed: int = 0,
    voxel_size_mm: float = 1.2,
    labels_path: str | Path | None = None,
    jobs: int | None = None,
) -> pd.DataFrame:
    """Write the demo cohort under ``out_dir`` and its labels TSV; return the labels table.

    One folder per subject (nothing else at the top level except a labels file
    placed there). ``voxel_size_mm`` is the nominal T1 voxel size (each subject
    varies it by +-10 %); 0.8-8 mm. ``jobs`` worker processes (default: up to 4
    at full resolution, 1 for coarse cohorts); the output does not depend on it.
    The table has ``LABEL_COLUMNS``, lesion centres in MNI mm (RAS), one row per
    folder, sorted by folder name.
    """
    return write_cohort(
        plan_cohort(n_subjects, seed=seed),
        out_dir,
        voxel_size_mm=voxel_size_mm,
        labels_path=labels_path,
        jobs=jobs,
    )


def write_cohort(
    plans: list[SubjectPlan],
    out_dir: str | Path,
    *,
    voxel_size_mm: float = 1.2,
    labels_path: str | Path | None = None,
    jobs: int | None = None,
) -> pd.DataFrame:
    """Render and write ``plans`` under ``out_dir`` with their labels TSV (see ``generate_cohort``)."""
    if not 0.8 <= voxel_size_mm <= 8.0:
        message = f"voxel size must be between 0.8 and 8 mm, got {voxel_size_mm}"
        raise ValueError(message)
    out = Path(out_dir)
    labels = Path(labels_path) if labels_path is not None else out / "labels.tsv"
    _check_destination(out, labels)
    out.mkdir(parents=True, exist_ok=True)
    workers = _default_jobs(len(plans), voxel_size_mm) if jobs is None else jobs
    rows = _make_all(plans, out, voxel_size_mm, workers)
    table = pd.DataFrame(rows, columns=list(LABEL_COLUMNS))
    table = table.sort_values("subject", ignore_index=True)
    labels.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(labels, sep="\t", index=False, na_rep="", float_format="%g")
    return table


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (``python -m mriaudit.demo --help``); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m mriaudit.demo",
        description="Generate the demo DICOM cohort (MNI152 anatomy, artefacts, broken inputs) and its labels.",
    )
    parser.add_argument("outdir", type=Path, help="new or empty folder; one sub-folder per subject")
    parser.add_argument(
        "--subjects",
        type=int,
        default=30,
        help=f"number of subjects (default 30; at least {FULL_MIX_SUBJECTS} for every anomaly kind, minimum {MIN_SUBJECTS})",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--voxel-size", type=float, default=1.2, help="nominal T1 voxel size in mm (default 1.2)"
    )
    parser.add_argument(
        "--labels", type=Path, default=None, help="labels TSV (default OUTDIR/labels.tsv)"
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="worker processes (default: automatic, up to 4)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    try:
        table = generate_cohort(
            args.outdir,
            n_subjects=args.subjects,
            seed=args.seed,
            voxel_size_mm=args.voxel_size,
            labels_path=args.labels,
            jobs=args.jobs,
        )
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    logger.info(
        "wrote %d subjects (%d labelled 1) to %s in %.1f s",
        len(table),
        int(table["label"].sum()),
        args.outdir,
        time.perf_counter() - started,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
