"""Figures of the audit report, returned as PNG bytes (embedded as data: URIs).

Plots use matplotlib's object API with the Agg canvas (no pyplot state, no
display). Subject montages are composed with numpy and encoded by Pillow
(matplotlib's own image dependency), which keeps hundreds of them fast and small.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from nibabel.processing import resample_from_to
from PIL import Image
from scipy import ndimage

#: Height of one montage panel in pixels.
PANEL_PX = 150
_GAP_PX = 2
_TICK_PX = 6
_NORMAL, _ANOMALOUS, _FLAGGED = "#4c72b0", "#dd5555", "#d62728"
_MODEL = "#8c8c8c"


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for an ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png(fig: Figure, *, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def _load(image: nib.Nifti1Image | str | Path) -> nib.Nifti1Image:
    """A 3D image from a path or an image; a missing or empty file raises ValueError."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file() or path.stat().st_size == 0:
            message = f"{path.name}: no image (missing or empty)"
            raise ValueError(message)
        try:
            image = nib.load(path)
        except Exception as error:
            message = f"{path.name}: unreadable image ({error})"
            raise ValueError(message) from error
    if len(image.shape) != 3:
        message = f"expected a 3D image, got shape {image.shape}"
        raise ValueError(message)
    return nib.as_closest_canonical(image)


def _window(planes: list[np.ndarray]) -> list[np.ndarray]:
    """Slices to [0, 1] between the 1st and 99.5th percentile of their nonzero voxels.

    Only the three displayed slices set the window: cheaper than the volume and
    it shows what is on screen with full contrast.
    """
    values = np.concatenate([p[np.isfinite(p) & (p != 0)] for p in planes])
    if values.size == 0:
        return [np.zeros(p.shape, dtype=np.float32) for p in planes]
    low, high = np.percentile(values, [1.0, 99.5])
    if high <= low:
        high = low + 1.0
    return [np.clip((np.nan_to_num(p) - low) / (high - low), 0.0, 1.0) for p in planes]


def _overlay_limits(data: np.ndarray) -> tuple[float, float] | None:
    """(99th percentile of the positive voxels, maximum) of an anomaly map, or None if none is positive.

    The percentile is taken on every second voxel along each axis: a display
    threshold does not need the exact value, and it costs an eighth.
    """
    sample = np.nan_to_num(data[::2, ::2, ::2], nan=0.0)
    values = sample[sample > 0]
    if values.size == 0:
        return None
    return float(np.percentile(values, 99.0)), float(np.nanmax(data))


def _strength(plane: np.ndarray, limits: tuple[float, float]) -> np.ndarray:
    low, high = limits
    plane = np.nan_to_num(plane, nan=0.0)
    if high <= low:
        return (plane >= high).astype(np.float32)
    return np.clip((plane - low) / (high - low), 0.0, 1.0)


def _panel(
    gray: np.ndarray,
    strength: np.ndarray | None,
    *,
    spacing: tuple[float, float],
    mark: tuple[int, int],
) -> np.ndarray:
    """One RGB panel (PANEL_PX high) from 2D slices in display order (rows top-down).

    ``spacing`` is the (row, column) voxel size in mm so the panel keeps the
    physical aspect; ``mark`` is the (row, column) voxel of the region centre,
    shown as ticks on the panel edges.
    """
    rows, cols = gray.shape
    height = PANEL_PX
    width = max(1, round(PANEL_PX * (cols * spacing[1]) / (rows * spacing[0])))
    zoom = (height / rows, width / cols)
    rgb = np.repeat(ndimage.zoom(gray, zoom, order=1)[..., None], 3, axis=2)
    if strength is not None:
        alpha = ndimage.zoom(strength, zoom, order=1)
        colours = colormaps["hot"](0.3 + 0.42 * alpha)[..., :3]
        weight = (0.75 * alpha * (alpha > 0.05))[..., None]
        rgb = (1 - weight) * rgb + weight * colours
    rgb = np.clip(rgb[:height, :width], 0, 1)
    r = min(height - 1, int((mark[0] + 0.5) * zoom[0]))
    c = min(width - 1, int((mark[1] + 0.5) * zoom[1]))
    cyan = np.array([0.0, 0.9, 1.0])
    rgb[max(0, r - 1) : r + 2, :_TICK_PX] = cyan
    rgb[max(0, r - 1) : r + 2, -_TICK_PX:] = cyan
    rgb[:_TICK_PX, max(0, c - 1) : c + 2] = cyan
    rgb[-_TICK_PX:, max(0, c - 1) : c + 2] = cyan
    return rgb


def _centre_voxel(img: nib.Nifti1Image, centre_mm: Sequence[float] | None) -> np.ndarray:
    shape = np.array(img.shape[:3])
    if centre_mm is None or len(centre_mm) != 3 or not all(map(math.isfinite, centre_mm)):
        return shape // 2
    voxel = np.linalg.inv(img.affine) @ np.append(np.asarray(centre_mm, dtype=float), 1.0)
    return np.clip(np.round(voxel[:3]).astype(int), 0, shape - 1)


