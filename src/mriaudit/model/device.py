"""Torch device, threads and seeds for the model rules."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

log = logging.getLogger(__name__)

DEVICE_NAMES = ("auto", "cpu", "cuda")
PRECISION_NAMES = ("auto", "fp32", "bf16")


def resolve_device(name: str, *, threads: int | None = None) -> torch.device:
    """The torch device for a config value ``auto``, ``cpu`` or ``cuda``.

    ``auto`` picks CUDA when ``torch.cuda.is_available()`` and the CPU otherwise.
    ``cuda`` without a usable GPU falls back to the CPU with a warning, so a job
    scheduled on a node without a GPU still finishes (the sidecar records the
    device actually used). On the CPU, ``threads`` (when given) sets
    ``torch.set_num_threads`` so a rule uses the cores Snakemake gave it.
    """
    if name not in DEVICE_NAMES:
        message = f"device must be one of {DEVICE_NAMES}, got {name!r}"
        raise ValueError(message)
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda":
        log.warning("device cuda requested but torch.cuda.is_available() is False: using the CPU")
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    return torch.device("cpu")


def resolve_precision(name: str, device: torch.device) -> str:
    """The training arithmetic, ``fp32`` or ``bf16``, for a config value ``auto``, ``fp32`` or ``bf16``.

    ``auto`` is ``bf16`` (bfloat16 autocast of the network, float32 loss and
    weights) on a CUDA device that supports it, where it halves the memory
    traffic of the convolutions, and ``fp32`` on the CPU, which keeps the
    results of the CPU runs. ``bf16`` is honoured on the CPU too.
    """
    if name not in PRECISION_NAMES:
        message = f"precision must be one of {PRECISION_NAMES}, got {name!r}"
        raise ValueError(message)
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy's legacy generator and torch (CPU and CUDA), and ask
    torch for deterministic kernels.

    ``warn_only`` keeps the few CUDA kernels without a deterministic version
    (e.g. some upsampling backward passes) usable instead of raising.
    """
    # cuBLAS needs this before its first use to be deterministic.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
