"""Training of the ``ae3d`` method: one fold's 3D autoencoder on whole volumes.

As the ``atlas_warp`` trainer (:mod:`mriaudit.model.train_atlas`): the fold's
volumes, the brain mask, the draws, the augmentation and the loss live on the
device as tensors, every draw comes from one ``torch.Generator``, the host
reads one value back per epoch, and ``precision`` ``bf16`` runs the network
under bfloat16 autocast (the loss stays float32). An epoch is
``passes_per_epoch`` shuffled passes over the volumes, ``volumes_per_batch`` at
a time (the architecture's training keys). Augmentation is light and in
intensity only (gamma, scale, fine noise on the input): the target is the
subject's own clean volume, which the bottleneck cannot copy.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from mriaudit.model.ae3d import build_ae3d
from mriaudit.model.data import BrainGrid
from mriaudit.model.objective import _trimmed_l1, lr_factor
from mriaudit.model.options import TrainOptions

log = logging.getLogger(__name__)


def augment_volumes(
    batch: torch.Tensor, *, generator: torch.Generator, options: TrainOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, 1, X, Y, Z) for volumes ``batch`` (B, X, Y, Z), float32 in
    normalised intensity on ``generator``'s device.

    Each volume gets a gamma in [1 - g, 1 + g] and a scale in [1 - s, 1 + s]
    (``options.gamma_jitter``, ``scale_jitter``): the target. The input adds
    fine Gaussian noise of a standard deviation drawn in [0,
    ``options.fine_noise_std``] inside the head, clipped to [0, 1.5].
    """
    n = batch.shape[0]
    device = generator.device

    def uniform(low: float, high: float) -> torch.Tensor:
        draw = torch.rand((n, 1, 1, 1), generator=generator, device=device)
        return low + (high - low) * draw

    gamma = uniform(1 - options.gamma_jitter, 1 + options.gamma_jitter)
    scale = uniform(1 - options.scale_jitter, 1 + options.scale_jitter)
    target = batch.clamp_min(0.0).pow(gamma) * scale
    noise = torch.randn(target.shape, generator=generator, device=device)
    noisy = (target + noise * uniform(0.0, options.fine_noise_std)).clamp(0.0, 1.5)
    inputs = torch.where(target > 0, noisy, torch.zeros((), device=device))
    return inputs[:, None], target[:, None]


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
    """Train one autoencoder on cropped, normalised volumes (X, Y, Z each).

    The loss is the trimmed L1 (``options.trim``) between the reconstruction
    and the target inside the template brain mask. ``batch_size`` (slices, the
    atlas_warp unit) does not apply: whole volumes train,
    ``architecture["volumes_per_batch"]`` at a time. Returns the CPU state
    dict and the mean loss of the last epoch.
    """
    del batch_size  # whole volumes: the architecture's volumes_per_batch
    architecture = options.architecture
    per_batch = int(architecture["volumes_per_batch"])
    passes = int(architecture["passes_per_epoch"])
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    # (N, X, Y, Z), as stored (float16): a batch is one gather.
    stack = torch.from_numpy(np.stack(volumes)).to(device)
    brain = torch.from_numpy(grid.crop_mask.astype(np.float32)).to(device)[None, None]
    model = build_ae3d(architecture, shape=volumes[0].shape).to(device)
    model.set_mean(_mean_volume(stack))
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
            for group in optimiser.param_groups:
                group["lr"] = learning_rate * lr_factor(step, total, options.warmup)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                output = model(inputs)
            mask = brain.expand_as(target)
            loss = _trimmed_l1(output.float(), target, mask, options.trim)
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


def _mean_volume(stack: torch.Tensor) -> torch.Tensor:
    """Voxelwise mean (X, Y, Z), float32, of volumes ``stack`` (N, X, Y, Z), slab by slab
    (no float32 copy of the whole stack)."""
    out = torch.empty(stack.shape[1:], device=stack.device)
    for x in range(stack.shape[1]):
        out[x] = stack[:, x].float().mean(dim=0)
    return out
