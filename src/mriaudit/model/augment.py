"""Training inputs: augmentation and corruption of a batch of slices, in torch on the
training device.

Inputs are augmented (intensity gamma and scale, small shifts against the
atlas, fine noise) and corrupted (coarse noise blobs, elliptical patches of
random intensity) while the target stays the clean slice, so the encoder learns
to estimate anatomy while ignoring anomalies instead of bending the atlas
towards them. Every draw comes from one ``torch.Generator`` on the batch's
device and every operation is batched, so a GPU never waits for the CPU and
never hands a value back to it: a seed reproduces the batch on one device (the
CPU and CUDA generators draw different streams).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mriaudit.model.options import TrainOptions


def _uniform(generator: torch.Generator, low: float, high: float, n: int) -> torch.Tensor:
    """(n, 1, 1, 1) float32 draws in [low, high) on the generator's device."""
    draw = torch.rand((n, 1, 1, 1), generator=generator, device=generator.device)
    return low + (high - low) * draw


def _shift(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Each image (N, C, X, Y) rolled by its own integer (dx, dy) of ``shifts`` (N, 2),
    as ``torch.roll`` would, by index arithmetic: one gather per axis for the batch."""
    n, channels, size_x, size_y = images.shape
    device = images.device
    index_x = (torch.arange(size_x, device=device)[None, :] - shifts[:, :1]) % size_x
    index_y = (torch.arange(size_y, device=device)[None, :] - shifts[:, 1:]) % size_y
    rolled = images.gather(2, index_x[:, None, :, None].expand(n, channels, size_x, size_y))
    return rolled.gather(3, index_y[:, None, None, :].expand(n, channels, size_x, size_y))


def _coarse_noise(
    n: int, size: tuple[int, int], *, generator: torch.Generator, options: TrainOptions
) -> torch.Tensor:
    """Smooth noise (n, 1, X, Y): Gaussian on a coarse grid, bilinearly upsampled.

    A slice gets noise with ``options.noise_probability``, on one of
    ``options.noise_scales`` (the slice divided by it) with a standard deviation
    drawn in [0, ``noise_std``]. Every scale is drawn for the whole batch and each
    slice keeps its own: a few small grids instead of a branch per slice.
    """
    device = generator.device
    chosen = torch.rand(n, generator=generator, device=device) < options.noise_probability
    which = torch.randint(len(options.noise_scales), (n,), generator=generator, device=device)
    std = _uniform(generator, 0.0, options.noise_std, n)
    noise = torch.zeros((n, 1, *size), device=device)
    for i, factor in enumerate(options.noise_scales):
        coarse = torch.randn(
            (n, 1, max(1, size[0] // factor), max(1, size[1] // factor)),
            generator=generator,
            device=device,
        )
        upsampled = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
        keep = (chosen & (which == i)).float()[:, None, None, None]
        noise = noise + upsampled * keep
    return noise * std


def _patches(
    n: int, size: tuple[int, int], *, generator: torch.Generator, options: TrainOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft elliptical patches: weights (n, 1, X, Y) in [0, 1] and fill values (n, 1, X, Y).

    A chosen slice gets one or two ellipses (radii in ``options.patch_radius``
    voxels, random angle) filled with one random intensity in [0, 1.3] plus
    a little texture.
    """
    device = generator.device
    k = 2

    def draw(low: float, high: float, shape: tuple[int, ...]) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator, device=device)

    shape = (n, k, 1, 1)
    chosen = torch.rand(n, generator=generator, device=device) < options.patch_probability
    count = torch.randint(1, k + 1, (n,), generator=generator, device=device)
    active = chosen[:, None] & (torch.arange(k, device=device)[None, :] < count[:, None])
    centre_x = draw(0.15, 0.85, shape) * size[0]
    centre_y = draw(0.15, 0.85, shape) * size[1]
    radius = draw(*options.patch_radius, (n, k, 2, 1, 1))
    angle = draw(0.0, math.pi, shape)
    value = draw(0.0, 1.3, shape)
    texture = 0.05 * torch.randn((n, 1, *size), generator=generator, device=device)
    x = torch.arange(size[0], dtype=torch.float32, device=device)[:, None] - centre_x
    y = torch.arange(size[1], dtype=torch.float32, device=device)[None, :] - centre_y
    u = x * torch.cos(angle) + y * torch.sin(angle)
    v = -x * torch.sin(angle) + y * torch.cos(angle)
    distance = torch.sqrt((u / radius[:, :, 0]) ** 2 + (v / radius[:, :, 1]) ** 2)
    edge = torch.minimum(radius[:, :, 0], radius[:, :, 1])
    weights = ((1.0 - distance) * edge + 0.5).clamp(0.0, 1.0)
    weights = weights * active.float()[:, :, None, None]
    weight, which = weights.max(dim=1, keepdim=True)
    fill = torch.gather(value.expand(-1, -1, *size), 1, which) + texture
    return weight, fill


def augment_batch(
    batch: torch.Tensor,
    mask: torch.Tensor,
    *,
    context: int,
    generator: torch.Generator,
    options: TrainOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Corrupted inputs, clean targets and loss masks for a batch of subject slices.

    ``batch`` is float32 (N, 2 * context + 1, X, Y), each subject's slices
    around a centre slice in normalised intensity, and ``mask`` float32
    (N, 1, X, Y) the brain mask of each centre slice, both on ``generator``'s
    device. Returns tensors on that device: inputs of ``batch``'s shape,
    targets (N, 1, X, Y) and loss masks (N, 1, X, Y).
    """
    n, _, size_x, size_y = batch.shape
    gamma = _uniform(generator, 1 - options.gamma_jitter, 1 + options.gamma_jitter, n)
    scale = _uniform(generator, 1 - options.scale_jitter, 1 + options.scale_jitter, n)
    image = batch.clamp_min(0.0).pow(gamma) * scale
    if options.max_shift > 0:
        shifts = torch.randint(
            -options.max_shift,
            options.max_shift + 1,
            (n, 2),
            generator=generator,
            device=generator.device,
        )
        image, mask = _shift(image, shifts), _shift(mask, shifts)
    target = image[:, context : context + 1].clone()
    # Corruptions are shared by the neighbouring slices: anomalies are 3D.
    size = (size_x, size_y)
    noise = _coarse_noise(n, size, generator=generator, options=options)
    weight, fill = _patches(n, size, generator=generator, options=options)
    fine = torch.randn(image.shape, generator=generator, device=generator.device)
    fine = fine * _uniform(generator, 0.0, options.fine_noise_std, n)
    corrupted = (image + noise) * (1.0 - weight) + fill * weight + fine
    inputs = torch.where(image > 0, corrupted.clamp(0.0, 1.5), torch.zeros((), device=image.device))
    return inputs, target, mask
