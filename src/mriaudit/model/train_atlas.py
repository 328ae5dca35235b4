"""Training of the ``atlas_warp`` method: one fold's deformable-atlas autoencoder.

The model (:mod:`mriaudit.model.network`) reconstructs a slice by warping its
fold's atlas (the voxelwise median of its training subjects, rebuilt
``options.atlas_updates`` times in the atlas frame). Training inputs are
augmented and corrupted (:mod:`mriaudit.model.augment`) while the target stays
the clean slice; the loss (:mod:`mriaudit.model.objective`) is a trimmed L1
inside the brain mask plus a smoothness penalty on the displacement.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mriaudit.model.augment import augment_batch
from mriaudit.model.data import BrainGrid
from mriaudit.model.fit import autocast, cpu_state, log_epoch
from mriaudit.model.network import AtlasWarpNet, build_network
from mriaudit.model.objective import displacement_smoothness, lr_factor, multiscale_l1
from mriaudit.model.options import TrainOptions


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
    """Train one model on cropped, normalised volumes (X, Y, Z each).

    The volumes, the brain mask, the atlas, the slice draws, the augmentation
    and the loss all live on ``device``, and the host reads one value back per
    epoch (the logged loss), so a GPU never waits on the CPU. ``precision``
    ``bf16`` runs the network under bfloat16 autocast (the loss stays float32);
    ``fp32`` does not. The model's atlas is the voxelwise median of
    ``volumes``. Returns the CPU state dict (atlas included) and the mean loss
    of the last epoch.
    """
    architecture = options.architecture
    context = int(architecture["context"])
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    # (N, Z, X, Y), as stored (float16): a batch of slices is one gather.
    stack = torch.from_numpy(np.stack([np.moveaxis(v, 2, 0) for v in volumes])).to(device)
    slice_masks = torch.from_numpy(np.moveaxis(grid.crop_mask, 2, 0).astype(np.float32)).to(device)
    model = build_network(architecture, shape=volumes[0].shape).to(device)
    model.atlas.copy_(_median_volume(stack))
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    n_subjects, n_z = stack.shape[:2]
    per_subject = min(options.slices_per_subject, n_z)
    n_pairs = n_subjects * per_subject
    steps_per_epoch = math.ceil(n_pairs / batch_size)
    total = steps_per_epoch * epochs
    offsets = torch.arange(-context, context + 1, device=device)
    step, loss_value = 0, float("nan")
    updates = {
        round(epochs * (i + 1) / (options.atlas_updates + 1)) for i in range(options.atlas_updates)
    }
    for epoch in range(epochs):
        if epoch in updates - {0}:
            model.atlas.copy_(_sharpened_atlas(model, stack, batch_size=batch_size))
        start = time.perf_counter()
        # Each subject's slices without replacement, then every (subject, slice) pair shuffled.
        draws = torch.rand((n_subjects, n_z), generator=generator, device=device)
        slices = draws.argsort(dim=1)[:, :per_subject].flatten()
        subjects = torch.arange(n_subjects, device=device).repeat_interleave(per_subject)
        order = torch.randperm(n_pairs, generator=generator, device=device)
        subjects, slices = subjects[order], slices[order]
        epoch_loss = torch.zeros((), device=device)
        model.train()
        for first in range(0, n_pairs, batch_size):
            s, z = subjects[first : first + batch_size], slices[first : first + batch_size]
            neighbours = (z[:, None] + offsets[None, :]).clamp(0, n_z - 1)
            inputs, target, mask = augment_batch(
                stack[s[:, None], neighbours].float(),
                slice_masks[z][:, None],
                context=context,
                generator=generator,
                options=options,
            )
            for group in optimiser.param_groups:
                group["lr"] = learning_rate * lr_factor(step, total, options.warmup)
            with autocast(device, precision):
                output, flow = model(inputs, z, with_flow=True)
            loss = multiscale_l1(
                output.float(), target, mask, trim=options.trim, coarse=options.coarse_loss
            )
            loss = loss + options.smoothness * displacement_smoothness(flow.float())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            epoch_loss += loss.detach()
            step += 1
        loss_value = float(epoch_loss) / steps_per_epoch  # the epoch's one read-back
        log_epoch(label, epoch, epochs, loss_value, start)
    return cpu_state(model), loss_value


def _to_atlas_space(model: AtlasWarpNet, volume: torch.Tensor, *, batch_size: int) -> torch.Tensor:
    """A training volume (Z, X, Y) resampled into the atlas frame by the model's fields,
    float32 (Z, X, Y) on the volume's device.

    The model says ``x(p) ~ gain(p) * atlas(p + u(p)) + offset(p)``; for small,
    smooth ``u`` the atlas-frame image is ``(x(q - u(q)) - offset(q)) / gain(q)``,
    sampled trilinearly with edge values beyond the border.
    """
    n_z, size_x, size_y = volume.shape
    device = volume.device
    source = volume.float()[None, None]  # (1, 1, Z, X, Y): grid_sample's (D, H, W)
    offsets = torch.arange(-model.context, model.context + 1, device=device)
    grid_x = torch.arange(size_x, device=device, dtype=torch.float32)[None, :, None]
    grid_y = torch.arange(size_y, device=device, dtype=torch.float32)[None, None, :]
    moved = torch.empty((n_z, size_x, size_y), device=device)
    for start in range(0, n_z, batch_size):
        z = torch.arange(start, min(n_z, start + batch_size), device=device)
        neighbours = (z[:, None] + offsets[None, :]).clamp(0, n_z - 1)
        flow, gain, offset = model.fields(volume[neighbours].float(), z)
        position = [
            grid_y - flow[:, 1],
            grid_x - flow[:, 0],
            z.float()[:, None, None] - flow[:, 2],
        ]
        # grid_sample wants (W, H, D) = (y, x, z) in [-1, 1] with align_corners=True.
        grid = torch.stack(
            [
                2 * p / max(1, n - 1) - 1
                for p, n in zip(position, (size_y, size_x, n_z), strict=True)
            ],
            dim=-1,
        )
        sampled = F.grid_sample(
            source, grid[None], mode="bilinear", padding_mode="border", align_corners=True
        )
        moved[start : start + len(z)] = (sampled[0, 0] - offset[:, 0]) / gain[:, 0]
    return moved


def _sharpened_atlas(model: AtlasWarpNet, stack: torch.Tensor, *, batch_size: int) -> torch.Tensor:
    """Voxelwise median (Z, X, Y) of the training volumes ``stack`` (N, Z, X, Y) brought
    into the atlas frame by the current model, on the stack's device."""
    model.eval()
    moved = torch.empty_like(stack)
    with torch.no_grad():
        for i in range(stack.shape[0]):
            moved[i] = _to_atlas_space(model, stack[i], batch_size=batch_size).to(stack.dtype)
    model.train()
    return _median_volume(moved)


def _median_volume(stack: torch.Tensor) -> torch.Tensor:
    """Voxelwise median (Z, X, Y) float32 of volumes ``stack`` (N, Z, X, Y): the fold's atlas.

    The mean of the two middle values for an even count, as ``numpy.median``
    (``torch.median`` would take the lower one).
    """
    n = stack.shape[0]
    out = torch.empty(stack.shape[1:], device=stack.device)
    # Slab by slab, so a large reference set never needs a float32 copy of the stack.
    for z in range(stack.shape[1]):
        ordered = stack[:, z].float().sort(dim=0).values
        out[z] = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    return out
