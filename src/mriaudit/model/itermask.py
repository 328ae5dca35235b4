"""The ``itermask3d`` method's network: masked inpainting with iterative mask shrinking.

After Liang et al. (IterMask3D): a network learns to inpaint a normal brain
under a spatial mask from the unmasked context and a high-frequency copy of
the whole image, and at test time the mask shrinks, iteration by iteration,
onto the voxels it cannot inpaint: the anomaly.

Network. The cropped, normalised, brain-masked volume (X, Y, Z; 80 x 96 x 78
at 2 mm) is zero-padded to a multiple of 8 and average-pooled to 4 mm, the
working grid (as ``ae3d``: the price of two CPU cores). Three input channels:
the volume with the masked voxels set to zero, the mask (1 = inpaint here),
and the Fourier high-pass of the whole volume (:func:`high_pass`: edges
without the intensities, so the intensity under the mask must come from the
context). A small 3D U-Net (3^3 stem of 16 channels at 4 mm, stride-2 levels
of 32 and 64 channels at 8 and 16 mm, transposed convolutions back up with
skip connections) outputs the departure from the fold's mean training volume
(a buffer, as ``ae3d``; the last layer starts at zero). The template brain
mask is a buffer too: inference starts from it. Shapes on the working grid:
(N, 1, x, y, z), normalised intensity.

Inference (:meth:`IterMaskNet.iterate`). The mask starts as the whole brain;
each iteration inpaints under the current mask, takes the absolute error
between inpainting and image on the masked voxels, averaged over the masked
voxels of a 3^3 window (12 mm, ``error_smoothing``: on the unit tests'
cohort it took the lesion's score from 1.5 to 10 times the highest normal's,
measured, as lone poorly inpainted voxels of normal tissue leave the mask),
and keeps masked only the
voxels whose error exceeds the subject's threshold: the
``threshold_percentile``-th percentile of that subject's own error inside
the brain at the first iteration (whole brain masked, edges only). A
percentile rather than mean + k SD: the error distribution is skewed and a
lesion's tail would inflate the SD. Fixed after the first iteration rather
than re-taken on the shrinking mask: a percentile of the remaining voxels
would drop a fixed share of them at every iteration and never stop, while a
fixed bar lets normal tissue leave the mask as its context returns (its
error falls) and an anomaly stay (its intensity cannot be inpainted from
normal context). It adapts to the subject's noise, contrast and fit. The
loop stops after ``iterations`` updates or when no subject's mask changes;
the reconstruction is the inpainting under the final mask, upsampled to 2 mm,
there, and the image itself elsewhere: normal tissue (outside the final
mask) gets a zero residual and the anomaly (inside) the full difference
between itself and the normal tissue inpainted in its place. The network's
output outside its mask is never trained, so it is not used.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mriaudit.model.ae3d import conv_layer, pad_widths

DEFAULT_ARCHITECTURE: dict[str, Any] = {
    "name": "itermask3d",
    # The 2 mm volume is average-pooled by this factor: the network works at 4 mm.
    "pool": 2,
    # U-Net feature channels at 1, 1/2 and 1/4 of the working grid (4, 8 and 16 mm).
    "channels": [16, 32, 64],
    "groups": 4,
    # High-pass radius in cycles per working-grid voxel (Nyquist 0.5): at 4 mm, every
    # wavelength above 16 mm is removed, a tissue's intensity and a 1-2 cm lesion's
    # bulk with it; sulci, ventricle and lesion edges stay.
    "highpass_radius": 0.25,
    # Training masks: smooth random blobs, thresholded noise on a grid of one of these
    # many working voxels per cell (8, 16, 32 mm), covering a fraction of the volume
    # drawn in this range; this share of the masks covers the whole brain (as the
    # first inference iteration does).
    "mask_scales": [2, 4, 8],
    "mask_fraction": [0.1, 1.0],
    "full_mask_probability": 0.25,
    # Inference: at most this many mask updates, and the subject's threshold, a
    # percentile of its first-iteration error inside the brain.
    "iterations": 6,
    "threshold_percentile": 95.0,
    # The error is averaged over the masked voxels of this many working voxels' cube
    # (12 mm) before the threshold: a lone voxel of normal tissue the network
    # inpaints poorly leaves the mask, a contiguous anomaly stays.
    "error_smoothing": 3,
    # Training (whole volumes, as ae3d): volumes per step, passes per epoch.
    "volumes_per_batch": 2,
    "passes_per_epoch": 1,
}


def high_pass(volumes: torch.Tensor, *, radius: float) -> torch.Tensor:
    """Fourier high-pass (N, X, Y, Z), float32, of ``volumes`` (N, X, Y, Z).

    ``torch.fft.rfftn`` over the three spatial axes, every frequency whose
    norm is below ``radius`` (cycles per voxel; 0.5 is Nyquist on each axis)
    set to zero, the constant term included, and the inverse transform: a
    constant or slowly varying image gives zero, an edge stays.
    """
    size = volumes.shape[-3:]
    with torch.autocast(volumes.device.type, enabled=False):
        spectrum = torch.fft.rfftn(volumes.float(), dim=(-3, -2, -1))
        fx = torch.fft.fftfreq(size[0], device=volumes.device)
        fy = torch.fft.fftfreq(size[1], device=volumes.device)
        fz = torch.fft.rfftfreq(size[2], device=volumes.device)
        norm = (fx[:, None, None] ** 2 + fy[None, :, None] ** 2 + fz[None, None, :] ** 2).sqrt()
        spectrum = spectrum * (norm >= radius)
        return torch.fft.irfftn(spectrum, s=tuple(size), dim=(-3, -2, -1))


class IterMaskNet(nn.Module):
    """Inpainting U-Net on the working grid and the iterative mask shrinking.

    Inputs of :meth:`forward` are on the working grid (:meth:`to_working`):
    image and mask (N, 1, x, y, z). Buffers ``mean`` and ``brain`` (X, Y, Z,
    the 2 mm crop) are the fold's mean training volume and the template brain
    mask, saved in the state dict.
    """

    def __init__(
        self,
        *,
        channels: list[int],
        shape: tuple[int, int, int],
        pool: int = 2,
        groups: int = 4,
        highpass_radius: float = 0.25,
        iterations: int = 6,
        threshold_percentile: float = 95.0,
        error_smoothing: int = 3,
    ) -> None:
        super().__init__()
        if len(channels) < 2 or pool < 1 or not 0 < threshold_percentile < 100:
            message = (
                f"channels needs at least two levels, pool >= 1 and threshold_percentile in "
                f"(0, 100), got {channels}, {pool}, {threshold_percentile}"
            )
            raise ValueError(message)
        self.pool, self.radius = pool, highpass_radius
        self.iterations, self.percentile = iterations, threshold_percentile
        self.smoothing = error_smoothing
        self.multiple = pool * 2 ** (len(channels) - 1)
        self.stem = nn.Sequential(*conv_layer(3, channels[0], groups, kernel=3))
        self.down = nn.ModuleList(
            nn.Sequential(
                *conv_layer(low, high, groups, kernel=2), *conv_layer(high, high, groups, kernel=3)
            )
            for low, high in itertools.pairwise(channels)
        )
        self.up = nn.ModuleList(
            nn.Sequential(*conv_layer(high, low, groups, kernel=2, transposed=True))
            for low, high in itertools.pairwise(channels)
        )
        self.merge = nn.ModuleList(
            nn.Sequential(*conv_layer(2 * low, low, groups, kernel=3)) for low in channels[:-1]
        )
        self.head = nn.Conv3d(channels[0], 1, 3, padding=1)
        # Start from the mean volume: the network learns the subject's departures from it.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("brain", torch.ones(shape))

    def set_mean(self, mean: torch.Tensor) -> None:
        """The fold's mean training volume (X, Y, Z), normalised intensity."""
        self.mean.copy_(mean.to(self.mean.device, torch.float32))

    def set_brain(self, brain: torch.Tensor) -> None:
        """The template brain mask on the crop (X, Y, Z), 0/1: where inference starts."""
        self.brain.copy_(brain.to(self.brain.device, torch.float32))

    def to_working(self, volumes: torch.Tensor) -> torch.Tensor:
        """Volumes (N, X, Y, Z) on the 2 mm crop to (N, 1, x, y, z) on the working grid,
        float32: zero-padded to the multiple, average-pooled by ``pool``."""
        padded = F.pad(
            volumes.float()[:, None], pad_widths(tuple(volumes.shape[-3:]), multiple=self.multiple)
        )
        return F.avg_pool3d(padded, self.pool) if self.pool > 1 else padded

    def to_crop(self, working: torch.Tensor, *, mode: str) -> torch.Tensor:
        """(N, 1, x, y, z) on the working grid back to (N, X, Y, Z) on the crop
        (``mode`` ``trilinear`` for intensities, ``nearest`` for masks)."""
        size = tuple(self.mean.shape)
        pad = pad_widths(size, multiple=self.multiple)
        padded = [s + pad[2 * (2 - i)] + pad[2 * (2 - i) + 1] for i, s in enumerate(size)]
        if self.pool > 1:
            extra = {"align_corners": False} if mode == "trilinear" else {}
            working = F.interpolate(working.float(), size=padded, mode=mode, **extra)
        (z0, _, y0, _, x0, _) = pad
        return working[:, 0, x0 : x0 + size[0], y0 : y0 + size[1], z0 : z0 + size[2]]

    def working_brain(self) -> torch.Tensor:
        """The brain mask on the working grid (1, 1, x, y, z), bool: over half a 4 mm voxel."""
        return self.to_working(self.brain[None]) > 0.5

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Inpainting (N, 1, x, y, z) of ``image`` (N, 1, x, y, z) under ``mask`` (same
        shape, 1 = hidden), from the visible voxels and the image's high-pass."""
        detail = high_pass(image[:, 0], radius=self.radius)[:, None]
        h = self.stem(torch.cat([image * (1 - mask), mask, detail], dim=1))
        skips = []
        for level in self.down:
            skips.append(h)
            h = level(h)
        for up, merge, skip in zip(self.up[::-1], self.merge[::-1], skips[::-1], strict=True):
            h = merge(torch.cat([up(h), skip], dim=1))
        mean = self.to_working(self.mean[None])
        return mean + self.head(h).float()

    def _error(self, recon: torch.Tensor, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Absolute inpainting error (N, 1, x, y, z) on the masked voxels, averaged over
        the masked voxels of a ``smoothing``^3 window (1: none); zero elsewhere."""
        weight = mask.float()
        error = (recon - image).abs() * weight
        if self.smoothing > 1:
            width = self.smoothing
            box = {"kernel_size": width, "stride": 1, "padding": width // 2}
            error = F.avg_pool3d(error, **box) / F.avg_pool3d(weight, **box).clamp_min(1e-6)
        return error * weight

    def iterate(self, volumes: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The reconstructions (B, X, Y, Z), float32, of volumes (B, X, Y, Z) on the
        model's device, and the masks of every iteration (B, x, y, z), bool, on the
        working grid, the whole brain first (see the module's docstring)."""
        image = self.to_working(volumes)
        brain = self.working_brain().expand_as(image)
        mask = brain.clone()
        masks = [mask[:, 0]]
        recon = self(image, mask.float())
        error = self._error(recon, image, mask)
        inside = error[brain].reshape(image.shape[0], -1)
        threshold = torch.quantile(inside, self.percentile / 100.0, dim=1)
        threshold = threshold[:, None, None, None, None]
        for _ in range(self.iterations):
            shrunk = mask & (error > threshold)
            if torch.equal(shrunk, mask):  # one read-back per iteration
                break
            mask = shrunk
            masks.append(mask[:, 0])
            recon = self(image, mask.float())
            error = self._error(recon, image, mask)
        hidden = self.to_crop(mask.float(), mode="nearest") > 0.5
        out = torch.where(hidden, self.to_crop(recon, mode="trilinear"), volumes.float())
        return out, masks

    def reconstruct_volumes(self, volumes: torch.Tensor, *, slices: int) -> torch.Tensor:
        """Reconstructions (B, X, Y, Z), float32, of cropped volumes (B, X, Y, Z) on the
        model's device (:meth:`iterate`), as many whole volumes at a time as ``slices``
        axial slices make (at least one)."""
        self.eval()
        per_pass = max(1, slices // volumes.shape[-1])
        with torch.inference_mode():
            out = torch.empty(volumes.shape, device=volumes.device)
            for start in range(0, volumes.shape[0], per_pass):
                out[start : start + per_pass] = self.iterate(volumes[start : start + per_pass])[0]
            return out


def build_itermask(architecture: dict[str, Any], *, shape: tuple[int, int, int]) -> IterMaskNet:
    """The ``itermask3d`` network of ``architecture`` for crops of ``shape`` (X, Y, Z)."""
    return IterMaskNet(
        channels=[int(c) for c in architecture["channels"]],
        shape=tuple(int(v) for v in shape),
        pool=int(architecture.get("pool", 2)),
        groups=int(architecture.get("groups", 4)),
        highpass_radius=float(architecture["highpass_radius"]),
        iterations=int(architecture["iterations"]),
        threshold_percentile=float(architecture["threshold_percentile"]),
        error_smoothing=int(architecture.get("error_smoothing", 1)),
    )
