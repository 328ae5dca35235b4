"""Tissue classes for the IQMs: a three-class Gaussian mixture with template priors.

The MNI152 tissue priors, warped to the native grid, weight a three-class
Gaussian mixture of the bias-corrected intensities inside the warped brain
mask, with a light neighbourhood smoothing of the posteriors (a cheap stand-in
for FSL FAST's Markov random field); the posteriors are the partial-volume maps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

from mriaudit.iqm.metrics import MIN_REGION_VOXELS

#: Weight of the template priors against a flat prior in the tissue mixture.
PRIOR_WEIGHT = 0.5


def _bbox(mask: np.ndarray, *, margin: int = 2) -> tuple[slice, ...]:
    """The bounding box of a non-empty ``mask``, grown by ``margin`` voxels (clipped).

    From the mask's projection on each axis: no index arrays of all its voxels.
    """
    mask = np.asarray(mask, dtype=bool)
    box = []
    for axis, n in enumerate(mask.shape):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            message = "the bounding box of an empty mask"
            raise ValueError(message)
        box.append(slice(max(0, int(hit[0]) - margin), min(n, int(hit[-1]) + margin + 1)))
    return tuple(box)


def _posteriors(
    x: np.ndarray,
    weights: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
) -> np.ndarray:
    """Class posteriors (N, K) of intensities ``x`` (N,) under Gaussians with voxel weights (N, K).

    Computed in ``x``'s precision, in place where possible (float32 for a whole brain).
    """
    dtype = x.dtype
    log_p = x[:, None] - np.asarray(mean, dtype=dtype)
    np.square(log_p, out=log_p)
    log_p *= np.asarray(-0.5 / var, dtype=dtype)
    log_p += np.asarray(-0.5 * np.log(var), dtype=dtype)
    log_p += np.log(weights + dtype.type(1e-12))
    log_p -= log_p.max(axis=1, keepdims=True)
    np.exp(log_p, out=log_p)
    log_p /= log_p.sum(axis=1, keepdims=True)
    return log_p


def segment_tissues(
    data: np.ndarray,
    brain: np.ndarray,
    priors: np.ndarray,
    *,
    prior_weight: float = PRIOR_WEIGHT,
    iterations: int = 25,
    spatial_rounds: int = 2,
    smoothing_vox: float = 1.0,
    sample: int = 100_000,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Three-class tissue posteriors from intensities and spatial priors.

    ``data`` (X, Y, Z) intensities, ``brain`` boolean (X, Y, Z), ``priors``
    (K, X, Y, Z) prior probabilities (CSF, GM, WM). A Gaussian mixture is fitted
    by EM on up to ``sample`` brain voxels (fixed ``seed``), each voxel's class
    weights being ``prior_weight * prior + (1 - prior_weight) * proportion``.
    Then ``spatial_rounds`` times the posteriors are smoothed with a Gaussian of
    ``smoothing_vox`` voxels and multiply the weights, which removes isolated
    noise labels like a Markov random field would. Returns the posteriors
    (K, X, Y, Z) float32, zero outside ``brain``, and the fitted ``means``,
    ``sds`` (image units) and ``proportions``. Raises ``ValueError`` when the
    brain holds too few voxels or no contrast.
    """
    if iterations < 1:
        message = f"iterations must be at least 1, got {iterations}"
        raise ValueError(message)
    brain = np.asarray(brain, dtype=bool)
    n_classes = priors.shape[0]
    if np.count_nonzero(brain) < n_classes * MIN_REGION_VOXELS:
        message = f"only {np.count_nonzero(brain)} brain voxels to segment"
        raise ValueError(message)
    box = _bbox(brain)
    inside = brain[box]
    # float32 for the whole brain (millions of voxels), float64 for the EM sample.
    x = np.asarray(data, dtype=np.float32)[box][inside]
    prior = np.stack([np.asarray(p, dtype=np.float32)[box][inside] for p in priors], axis=1)
    np.clip(prior, 0.0, None, out=prior)
    prior /= np.maximum(prior.sum(axis=1, keepdims=True), np.float32(1e-12))
    scale = float(x.std(dtype=np.float64))
    if not scale > 0:
        message = "no intensity contrast inside the brain mask"
        raise ValueError(message)

    rng = np.random.default_rng(seed)
    pick = rng.choice(x.size, size=sample, replace=False) if x.size > sample else slice(None)
    xs, ps = x[pick].astype(np.float64), prior[pick].astype(np.float64)
    resp = ps
    floor = (1e-3 * scale) ** 2
    mean = np.zeros(n_classes)
    for _ in range(iterations):
        total = np.maximum(resp.sum(axis=0), 1e-12)
        new_mean = (resp * xs[:, None]).sum(axis=0) / total
        var = np.maximum((resp * (xs[:, None] - new_mean) ** 2).sum(axis=0) / total, floor)
        proportion = total / total.sum()
        converged = np.max(np.abs(new_mean - mean)) < 1e-3 * scale
        mean = new_mean
        if converged:
            break
        resp = _posteriors(xs, prior_weight * ps + (1 - prior_weight) * proportion, mean, var)

    weights = prior_weight * prior + ((1 - prior_weight) * proportion).astype(np.float32)
    post = _posteriors(x, weights, mean, var)
    volume = np.zeros((n_classes, *inside.shape), dtype=np.float32)
    for _ in range(spatial_rounds):
        for k in range(n_classes):
            volume[k].fill(0.0)
            volume[k][inside] = post[:, k]
            volume[k] = ndi.gaussian_filter(volume[k], smoothing_vox)
        neighbours = np.stack([volume[k][inside] for k in range(n_classes)], axis=1)
        neighbours += np.float32(1e-3)
        neighbours *= weights
        post = _posteriors(x, neighbours, mean, var)

    out = np.zeros((n_classes, *brain.shape), dtype=np.float32)
    for k in range(n_classes):
        out[k][box][inside] = post[:, k]
    fit = {"means": mean.tolist(), "sds": np.sqrt(var).tolist(), "proportions": proportion.tolist()}
    return out, fit


# --------------------------------------------------------------------------- subject


class SegmentationUnavailable(Exception):
    """No usable tissue classes for this subject; the message says why."""
