"""Training of the ``itermask3d`` method: one fold's inpainting network on whole volumes.

As the ``ae3d`` trainer (:mod:`mriaudit.model.train_ae3d`): the fold's
volumes, the brain mask, the draws, the masks and the loss live on the device
as tensors, every draw comes from one ``torch.Generator``, the host reads one
value back per epoch, and ``precision`` ``bf16`` runs the network under
bfloat16 autocast (the high-pass and the loss stay float32). Each step takes
``volumes_per_batch`` volumes with ae3d's light intensity augmentation, moves
them to the 4 mm working grid, draws a random blob mask per volume
(:func:`random_masks`) and trains the network to inpaint the clean volume
under it from the visible voxels and the high-pass of the whole input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mriaudit.model.data import BrainGrid
from mriaudit.model.fit import augment_volumes, autocast, cpu_state, fit_volumes, mean_volume
from mriaudit.model.itermask import build_itermask
from mriaudit.model.objective import _trimmed_l1
from mriaudit.model.options import TrainOptions


def random_masks(
    count: int,
    shape: tuple[int, int, int],
    *,
    generator: torch.Generator,
    scales: Sequence[int],
    fraction: tuple[float, float],
    full_probability: float,
) -> torch.Tensor:
    """``count`` random masks (count, 1, *shape), float32 0/1, on ``generator``'s device.

    Each mask is a smooth random field (Gaussian noise on a grid of one of
    ``scales`` voxels per cell, the scale drawn per mask, trilinearly
    upsampled) thresholded at its own quantile: blobs covering a fraction of
    the grid drawn uniformly in ``fraction``, or all of it with probability
    ``full_probability``. No value is read back to the host.
    """
    device = generator.device
    choice = torch.randint(len(scales), (count,), generator=generator, device=device)
    field = torch.zeros((count, 1, *shape), device=device)
    for i, scale in enumerate(scales):
        coarse = [math.ceil(s / scale) + 1 for s in shape]
        noise = torch.randn((count, 1, *coarse), generator=generator, device=device)
        smooth = F.interpolate(noise, size=shape, mode="trilinear", align_corners=False)
        field += smooth * (choice == i).float()[:, None, None, None, None]
    low, high = fraction
    share = low + (high - low) * torch.rand(count, generator=generator, device=device)
    full = torch.rand(count, generator=generator, device=device) < full_probability
    share = torch.where(full, torch.ones_like(share), share)
    flat = field.flatten(1)
    ranked = flat.sort(dim=1).values
    index = (share * (flat.shape[1] - 1)).round().long()[:, None]
    cutoff = ranked.gather(1, index)
    return (flat <= cutoff).float().reshape(field.shape)


def train_fold(
    volumes: Sequence[np.ndarray],
    *,
    grid: BrainGrid,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    device: torch.device,
    options: TrainOptions,
    precision: str = "fp32",
    label: str = "",
) -> tuple[dict[str, torch.Tensor], float]:
    """Train one inpainting network on cropped, normalised volumes (X, Y, Z each).

    The loss is the trimmed L1 (``options.trim``) between the inpainting and
    the clean (target) volume on the working grid, on the masked voxels inside
    the brain only: the network is never asked to copy what it sees.
    ``batch_size`` (slices, the atlas_warp unit) does not apply: whole volumes
    train, ``architecture["volumes_per_batch"]`` at a time. Returns the CPU
    state dict and the mean loss of the last epoch.
    """
    del batch_size  # whole volumes: the architecture's volumes_per_batch
    architecture = options.architecture
    per_batch = int(architecture["volumes_per_batch"])
    passes = int(architecture["passes_per_epoch"])
    scales = [int(s) for s in architecture["mask_scales"]]
    low, high = (float(v) for v in architecture["mask_fraction"])
    full_probability = float(architecture["full_mask_probability"])
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    # (N, X, Y, Z), as stored (float16): a batch is one gather.
    stack = torch.from_numpy(np.stack(volumes)).to(device)
    model = build_itermask(architecture, shape=volumes[0].shape).to(device)
    model.set_mean(mean_volume(stack))
    model.set_brain(torch.from_numpy(grid.crop_mask.astype(np.float32)))
    brain = model.working_brain().float()

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        inputs, target = augment_volumes(batch, generator=generator, options=options)
        image, clean = model.to_working(inputs[:, 0]), model.to_working(target[:, 0])
        mask = random_masks(
            image.shape[0],
            tuple(image.shape[-3:]),
            generator=generator,
            scales=scales,
            fraction=(low, high),
            full_probability=full_probability,
        )
        with autocast(device, precision):
            output = model(image, mask)
        return _trimmed_l1(output.float(), clean, mask * brain, options.trim)

    loss = fit_volumes(
        model,
        stack,
        loss_of=loss_of,
        generator=generator,
        epochs=epochs,
        per_batch=per_batch,
        passes=passes,
        learning_rate=learning_rate,
        warmup=options.warmup,
        label=label,
    )
    return cpu_state(model), loss
