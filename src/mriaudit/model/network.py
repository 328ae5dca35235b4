"""The reconstruction network: an autoencoder whose decoder is a deformable atlas.

For an axial slice z of a subject, a small 2.5D convolutional encoder looks at
the subject's slices z - context .. z + context, the same slices of the fold's
atlas (the voxelwise median of its training subjects) and the slice height. It
predicts a smooth displacement field (coarse grid, bilinearly upsampled, at
most ``max_flow`` voxels) and a very smooth intensity gain and offset. The
reconstruction samples the 3D atlas at the displaced positions and applies the
intensity fields:

    x_hat(p) = gain(p) * atlas(p + u(p)) + offset(p)

The output can only be normal anatomy moved by a few mm and rescaled, so the
network cannot copy a lesion, noise or a ghost into its reconstruction; those
stay in the residual. Shapes: input (N, 2 * context + 1, X, Y) with slice
indices z (N,); output (N, 1, X, Y); X and Y multiples of 8.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_ARCHITECTURE: dict[str, Any] = {
    "name": "atlas_warp",
    # Feature channels at 1/2, 1/4 and 1/8 resolution: the encoder sees the slices
    # 2x downsampled (4 mm at the 2 mm grid), enough for a displacement on an 8 mm grid.
    "channels": [16, 32, 48],
    "context": 1,
    "groups": 4,
    # Largest displacement in voxels: in plane (x, y) and through plane (z).
    "max_flow": [3.0, 3.0, 1.5],
    # Largest intensity change: gain in [exp(-g), exp(g)], offset in [-o, o].
    "max_gain": 0.3,
    "max_offset": 0.15,
}


def _block(channels_in: int, channels_out: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, padding=1),
        nn.GroupNorm(min(groups, channels_out), channels_out),
        nn.SiLU(),
        nn.Conv2d(channels_out, channels_out, 3, padding=1),
        nn.SiLU(),
    )


class AtlasWarpNet(nn.Module):
    """Encoder (on 2x downsampled slices) to a displacement field (1/4 resolution)
    and intensity fields (1/16).

    ``atlas`` is a buffer (Z, X, Y) set with :meth:`set_atlas`; it is saved in
    the state dict, so a fold's checkpoint entry is self-contained.
    """

    def __init__(
        self,
        *,
        channels: list[int],
        context: int,
        shape: tuple[int, int, int],
        max_flow: list[float],
        max_gain: float,
        max_offset: float,
        groups: int = 4,
    ) -> None:
        super().__init__()
        if len(channels) != 3:
            message = f"channels needs three levels (1/2, 1/4, 1/8), got {channels}"
            raise ValueError(message)
        self.context = context
        self.max_gain = max_gain
        self.max_offset = max_offset
        self.register_buffer("max_flow", torch.tensor(max_flow, dtype=torch.float32))
        self.register_buffer("atlas", torch.zeros(shape[2], shape[0], shape[1]))
        in_channels = 2 * (2 * context + 1) + 1
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, padding=1), nn.SiLU())
        self.down = nn.ModuleList(_block(a, b, groups) for a, b in itertools.pairwise(channels))
        self.up = _block(channels[2] + channels[1], channels[1], groups)
        self.flow = nn.Conv2d(channels[1], 3, 3, padding=1)
        self.intensity = nn.Conv2d(channels[2], 2, 1)
        # Start from the identity: no displacement, gain 1, offset 0.
        for head in (self.flow, self.intensity):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def set_atlas(self, atlas: np.ndarray) -> None:
        """Atlas volume (X, Y, Z) in normalised intensity."""
        volume = torch.from_numpy(np.ascontiguousarray(np.moveaxis(atlas, 2, 0), dtype=np.float32))
        self.atlas.copy_(volume.to(self.atlas.device))

    def _atlas_slices(self, z: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(-self.context, self.context + 1, device=z.device)
        index = (z[:, None] + offsets[None, :]).clamp(0, self.atlas.shape[0] - 1)
        return self.atlas[index]

    def fields(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Displacement (N, 3, X, Y) in voxels, gain and offset (N, 1, X, Y) for slices ``x`` at ``z``."""
        n_z = self.atlas.shape[0]
        height = (z.float() / max(1, n_z - 1))[:, None, None, None].expand(-1, 1, *x.shape[-2:])
        inputs = F.avg_pool2d(torch.cat([x, self._atlas_slices(z), height], dim=1), 2)
        features = [self.stem(inputs)]
        for block in self.down:
            features.append(block(F.avg_pool2d(features[-1], 2)))
        deep = features[2]
        quarter = self.up(
            torch.cat([F.interpolate(deep, size=features[1].shape[-2:]), features[1]], dim=1)
        )
        size = x.shape[-2:]
        flow = torch.tanh(self.flow(quarter)) * self.max_flow[None, :, None, None]
        flow = F.interpolate(flow, size=size, mode="bilinear", align_corners=False)
        intensity = F.avg_pool2d(self.intensity(deep), 2)
        intensity = F.interpolate(intensity, size=size, mode="bilinear", align_corners=False)
        gain = torch.exp(self.max_gain * torch.tanh(intensity[:, 0:1]))
        offset = self.max_offset * torch.tanh(intensity[:, 1:2])
        return flow, gain, offset

    def forward(self, x: torch.Tensor, z: torch.Tensor, *, with_flow: bool = False):
        """Reconstruction (N, 1, X, Y) of subject slices ``x`` at slice indices ``z`` (N,).

        With ``with_flow`` also returns the displacement (N, 3, X, Y) in voxels.
        """
        flow, gain, offset = self.fields(x, z)
        out = gain * self._sample(flow, z) + offset
        return (out, flow) if with_flow else out

    def reconstruct_volumes(self, volumes: torch.Tensor, *, slices: int) -> torch.Tensor:
        """Normal-anatomy reconstructions (B, X, Y, Z), float32, of cropped volumes
        (B, X, Y, Z) on the model's device, ``slices`` axial slices (of any of the
        volumes) per forward pass."""
        self.eval()
        batch, size_x, size_y, size_z = volumes.shape
        context = self.context
        heights = torch.arange(size_z, device=volumes.device)
        offsets = torch.arange(-context, context + 1, device=volumes.device)
        index = (heights[:, None] + offsets[None, :]).clamp(0, size_z - 1)
        with torch.inference_mode():
            # (B, Z, 2 * context + 1, X, Y): each slice with its neighbours, edge slices repeated.
            stacks = volumes.float().permute(0, 3, 1, 2)[:, index]
            inputs = stacks.reshape(batch * size_z, 2 * context + 1, size_x, size_y)
            z = heights.repeat(batch)
            out = torch.empty(batch * size_z, size_x, size_y, device=volumes.device)
            for start in range(0, batch * size_z, slices):
                stop = min(batch * size_z, start + slices)
                out[start:stop] = self(inputs[start:stop].contiguous(), z[start:stop])[:, 0].float()
            return out.reshape(batch, size_z, size_x, size_y).permute(0, 2, 3, 1).contiguous()

    def _sample(self, flow: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Atlas at (x + u_x, y + u_y, z + u_z) for every pixel, trilinear, (N, 1, X, Y)."""
        n, _, size_x, size_y = flow.shape
        n_z = self.atlas.shape[0]
        gx = torch.arange(size_x, device=flow.device, dtype=flow.dtype)[None, :, None]
        gy = torch.arange(size_y, device=flow.device, dtype=flow.dtype)[None, None, :]
        px = gx + flow[:, 0]
        py = gy + flow[:, 1]
        pz = z.to(flow.dtype)[:, None, None] + flow[:, 2]
        # grid_sample wants (W, H, D) = (y, x, z) in [-1, 1] with align_corners=True.
        grid = torch.stack(
            [
                2 * py / max(1, size_y - 1) - 1,
                2 * px / max(1, size_x - 1) - 1,
                2 * pz / max(1, n_z - 1) - 1,
            ],
            dim=-1,
        )[:, None]
        volume = self.atlas[None, None].expand(n, 1, -1, -1, -1)
        sampled = F.grid_sample(
            volume, grid, mode="bilinear", padding_mode="border", align_corners=True
        )
        return sampled[:, :, 0]


def build_network(architecture: dict[str, Any], *, shape: tuple[int, int, int]) -> AtlasWarpNet:
    """The ``atlas_warp`` network described by ``architecture`` for crops of ``shape``
    (X, Y, Z); every method's network: :func:`mriaudit.model.methods.build_network`."""
    if architecture.get("name") != "atlas_warp":
        message = f"unknown network {architecture.get('name')!r} in the checkpoint"
        raise ValueError(message)
    return AtlasWarpNet(
        channels=list(architecture["channels"]),
        context=int(architecture["context"]),
        shape=tuple(int(s) for s in shape),
        max_flow=[float(v) for v in architecture["max_flow"]],
        max_gain=float(architecture["max_gain"]),
        max_offset=float(architecture["max_offset"]),
        groups=int(architecture.get("groups", 4)),
    )