def map_peak_mm(anomaly_map: nib.Nifti1Image | str | Path) -> tuple[float, float, float]:
    """World coordinates (mm) of the anomaly map's maximum."""
    img = _load(anomaly_map)
    data = np.nan_to_num(np.asarray(img.dataobj, dtype=np.float32), nan=-np.inf)
    voxel = np.unravel_index(int(np.argmax(data)), data.shape)
    world = img.affine @ np.append(np.asarray(voxel, dtype=float), 1.0)
    return float(world[0]), float(world[1]), float(world[2])


def make_subject_montage(
    image: nib.Nifti1Image | str | Path,
    anomaly_map: nib.Nifti1Image | str | Path | None,
    *,
    centre_mm: Sequence[float] | None,
) -> bytes:
    """Axial, coronal and sagittal slices through ``centre_mm`` as one PNG (3 x 150 px high).

    ``image`` is the registered T1w, ``anomaly_map`` the voxel anomaly map on
    the same grid (resampled to it when not), overlaid in a hot colour scale
    from its 99th percentile to its maximum; None draws the image alone.
    ``centre_mm`` is a world (RAS, mm) point, e.g. the most anomalous region's
    centroid; None uses the volume centre. Panels are in neurological
    convention (left on the left), anterior/superior up. Raises ``ValueError``
    when ``image`` is missing, empty or not 3D.
    """
    img = _load(image)
    data = np.asarray(img.dataobj, dtype=np.float32)
    i, j, k = (int(v) for v in _centre_voxel(img, centre_mm))
    _, ny, nz = img.shape
    sx, sy, sz = (float(v) for v in img.header.get_zooms()[:3])

    def planes(volume: np.ndarray) -> list[np.ndarray]:
        # Display order: rows are the second remaining axis, top = anterior/superior.
        return [p.T[::-1] for p in (volume[:, :, k], volume[:, j, :], volume[i, :, :])]

    grays = _window(planes(data))
    strengths: list[np.ndarray | None] = [None, None, None]
    if anomaly_map is not None:
        overlay = _load(anomaly_map)
        if overlay.shape != img.shape or not np.allclose(overlay.affine, img.affine, atol=1e-3):
            overlay = resample_from_to(overlay, img, order=1)
        values = np.asarray(overlay.dataobj, dtype=np.float32)
        limits = _overlay_limits(values)
        if limits is not None:
            strengths = [_strength(p, limits) for p in planes(values)]
    geometry = (
        ((sy, sx), (ny - 1 - j, i)),  # axial: rows y (anterior up), columns x
        ((sz, sx), (nz - 1 - k, i)),  # coronal: rows z (superior up), columns x
        ((sz, sy), (nz - 1 - k, j)),  # sagittal: rows z, columns y (anterior right)
    )
    panels = [
        _panel(gray, strength, spacing=spacing, mark=mark)
        for gray, strength, (spacing, mark) in zip(grays, strengths, geometry, strict=True)
    ]
    gap = np.zeros((PANEL_PX, _GAP_PX, 3))
    montage = np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)
    # A 64-colour palette keeps a montage near 10 kB (vs ~35 kB in RGB), so
    # hundreds fit in one page; grey levels and the overlay survive it.
    rgb = Image.fromarray(np.round(montage * 255).astype(np.uint8), mode="RGB")
    buffer = io.BytesIO()
    rgb.quantize(colors=64, method=Image.Quantize.FASTOCTREE).save(buffer, format="PNG")
    return buffer.getvalue()


def roc_figure(metrics: dict[str, Any]) -> bytes:
    """ROC curve with AUROC (95 % CI) and the two operating points (threshold, flags)."""
    fig = Figure(figsize=(4.2, 4.0))
    ax = fig.add_subplot()
    curve = metrics["roc_curve"]
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
    ax.plot(
        curve["fpr"],
        curve["tpr"],
        color=_NORMAL,
        lw=2,
        label=f"audit score AUROC {_with_ci(metrics, 'auroc')}",
    )
    _model_curve(ax, metrics, curve="roc_curve", x="fpr", y="tpr", area="auroc")
    _operating_points(ax, metrics, x="fpr", y="tpr")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title("ROC: audit score vs labels", fontsize=10)
    return _png(fig)


