"""The normative model's methods (config ``model.method``): which network reconstructs.

A method is a network that turns a subject's cropped, normalised volume
(X, Y, Z) into its normal-anatomy reconstruction (X, Y, Z), through one entry
point, ``reconstruct_volumes`` (:class:`ReconstructionNet`), and a way to
train it on one fold (``mriaudit.model.train.TRAINERS``). Everything after the
reconstruction is shared by every method: the raw map, the calibration
against out-of-fold reference subjects, the calibrated map, the subject
summaries (:mod:`mriaudit.model.maps`), the score table, the report and the
exclusions. The checkpoint records its method (``method``, and the
architecture's ``name``); a checkpoint of one method is never used as another
(:func:`method_problem`).

- ``atlas_warp`` (:mod:`mriaudit.model.network`): a 2.5D slice encoder that
  warps the fold's atlas; the output can only be moved, rescaled anatomy.
- ``ae3d`` (:mod:`mriaudit.model.ae3d`): a 3D convolutional autoencoder of
  whole volumes with a narrow bottleneck (after Luo et al.).
- ``itermask3d`` (:mod:`mriaudit.model.itermask`): a 3D inpainting network
  conditioned on a Fourier high-pass of the image, whose mask shrinks onto
  what it cannot inpaint (after Liang et al., IterMask3D).
- ``token_surprisal`` (:mod:`mriaudit.model.tokens`): axial slices as VQ
  tokens and a causal prior over them; its raw terms are its own (the residual
  against the healed decoding weighted by the token surprisal, and the
  structural difference to that decoding) through
  ``raw_terms``, which a network may offer instead of the shared residual terms
  of its reconstruction (:func:`mriaudit.model.scorer.raw_terms`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from mriaudit.cohort import DEFAULT_MODEL_METHOD
from mriaudit.model import ae3d, itermask, network, tokens

#: The default method (the config schema's); changed only after the benchmark of all
#: methods (issue 24).
DEFAULT_METHOD = DEFAULT_MODEL_METHOD

_BUILDERS: dict[str, Callable[..., Any]] = {
    "atlas_warp": network.build_network,
    "ae3d": ae3d.build_ae3d,
    "itermask3d": itermask.build_itermask,
    "token_surprisal": tokens.build_tokens,
}
_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "atlas_warp": network.DEFAULT_ARCHITECTURE,
    "ae3d": ae3d.DEFAULT_ARCHITECTURE,
    "itermask3d": itermask.DEFAULT_ARCHITECTURE,
    "token_surprisal": tokens.DEFAULT_ARCHITECTURE,
}
#: The method names, in the order of the config schema's enum.
METHODS = tuple(_BUILDERS)


class ReconstructionNet(Protocol):
    """What every method's network offers scoring and calibration (a torch module)."""

    def reconstruct_volumes(self, volumes: torch.Tensor, *, slices: int) -> torch.Tensor:
        """Reconstructions (B, X, Y, Z), float32, of volumes (B, X, Y, Z) on its device."""
        ...

    def to(self, device: torch.device) -> ReconstructionNet: ...

    def eval(self) -> ReconstructionNet: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> Any: ...


def fold_diagnostics(state: Mapping[str, Any]) -> dict[str, Any]:
    """What a fold's state dict measured of itself, for the sidecar: the codebook
    usage of a ``token_surprisal`` model (:func:`tokens.codebook_usage`); empty for
    the methods that measure nothing."""
    if "code_counts" in state:
        return {"codebook": tokens.codebook_usage(state["code_counts"])}
    return {}


def check_method(name: str) -> str:
    """``name`` if it is a method; ``ValueError`` naming the known ones otherwise."""
    if name not in _BUILDERS:
        message = f"unknown model method {name!r}; known methods: {', '.join(METHODS)}"
        raise ValueError(message)
    return name


def default_architecture(method: str) -> dict[str, Any]:
    """A copy of the default architecture of ``method`` (its ``name`` is the method)."""
    return dict(_ARCHITECTURES[check_method(method)])


def build_network(architecture: Mapping[str, Any], *, shape: tuple[int, int, int]) -> Any:
    """The network of ``architecture`` (its ``name`` picks the method) for crops of
    ``shape`` (X, Y, Z); an unknown name raises ``ValueError``."""
    name = architecture.get("name")
    if name not in _BUILDERS:
        message = f"unknown network {name!r} in the checkpoint; known methods: {', '.join(METHODS)}"
        raise ValueError(message)
    return _BUILDERS[name](dict(architecture), shape=shape)


def checkpoint_method(state: Mapping[str, Any]) -> str:
    """The method a checkpoint dict was trained with: its ``method``, else its
    architecture's ``name``; checkpoints from before the methods are ``atlas_warp``."""
    method = state.get("method") or (state.get("architecture") or {}).get("name")
    return str(method or "atlas_warp")


def method_problem(state: Mapping[str, Any], expected: str | None, *, source: str) -> str:
    """Why checkpoint ``state`` (from ``source``, a path in words) must not be used as
    method ``expected``: empty when it may (or when ``expected`` is None, no demand)."""
    if expected is None:
        return ""
    found = checkpoint_method(state)
    if found == expected:
        return ""
    return (
        f"the checkpoint {source} was trained with model.method {found!r}, but the config "
        f"asks for {expected!r}: train again (model.checkpoint: train) or set "
        f"model.method: {found}"
    )
