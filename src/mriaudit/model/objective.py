"""The training objective: a trimmed, multiscale L1 inside the brain mask, a smoothness
penalty on the displacement, and the learning-rate schedule.

The L1 ignores the worst ``trim`` fraction of pixels of each batch: a
cohort-wide reference may hold a few anomalous scans.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def displacement_smoothness(flow: torch.Tensor) -> torch.Tensor:
    """Mean squared spatial gradient of a displacement field (N, 3, X, Y)."""
    dx = flow[:, :, 1:, :] - flow[:, :, :-1, :]
    dy = flow[:, :, :, 1:] - flow[:, :, :, :-1]
    return dx.pow(2).mean() + dy.pow(2).mean()


def _trimmed_l1(
    output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, trim: float
) -> torch.Tensor:
    """Mean absolute error where ``mask`` (0/1) is set, without the ``trim`` fraction
    of largest errors (pixels that the reference's few anomalies make unlearnable)."""
    errors = (output - target).abs()
    weight = mask
    if trim > 0:
        # The cut-off from a strided subsample of the masked pixels: sorting
        # every pixel would cost more than the training step. Pixels outside the
        # mask are NaN rather than dropped, so no step waits for the device to say
        # how many are left; with none left the cut-off keeps every pixel.
        stride = max(1, errors.numel() // 40000)
        sample = errors.detach().flatten()[::stride]
        sample = sample.masked_fill(mask.flatten()[::stride] <= 0.5, float("nan"))
        cutoff = torch.nan_to_num(torch.nanquantile(sample, 1.0 - trim), nan=float("inf"))
        weight = mask * (errors.detach() <= cutoff)
    return (errors * weight).sum() / weight.sum().clamp_min(1.0)


def multiscale_l1(
    output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, trim: float, coarse: float
) -> torch.Tensor:
    """Trimmed L1 at full resolution plus ``coarse`` times the mean of the L1 at 1/2 and 1/4."""
    loss = _trimmed_l1(output, target, mask, trim)
    if coarse > 0:
        extra = []
        for _ in range(2):
            output, target = F.avg_pool2d(output, 2), F.avg_pool2d(target, 2)
            # Only blocks entirely inside the brain.
            mask = (F.avg_pool2d(mask, 2) > 0.99).float()
            extra.append(_trimmed_l1(output, target, mask, trim))
        loss = loss + coarse * (extra[0] + extra[1]) / 2
    return loss


def lr_factor(step: int, total: int, warmup: float) -> float:
    warm = max(1, int(total * warmup))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
