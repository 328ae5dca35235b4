"""The ``ae3d`` method's network: a 3D convolutional autoencoder of whole brains.

After Luo et al., "Learning abstract distribution from massive healthy brains"
(a 3D autoencoder trained on healthy brains; anomalies are where its
reconstruction fails). The whole cropped, normalised volume (X, Y, Z; 80 x 96
x 78 at 2 mm) is zero-padded to a multiple of 8 (80 x 96 x 80) and
average-pooled to 4 mm; a 3^3 stem (16 channels, 4 mm) and two stride-2
levels (32 and 64 channels, 8 and 16 mm) encode it into a ``latent``-channel
bottleneck (10 x 12 x 10 x 8 = 9,600 values for 614,400 voxels, 64x fewer);
the decoder mirrors it with transposed convolutions, is trilinearly
upsampled back to 2 mm and added to the fold's mean training volume. The bottleneck is what keeps a lesion, noise or a
ghost out of the reconstruction: it has room for the shape of a normal brain,
not for everything in the image. The 4 mm working grid is the price of two
CPU cores: full-resolution 3D convolutions cost 5-8 times as much per volume
(measured), and a 10 mm lesion is still 2.5 voxels in radius there. Shapes:
input and output (N, 1, X, Y, Z), normalised intensity.

The residual post-processing of the field (median-filtered residuals, voxel
thresholds from healthy percentiles) is the shared one of every method:
:mod:`mriaudit.model.maps` (tolerant residual and SSIM terms, a robust z
against the out-of-fold reference at each voxel, a 3^3 median filter).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_ARCHITECTURE: dict[str, Any] = {
    "name": "ae3d",
    # The 2 mm volume is average-pooled by this factor first: the network works at 4 mm,
    # 8x fewer voxels, so the demo cohort trains in minutes on two CPU cores.
    "pool": 2,
    # Feature channels at 1, 1/2 and 1/4 of the pooled grid (4, 8 and 16 mm).
    "channels": [16, 32, 64],
    # Bottleneck channels at the coarsest level: 1/64 of the voxels' values.
    "latent": 8,
    "groups": 4,
    # Training (whole volumes): volumes per optimiser step, and passes over the
    # fold's training volumes per epoch (training.epochs of them train a fold: on
    # two CPU cores a step of two volumes takes 0.3-1 s).
    "volumes_per_batch": 2,
    "passes_per_epoch": 1,
}


def pad_widths(shape: tuple[int, ...], *, multiple: int) -> list[int]:
    """``F.pad`` widths (z, y, x order; low, high) that bring (X, Y, Z) ``shape`` to a
    multiple of ``multiple`` voxels, split evenly between the two sides."""
    widths: list[int] = []
    for size in reversed(shape):
        extra = -size % multiple
        widths += [extra // 2, extra - extra // 2]
    return widths


def conv_layer(
    channels_in: int, channels_out: int, groups: int, *, kernel: int, transposed: bool = False
) -> list[nn.Module]:
    """A convolution (3^3, padded) or a 2^3 stride-2 one (halving the grid, or doubling it
    when ``transposed``), then group norm and SiLU."""
    if kernel == 3:
        conv: nn.Module = nn.Conv3d(channels_in, channels_out, 3, padding=1)
    elif transposed:
        conv = nn.ConvTranspose3d(channels_in, channels_out, 2, stride=2)
    else:
        conv = nn.Conv3d(channels_in, channels_out, 2, stride=2)
    return [conv, nn.GroupNorm(min(groups, channels_out), channels_out), nn.SiLU()]


class AutoEncoder3D(nn.Module):
    """Encoder to a ``latent``-channel code, decoder back to the grid.

    The input (N, 1, X, Y, Z) is zero-padded to a multiple of :attr:`multiple`
    (``pool`` times 2 per level below the first), average-pooled by ``pool``,
    taken through a 3^3 stem (``channels[0]``), then per further level a
    stride-2 2^3 convolution and a 3^3 one (``channels[1:]``), and a 1^3
    convolution to ``latent`` channels: the bottleneck. The decoder mirrors it
    with transposed stride-2 convolutions, ends in one channel on the pooled
    grid and is trilinearly upsampled to the input grid; the padding is cut off.
    The output is added to ``mean`` (X, Y, Z), the fold's mean training volume
    (a buffer, saved in the state dict), and the last layer starts at zero: a
    few hundred steps on two CPU cores do not take a plain autoencoder past a
    blurred blob (trimmed L1 0.14 after 120 steps, measured), while from the
    mean it only has to learn each brain's departures from it.
    """

    def __init__(
        self,
        *,
        channels: list[int],
        latent: int,
        shape: tuple[int, int, int],
        pool: int = 2,
        groups: int = 4,
    ) -> None:
        super().__init__()
        if len(channels) < 2 or pool < 1:
            message = f"channels needs at least two levels and pool >= 1, got {channels}, {pool}"
            raise ValueError(message)
        self.pool = pool
        self.multiple = pool * 2 ** (len(channels) - 1)
        encoder = conv_layer(1, channels[0], groups, kernel=3)
        for low, high in itertools.pairwise(channels):
            encoder += conv_layer(low, high, groups, kernel=2)
            encoder += conv_layer(high, high, groups, kernel=3)
        self.encoder = nn.Sequential(*encoder, nn.Conv3d(channels[-1], latent, 1))
        decoder = conv_layer(latent, channels[-1], groups, kernel=3)
        for high, low in itertools.pairwise(channels[::-1]):
            decoder += conv_layer(high, low, groups, kernel=2, transposed=True)
            if low != channels[0]:
                decoder += conv_layer(low, low, groups, kernel=3)
        head = nn.Conv3d(channels[0], 1, 3, padding=1)
        # Start from the mean volume: the decoder learns the subject's departures from it.
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        self.decoder = nn.Sequential(*decoder, head)
        self.register_buffer("mean", torch.zeros(shape))

    def set_mean(self, mean: torch.Tensor) -> None:
        """The fold's mean training volume (X, Y, Z), normalised intensity."""
        self.mean.copy_(mean.to(self.mean.device, torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction (N, 1, X, Y, Z) of volumes ``x`` (N, 1, X, Y, Z)."""
        size = x.shape[-3:]
        pad = pad_widths(tuple(size), multiple=self.multiple)
        padded = F.pad(x, pad)
        inputs = F.avg_pool3d(padded, self.pool) if self.pool > 1 else padded
        out = self.decoder(self.encoder(inputs))
        if self.pool > 1:
            out = F.interpolate(out, size=padded.shape[-3:], mode="trilinear", align_corners=False)
        (z0, _, y0, _, x0, _) = pad
        return out[..., x0 : x0 + size[0], y0 : y0 + size[1], z0 : z0 + size[2]] + self.mean

    def reconstruct_volumes(self, volumes: torch.Tensor, *, slices: int) -> torch.Tensor:
        """Reconstructions (B, X, Y, Z), float32, of cropped volumes (B, X, Y, Z) on the
        model's device, as many whole volumes per forward pass as ``slices`` axial
        slices make (at least one)."""
        self.eval()
        per_pass = max(1, slices // volumes.shape[-1])
        with torch.inference_mode():
            out = torch.empty(volumes.shape, device=volumes.device)
            for start in range(0, volumes.shape[0], per_pass):
                chunk = volumes[start : start + per_pass].float()[:, None]
                out[start : start + per_pass] = self(chunk)[:, 0].float()
            return out


def build_ae3d(architecture: dict[str, Any], *, shape: tuple[int, int, int]) -> AutoEncoder3D:
    """The ``ae3d`` network of ``architecture`` for crops of ``shape`` (X, Y, Z)."""
    return AutoEncoder3D(
        channels=[int(c) for c in architecture["channels"]],
        latent=int(architecture["latent"]),
        shape=tuple(int(v) for v in shape),
        pool=int(architecture.get("pool", 2)),
        groups=int(architecture.get("groups", 4)),
    )
