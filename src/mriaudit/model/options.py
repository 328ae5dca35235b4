"""The normative model's training settings beyond the config keys (``TrainOptions``),
each with its reason; stored in the checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mriaudit.model.network import DEFAULT_ARCHITECTURE
from mriaudit.model.score import DEFAULT_SCORING


@dataclass(frozen=True)
class TrainOptions:
    """Training settings beyond the config keys (stored in the checkpoint)."""

    #: Random axial slices drawn per training subject and epoch (all when larger).
    slices_per_subject: int = 32
    #: Probability that a training slice gets coarse noise, and its standard
    #: deviation (normalised intensity), drawn in [0, max].
    noise_probability: float = 0.5
    noise_std: float = 0.25
    #: Coarse noise grid: the slice is divided by one of these factors, then upsampled.
    noise_scales: tuple[int, ...] = (4, 8, 16)
    #: Probability that a slice gets 1-2 elliptical patches of random uniform
    #: intensity, and their radii in voxels: the network learns to repaint anatomy.
    patch_probability: float = 0.5
    patch_radius: tuple[float, float] = (2.0, 10.0)
    #: Fine Gaussian noise added to the input, standard deviation drawn in [0, max].
    fine_noise_std: float = 0.03
    #: Intensity jitter: gamma in [1 - g, 1 + g] and scale in [1 - s, 1 + s].
    gamma_jitter: float = 0.15
    scale_jitter: float = 0.1
    #: Integer shift of the subject slices against the atlas in x and y, voxels
    #: (residual misregistration).
    max_shift: int = 2
    #: Weight of the displacement smoothness penalty (mean squared gradient, voxels/voxel).
    smoothness: float = 0.1
    #: Extra L1 terms on 2x and 4x downsampled slices: their wider basin lets the
    #: displacement learn faster than full-resolution edges alone allow.
    coarse_loss: float = 1.0
    #: Fraction of the highest-loss brain pixels of each batch left out of the loss.
    trim: float = 0.01
    #: Linear warm-up, as a fraction of all steps, before the cosine decay.
    warmup: float = 0.1
    #: Times the atlas is rebuilt during training from the training subjects
    #: brought into atlas space by the current model (sharper than a plain median).
    atlas_updates: int = 1
    #: Reference subjects per fold whose out-of-fold maps calibrate the others.
    calibration_subjects: int = 32
    architecture: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_ARCHITECTURE))
    scoring: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SCORING))
