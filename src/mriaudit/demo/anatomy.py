"""Anatomy: the head a subject is rendered from, its deformation and its lesion.

The MNI152 2009a 1 mm T1 from nilearn (brain-extracted) gets a synthetic skull
and scalp shell so the images look like heads; a real head of the benchmark
replaces it when the plan names one. Per subject: a smooth random deformation,
pose and scale (``Anatomy``), and for lesion subjects a lobulated,
heterogeneous lesion in template space (``Lesion``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from mriaudit.demo.plan import SubjectPlan
from mriaudit.template import load_brain_mask, load_template


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
