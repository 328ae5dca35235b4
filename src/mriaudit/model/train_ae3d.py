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

from collections.abc import Sequence

import numpy as np
import torch

from mriaudit.model.ae3d import build_ae3d
from mriaudit.model.data import BrainGrid
from mriaudit.model.fit import augment_volumes, autocast, cpu_state, fit_volumes, mean_volume
from mriaudit.model.objective import _trimmed_l1
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
    model.set_mean(mean_volume(stack))

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        inputs, target = augment_volumes(batch, generator=generator, options=options)
        with autocast(device, precision):
            output = model(inputs)
        return _trimmed_l1(output.float(), target, brain.expand_as(target), options.trim)

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
