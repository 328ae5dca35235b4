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

import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mriaudit.model.data import BrainGrid
from mriaudit.model.itermask import build_itermask
from mriaudit.model.objective import _trimmed_l1, lr_factor
from mriaudit.model.options import TrainOptions
from mriaudit.model.train_ae3d import _mean_volume, augment_volumes

log = logging.getLogger(__name__)


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
    model.set_mean(_mean_volume(stack))
    model.set_brain(torch.from_numpy(grid.crop_mask.astype(np.float32)))
    brain = model.working_brain().float()
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    n_subjects = stack.shape[0]
    n_draws = n_subjects * passes
    steps_per_epoch = math.ceil(n_draws / per_batch)
    total = steps_per_epoch * epochs
    step, loss_value = 0, float("nan")
    for epoch in range(epochs):
        start = time.perf_counter()
        order = torch.cat(
            [torch.randperm(n_subjects, generator=generator, device=device) for _ in range(passes)]
        )
        epoch_loss = torch.zeros((), device=device)
        model.train()
        for first in range(0, n_draws, per_batch):
            chosen = order[first : first + per_batch]
            inputs, target = augment_volumes(
                stack[chosen].float(), generator=generator, options=options
            )
            image, clean = model.to_working(inputs[:, 0]), model.to_working(target[:, 0])
            mask = random_masks(
                image.shape[0],
                tuple(image.shape[-3:]),
                generator=generator,
                scales=scales,
                fraction=(low, high),
                full_probability=full_probability,
            )
            for group in optimiser.param_groups:
                group["lr"] = learning_rate * lr_factor(step, total, options.warmup)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                output = model(image, mask)
            loss = _trimmed_l1(output.float(), clean, mask * brain, options.trim)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            epoch_loss += loss.detach()
            step += 1
        loss_value = float(epoch_loss) / steps_per_epoch  # the epoch's one read-back
        log.info(
            "%sepoch %d/%d loss %.4f (%.1f s)",
            label,
            epoch + 1,
            epochs,
            loss_value,
            time.perf_counter() - start,
        )
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return state, loss_value