def pr_figure(metrics: dict[str, Any]) -> bytes:
    """Precision-recall curve with AUPRC (95 % CI), prevalence and the operating points."""
    fig = Figure(figsize=(4.2, 4.0))
    ax = fig.add_subplot()
    curve = metrics["pr_curve"]
    prevalence = metrics["n_pos"] / max(1, metrics["n_pos"] + metrics["n_neg"])
    ax.axhline(prevalence, color="0.7", lw=1, ls="--", label=f"prevalence {prevalence:.2f}")
    ax.plot(
        curve["recall"],
        curve["precision"],
        color=_NORMAL,
        lw=2,
        label=f"audit score AUPRC {_with_ci(metrics, 'auprc')}",
    )
    _model_curve(ax, metrics, curve="pr_curve", x="recall", y="precision", area="auprc")
    _operating_points(ax, metrics, x="tpr", y="precision")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower left", fontsize=7)
    ax.set_title("Precision-recall", fontsize=10)
    return _png(fig)


def _model_curve(
    ax: Any, metrics: dict[str, Any], *, curve: str, x: str, y: str, area: str
) -> None:
    """The model-alone curve (``metrics["model_only"]``) beside the audit score's."""
    model = metrics.get("model_only") or {}
    if model.get(curve):
        points = model[curve]
        label = f"model alone {_with_ci(model, area)}"
        ax.plot(points[x], points[y], color=_MODEL, lw=1.5, ls="-.", label=label)


def _with_ci(metrics: dict[str, Any], name: str) -> str:
    value, ci = metrics.get(name), metrics.get(f"{name}_ci")
    if value is None:
        return "n/a"
    if ci:
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{value:.3f}"


def _operating_points(ax: Any, metrics: dict[str, Any], *, x: str, y: str) -> None:
    for key, marker, name in (
        ("operating_point", "o", "score threshold"),
        ("flagged", "s", "all flags"),
    ):
        point = metrics.get(key) or {}
        px, py = point.get(x), point.get(y)
        if px is None or py is None or not (math.isfinite(px) and math.isfinite(py)):
            continue
        ax.plot(
            [px],
            [py],
            marker=marker,
            ms=8,
            color=_FLAGGED if key == "flagged" else "black",
            ls="",
            label=name,
        )


def score_histogram(scores: np.ndarray, labels: np.ndarray | None, *, threshold: float) -> bytes:
    """Histogram of audit scores, split by label when given, with the threshold.

    ``scores`` (n,) float, NaN ignored; ``labels`` (n,) 0/1 with -1 for unlabelled, or None.
    """
    fig = Figure(figsize=(6.0, 3.0))
    ax = fig.add_subplot()
    s = np.asarray(scores, dtype=float)
    finite = np.isfinite(s)
    if finite.any():
        bins = np.histogram_bin_edges(s[finite], bins=min(60, max(10, int(np.sqrt(finite.sum())))))
        if labels is None:
            ax.hist(s[finite], bins=bins, color=_NORMAL, alpha=0.8, label="all subjects")
        else:
            y = np.asarray(labels)
            for value, colour, name in (
                (0, _NORMAL, "label 0 (normal)"),
                (1, _ANOMALOUS, "label 1 (anomalous)"),
            ):
                chosen = finite & (y == value)
                if chosen.any():
                    ax.hist(s[chosen], bins=bins, color=colour, alpha=0.6, label=name)
            unlabelled = finite & (y < 0)
            if unlabelled.any():
                ax.hist(s[unlabelled], bins=bins, color="0.6", alpha=0.5, label="unlabelled")
    if math.isfinite(threshold):
        ax.axvline(threshold, color="black", ls="--", lw=1.5, label=f"threshold {threshold:.2f}")
    ax.set(xlabel="audit score (calibrated; higher = more anomalous)", ylabel="subjects")
    ax.legend(fontsize=8)
    return _png(fig)


def iqm_distributions(
    values: dict[str, np.ndarray], flagged: np.ndarray, *, titles: dict[str, str]
) -> bytes:
    """Strip plots of a few IQMs, one panel each, flagged subjects in red.

    ``values`` maps column -> (n,) float (NaN ignored), ``flagged`` (n,) bool,
    ``titles`` column -> panel title (name and direction).
    """
    columns = list(values)
    n = max(1, len(columns))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.2 * ncols, 2.4 * nrows))
    rng = np.random.default_rng(0)  # fixed jitter: the same inputs draw the same figure
    flags = np.asarray(flagged, dtype=bool)
    for index, column in enumerate(columns):
        ax = fig.add_subplot(nrows, ncols, index + 1)
        v = np.asarray(values[column], dtype=float)
        jitter = rng.uniform(-0.3, 0.3, v.size)
        normal = np.isfinite(v) & ~flags
        marked = np.isfinite(v) & flags
        ax.scatter(v[normal], jitter[normal], s=6, color=_NORMAL, alpha=0.5, linewidths=0)
        ax.scatter(
            v[marked],
            jitter[marked],
            s=14,
            color=_FLAGGED,
            alpha=0.9,
            linewidths=0,
            label="flagged",
        )
        ax.set_yticks([])
        ax.set_ylim(-0.5, 0.5)
        ax.set_title(titles.get(column, column), fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)
