"""What the methods' fold trainers share: the optimiser step in the configured
precision, the epoch's log line, the state to save, and the whole-volume epoch
loop of the 3D methods (``ae3d``, ``itermask3d``) with their light augmentation.

The host reads one value back per epoch (the logged loss); every other value
stays on the training device.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable

import torch
from torch import nn

from mriaudit.model.objective import lr_factor
from mriaudit.model.options import TrainOptions

log = logging.getLogger(__name__)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device`` when ``precision`` is ``bf16``, else nothing: the
    network's forward pass runs in it, the loss outside it in float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def log_epoch(label: str, epoch: int, epochs: int, loss: float, started: float) -> None:
    """The epoch's log line: its mean loss and its seconds since ``started``."""
    seconds = time.perf_counter() - started
    log.info("%sepoch %d/%d loss %.4f (%.1f s)", label, epoch + 1, epochs, loss, seconds)


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict copied to the CPU: what the checkpoint keeps per fold."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def mean_volume(stack: torch.Tensor) -> torch.Tensor:
    """Voxelwise mean (X, Y, Z), float32, of volumes ``stack`` (N, X, Y, Z), slab by slab
    (no float32 copy of the whole stack)."""
    out = torch.empty(stack.shape[1:], device=stack.device)
    for x in range(stack.shape[1]):
        out[x] = stack[:, x].float().mean(dim=0)
    return out


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


def fit_volumes(
    model: nn.Module,
    stack: torch.Tensor,
    *,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    generator: torch.Generator,
    epochs: int,
    per_batch: int,
    passes: int,
    learning_rate: float,
    warmup: float,
    label: str = "",
) -> float:
    """Train ``model`` on whole volumes ``stack`` (N, X, Y, Z) on its device; returns the
    mean loss of the last epoch.

    An epoch is ``passes`` shuffled passes over the volumes (orders drawn from
    ``generator``), ``per_batch`` volumes a step; ``loss_of`` takes a step's
    volumes (B, X, Y, Z) float32 and returns the scalar loss (its forward pass
    in :func:`autocast`). Adam with a linear warm-up (``warmup``, a fraction of
    all steps) and a cosine decay from ``learning_rate``.
    """
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    device = stack.device
    n_subjects = stack.shape[0]
    n_draws = n_subjects * passes
    steps_per_epoch = math.ceil(n_draws / per_batch)
    total = steps_per_epoch * epochs
    step, loss_value = 0, float("nan")
    for epoch in range(epochs):
        started = time.perf_counter()
        order = torch.cat(
            [torch.randperm(n_subjects, generator=generator, device=device) for _ in range(passes)]
        )
        epoch_loss = torch.zeros((), device=device)
        model.train()
        for first in range(0, n_draws, per_batch):
            for group in optimiser.param_groups:
                group["lr"] = learning_rate * lr_factor(step, total, warmup)
            loss = loss_of(stack[order[first : first + per_batch]].float())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            epoch_loss += loss.detach()
            step += 1
        loss_value = float(epoch_loss) / steps_per_epoch  # the epoch's one read-back
        log_epoch(label, epoch, epochs, loss_value, started)
    return loss_value
