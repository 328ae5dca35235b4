"""Training inputs: augmentation and corruption of a batch of slices.

Inputs are augmented (intensity gamma and scale, small shifts against the
atlas, fine noise) and corrupted (coarse noise blobs, elliptical patches of
random intensity) while the target stays the clean slice, so the encoder learns
to estimate anatomy while ignoring anomalies instead of bending the atlas
towards them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mriaudit.model.options import TrainOptions


def _uniform(rng: np.random.Generator, low: float, high: float, n: int) -> torch.Tensor:
    """(n, 1, 1, 1) float32 draws from NumPy's generator (the one source of randomness)."""
    return torch.from_numpy(rng.uniform(low, high, (n, 1, 1, 1)).astype(np.float32))


def _coarse_noise(
    n: int, size: tuple[int, int], *, rng: np.random.Generator, options: TrainOptions
) -> torch.Tensor:
    """Smooth noise (n, 1, X, Y): Gaussian on a coarse grid, bilinearly upsampled."""
    noise = torch.zeros((n, 1, *size))
    chosen = rng.random(n) < options.noise_probability
    factors = rng.choice(options.noise_scales, n)
    std = _uniform(rng, 0.0, options.noise_std, n)
    for factor in options.noise_scales:
        picked = torch.from_numpy(np.flatnonzero(chosen & (factors == factor)))
        if picked.numel() == 0:
            continue
        coarse = rng.standard_normal(
            (picked.numel(), 1, max(1, size[0] // factor), max(1, size[1] // factor))
        ).astype(np.float32)
        upsampled = F.interpolate(
            torch.from_numpy(coarse), size=size, mode="bilinear", align_corners=False
        )
        noise[picked] = upsampled * std[picked]
    return noise


def _patches(
    n: int, size: tuple[int, int], *, rng: np.random.Generator, options: TrainOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft elliptical patches: weights (n, 1, X, Y) in [0, 1] and fill values (n, 1, X, Y).

    A chosen slice gets one or two ellipses (radii in ``options.patch_radius``
    voxels, random angle) filled with one random intensity in [0, 1.3] plus
    a little texture.
    """
    k = 2
    shape = (n, k, 1, 1)
    active = (rng.random(n) < options.patch_probability)[:, None] & (
        np.arange(k)[None, :] < rng.integers(1, k + 1, n)[:, None]
    )
    centre_x = torch.from_numpy(rng.uniform(0.15, 0.85, shape).astype(np.float32)) * size[0]
    centre_y = torch.from_numpy(rng.uniform(0.15, 0.85, shape).astype(np.float32)) * size[1]
    radius = torch.from_numpy(
        rng.uniform(*options.patch_radius, (n, k, 2, 1, 1)).astype(np.float32)
    )
    angle = torch.from_numpy(rng.uniform(0, np.pi, shape).astype(np.float32))
    value = torch.from_numpy(rng.uniform(0.0, 1.3, shape).astype(np.float32))
    texture = torch.from_numpy(0.05 * rng.standard_normal((n, 1, *size)).astype(np.float32))
    x = torch.arange(size[0], dtype=torch.float32)[:, None] - centre_x
    y = torch.arange(size[1], dtype=torch.float32)[None, :] - centre_y
    u = x * torch.cos(angle) + y * torch.sin(angle)
    v = -x * torch.sin(angle) + y * torch.cos(angle)
    distance = torch.sqrt((u / radius[:, :, 0]) ** 2 + (v / radius[:, :, 1]) ** 2)
    edge = torch.minimum(radius[:, :, 0], radius[:, :, 1])
    weights = ((1.0 - distance) * edge + 0.5).clamp(0.0, 1.0)
    weights = weights * torch.from_numpy(active.astype(np.float32))[:, :, None, None]
    weight, which = weights.max(dim=1, keepdim=True)
    fill = torch.gather(value.expand(-1, -1, *size), 1, which) + texture
    return weight, fill


def augment_batch(
    batch: np.ndarray,
    masks: np.ndarray,
    *,
    context: int,
    rng: np.random.Generator,
    options: TrainOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Corrupted inputs, clean targets and loss masks for a batch of subject slices.

    ``batch`` is (N, 2 * context + 1, X, Y) from :func:`slice_inputs` and
    ``masks`` (N, X, Y) the brain mask of each centre slice. Returns float32
    CPU tensors: inputs of the same shape, targets (N, 1, X, Y) and loss masks
    (N, 1, X, Y). All randomness comes from ``rng``.
    """
    n, _, size_x, size_y = batch.shape
    mask = torch.from_numpy(masks[:, None].astype(np.float32))
    gamma = _uniform(rng, 1 - options.gamma_jitter, 1 + options.gamma_jitter, n)
    scale = _uniform(rng, 1 - options.scale_jitter, 1 + options.scale_jitter, n)
    image = torch.from_numpy(batch).clamp_min(0.0).pow(gamma) * scale
    if options.max_shift > 0:
        shifts = rng.integers(-options.max_shift, options.max_shift + 1, (n, 2))
        for i, (dx, dy) in enumerate(shifts.tolist()):
            if dx or dy:
                image[i] = torch.roll(image[i], (dx, dy), dims=(1, 2))
                mask[i] = torch.roll(mask[i], (dx, dy), dims=(1, 2))
    target = image[:, context : context + 1].clone()
    # Corruptions are shared by the neighbouring slices: anomalies are 3D.
    size = (size_x, size_y)
    noise = _coarse_noise(n, size, rng=rng, options=options)
    weight, fill = _patches(n, size, rng=rng, options=options)
    # Bulk Gaussian noise from torch (faster), seeded from the NumPy generator.
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    fine = torch.randn(image.shape, generator=generator)
    fine = fine * _uniform(rng, 0.0, options.fine_noise_std, n)
    corrupted = (image + noise) * (1.0 - weight) + fill * weight + fine
    inputs = torch.where(image > 0, corrupted.clamp(0.0, 1.5), torch.zeros(()))
    return inputs, target, mask
