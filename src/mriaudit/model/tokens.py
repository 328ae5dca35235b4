"""The ``token_surprisal`` method's network: slices as discrete tokens, and a prior over them.

After "Catching MRI outliers" (slices compressed into tokens by a VQ
autoencoder, a model of the normal token distribution, anomaly evidence from
the tokens' negative log-likelihood with a perceptual image difference).

- **Tokens.** Each axial slice (X, Y) of the 2 mm crop is encoded by a 2D
  convolutional encoder (two stride-2 levels) into a grid of vectors, one per
  8 mm square (20 x 24 for the 80 x 96 crop), and each vector is replaced by
  the nearest of ``codes`` codebook vectors: the slice becomes 480 integers.
  The codebook learns by exponential moving averages (the VQ-VAE-2 rule) and a
  code no training batch has used for a while restarts at an encoder output
  of the batch, so the codebook does not collapse onto a few codes; its usage
  on the fold's training slices (codes used, perplexity) is measured after
  training (:func:`codebook_usage`). A decoder maps tokens back to the slice,
  added to the fold's mean slice at that height.
- **The prior.** A small causal transformer predicts each token from the
  tokens before it and the slice's height, in two orders that share its
  weights, raster and reversed (each with its own position embeddings): every
  token is predicted once from what lies above it and once from what lies
  below. A token's surprisal is its negative log-likelihood (nats), the mean of
  the two orders'.
- **Evidence** (:meth:`TokenSurprisal.raw_terms`, the two raw terms every method
  gives :mod:`mriaudit.model.maps`): the image is compared with its *healed*
  decoding, in which every token more surprising than the fold's
  ``heal_quantile`` of its training tokens is replaced by the prior's most
  likely token there (the lesion is "healed" away, a normal slice decodes as
  itself). The intensity residual against it is weighted by the token
  surprisal, upsampled bilinearly from the token grid to the slice's voxels,
  averaged over ``surprisal_slices`` neighbouring slices and expressed in
  units of the healing threshold (so a residual counts where the prior found
  the tokens unlikely, as in Pinaya et al.'s healed-residual masks); the
  second term is ``1 - SSIM`` against the healed decoding. The surprisal alone
  is too noisy a map: calibrated voxel by voxel on the unit-test cohort, its
  plain value reached robust z 8 somewhere in every normal brain and scored a
  10 mm lesion 7.0 against normals up to 9.3, and its excess over the
  threshold, zero almost everywhere, spiked on single quantisation flips
  (z > 100 in normal cerebella) while missing the lesion; the weighted
  residual scored it 296 against normals up to 11.7, peaking 6 mm from its
  centre. SSIM stands in for the paper's learned perceptual distance, whose
  pretrained weights would have to be downloaded.

Shapes: volumes (B, X, Y, Z), normalised intensity; slices (N, 1, X, Y); token
grids (N, h, w) with h = X/4, w = Y/4 after padding to a multiple of 4.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mriaudit.model import maps
from mriaudit.model.ae3d import pad_widths

DEFAULT_ARCHITECTURE: dict[str, Any] = {
    "name": "token_surprisal",
    # Encoder and decoder channels at the slice's grid (2 mm), 4 mm and 8 mm.
    "channels": [32, 64, 64],
    # Codebook: codes and the dimension of a code vector.
    "codes": 128,
    "code_dim": 32,
    # Codebook learning: EMA decay, commitment weight, and the expected share of a
    # batch's tokens under which a code counts as dead and restarts.
    "ema_decay": 0.95,
    "commitment": 0.25,
    "restart_share": 0.02,
    # The prior: transformer width, layers, heads.
    "prior_width": 64,
    "prior_layers": 2,
    "prior_heads": 4,
    # Epochs of the prior per epoch of the autoencoder.
    "prior_epoch_factor": 1,
    # Tokens more surprising than this quantile of the fold's training tokens are
    # healed (replaced by the prior's most likely token) before decoding.
    "heal_quantile": 0.98,
    # The surprisal map is averaged over this many neighbouring slices (2 mm each)
    # before the threshold: the prior reads each slice alone, and a lone surprising
    # token in one slice is noise, an anomaly spans several.
    "surprisal_slices": 3,
}

#: Downsampling of the token grid against the slice (two stride-2 levels).
STRIDE = 4


def _block(channels_in: int, channels_out: int, *, stride: int = 1, up: bool = False) -> nn.Module:
    """3x3 convolution (stride 2 halves the grid; ``up`` doubles it), group norm, SiLU."""
    if up:
        conv: nn.Module = nn.ConvTranspose2d(channels_in, channels_out, 4, stride=2, padding=1)
    else:
        conv = nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1)
    return nn.Sequential(conv, nn.GroupNorm(min(8, channels_out), channels_out), nn.SiLU())


def codebook_usage(counts: torch.Tensor) -> dict[str, float]:
    """Usage of a codebook from its token ``counts`` (K,): codes used (count > 0), their
    share of the codebook, and the perplexity exp(entropy) of the code distribution
    (K when every code is equally used, 1 when one code takes every token)."""
    counts = counts.double().clamp_min(0)
    total = float(counts.sum())
    if total <= 0:
        return {"codes": counts.numel(), "codes_used": 0, "share_used": 0.0, "perplexity": 0.0}
    p = counts / total
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    used = int((counts > 0).sum())
    return {
        "codes": counts.numel(),
        "codes_used": used,
        "share_used": round(used / counts.numel(), 4),
        "perplexity": round(math.exp(entropy), 3),
    }


class TokenSurprisal(nn.Module):
    """VQ autoencoder of axial slices, a causal token prior, and their anomaly terms.

    Buffers saved in the state dict: the codebook and its EMA statistics, the
    fold's mean training volume ``mean`` (X, Y, Z), ``code_counts`` (K,, the
    training tokens per code) and ``heal_nll`` (nats, the healing threshold).
    """

    def __init__(
        self,
        *,
        channels: list[int],
        shape: tuple[int, int, int],
        codes: int = 128,
        code_dim: int = 32,
        ema_decay: float = 0.95,
        commitment: float = 0.25,
        restart_share: float = 0.02,
        prior_width: int = 64,
        prior_layers: int = 2,
        prior_heads: int = 4,
        heal_quantile: float = 0.98,
        surprisal_slices: int = 1,
    ) -> None:
        super().__init__()
        if len(channels) != 3 or codes < 2 or not 0 < heal_quantile < 1:
            message = (
                f"channels needs three levels, codes at least 2 and heal_quantile in (0, 1), "
                f"got {channels}, {codes}, {heal_quantile}"
            )
            raise ValueError(message)
        c0, c1, c2 = channels
        self.decay, self.commitment, self.restart_share = ema_decay, commitment, restart_share
        self.heal_quantile, self.surprisal_slices = heal_quantile, surprisal_slices
        self.encoder = nn.Sequential(
            _block(1, c0),
            _block(c0, c1, stride=2),
            _block(c1, c2, stride=2),
            _block(c2, c2),
            nn.Conv2d(c2, code_dim, 1),
        )
        self.decoder = nn.Sequential(
            _block(code_dim, c2),
            _block(c2, c1, up=True),
            _block(c1, c0, up=True),
            nn.Conv2d(c0, 1, 3, padding=1),
        )
        # Start from the mean slice: the decoder learns the departures from it.
        nn.init.zeros_(self.decoder[-1].weight)
        nn.init.zeros_(self.decoder[-1].bias)
        # The token grid (h, w): the slice padded to a multiple of the stride, divided.
        self.grid = tuple(-(-size // STRIDE) for size in shape[:2])
        length = self.grid[0] * self.grid[1]
        self.register_buffer("codebook", torch.randn(codes, code_dim) * 0.1)
        self.register_buffer("ema_count", torch.ones(codes))
        self.register_buffer("ema_sum", self.codebook.clone())
        self.register_buffer("code_counts", torch.zeros(codes))
        self.register_buffer("heal_nll", torch.tensor(float("inf")))
        self.register_buffer("mean", torch.zeros(shape))
        # The prior: token embeddings (one more for the start token), a position table
        # per order, the slice's height.
        self.token_embedding = nn.Embedding(codes + 1, prior_width)
        self.position = nn.Parameter(torch.randn(2, length, prior_width) * 0.02)
        self.height = nn.Embedding(shape[2], prior_width)
        layer = nn.TransformerEncoderLayer(
            prior_width,
            prior_heads,
            dim_feedforward=2 * prior_width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.prior = nn.TransformerEncoder(layer, prior_layers, enable_nested_tensor=False)
        self.prior_out = nn.Sequential(nn.LayerNorm(prior_width), nn.Linear(prior_width, codes))
        self.register_buffer(
            "causal", torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
        )

    @property
    def codes(self) -> int:
        return self.codebook.shape[0]

    def set_mean(self, mean: torch.Tensor) -> None:
        """The fold's mean training volume (X, Y, Z), normalised intensity."""
        self.mean.copy_(mean.to(self.mean.device, torch.float32))

    def vq_parameters(self) -> list[nn.Parameter]:
        """The autoencoder's weights (the codebook is a buffer, learnt by EMA)."""
        return [*self.encoder.parameters(), *self.decoder.parameters()]

    def prior_parameters(self) -> list[nn.Parameter]:
        """The prior's weights."""
        prior = [self.token_embedding, self.height, self.prior, self.prior_out]
        return [self.position, *(p for module in prior for p in module.parameters())]

    # --- tokens ---------------------------------------------------------------------

    def _pad(self, slices: torch.Tensor) -> torch.Tensor:
        return F.pad(slices, pad_widths(tuple(slices.shape[-2:]), multiple=STRIDE))

    def encode(self, slices: torch.Tensor) -> torch.Tensor:
        """Encoder outputs (N, code_dim, h, w) of slices (N, 1, X, Y)."""
        return self.encoder(self._pad(slices.float()))

    def quantise(self, vectors: torch.Tensor) -> torch.Tensor:
        """Index (N, h, w), long, of the nearest code of each vector (N, code_dim, h, w)."""
        flat = vectors.float().permute(0, 2, 3, 1).reshape(-1, vectors.shape[1])
        distance = (
            flat.pow(2).sum(1, keepdim=True)
            - 2 * flat @ self.codebook.t()
            + self.codebook.pow(2).sum(1)[None]
        )
        return distance.argmin(1).reshape(vectors.shape[0], *vectors.shape[2:])

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """Code vectors (N, code_dim, h, w) of tokens (N, h, w)."""
        return self.codebook[tokens].permute(0, 3, 1, 2)

    def decode(
        self, vectors: torch.Tensor, heights: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        """Slices (N, 1, X, Y), float32, of code vectors (N, code_dim, h, w) at axial
        indices ``heights`` (N,), long; ``size`` is (X, Y) before padding."""
        out = self.decoder(vectors).float()
        pad = pad_widths(size, multiple=STRIDE)
        y0, x0 = pad[0], pad[2]
        out = out[:, :, x0 : x0 + size[0], y0 : y0 + size[1]]
        return out + self.mean[:, :, heights].permute(2, 0, 1)[:, None]

    def tokenise(self, slices: torch.Tensor) -> torch.Tensor:
        """Tokens (N, h, w) of slices (N, 1, X, Y)."""
        return self.quantise(self.encode(slices))

    @torch.no_grad()
    def update_codebook(
        self, vectors: torch.Tensor, tokens: torch.Tensor, *, generator: torch.Generator
    ) -> None:
        """One EMA step of the codebook towards the mean encoder output of each code's
        tokens (``vectors`` (N, code_dim, h, w), ``tokens`` (N, h, w)); codes whose
        EMA count falls under ``restart_share`` of a fair share of the batch restart
        at encoder outputs drawn from the batch. No value is read back to the host."""
        flat = vectors.float().permute(0, 2, 3, 1).reshape(-1, vectors.shape[1])
        onehot = F.one_hot(tokens.reshape(-1), self.codes).float()
        self.ema_count.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(onehot.t() @ flat, alpha=1 - self.decay)
        self.codebook.copy_(self.ema_sum / self.ema_count.clamp_min(1e-5)[:, None])
        dead = self.ema_count < self.restart_share * flat.shape[0] / self.codes
        pick = torch.randint(flat.shape[0], (self.codes,), generator=generator, device=flat.device)
        fresh = flat[pick]
        self.codebook.copy_(torch.where(dead[:, None], fresh, self.codebook))
        self.ema_sum.copy_(torch.where(dead[:, None], fresh, self.ema_sum))
        self.ema_count.copy_(torch.where(dead, torch.ones_like(self.ema_count), self.ema_count))

    # --- the prior ------------------------------------------------------------------

    def _order(self, order: int, length: int) -> torch.Tensor:
        index = torch.arange(length, device=self.codebook.device)
        return index if order == 0 else index.flip(0)

    def prior_logits(self, tokens: torch.Tensor, heights: torch.Tensor, order: int) -> torch.Tensor:
        """Logits (N, L, K) of each token of ``tokens`` (N, L; raster order) given the
        tokens before it in ``order`` (0 raster, 1 reversed), in raster positions."""
        n, length = tokens.shape
        permutation = self._order(order, length)
        sequence = tokens[:, permutation]
        start = torch.full((n, 1), self.codes, dtype=sequence.dtype, device=sequence.device)
        inputs = torch.cat([start, sequence[:, :-1]], dim=1)
        h = (
            self.token_embedding(inputs)
            + self.position[order][None]
            + self.height(heights)[:, None]
        )
        h = self.prior(h, mask=self.causal, is_causal=True)
        logits = self.prior_out(h).float()
        out = torch.empty_like(logits)
        out[:, permutation] = logits
        return out

    def prior_loss(self, tokens: torch.Tensor, heights: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (nats per token) of tokens (N, h, w) over both orders."""
        flat = tokens.reshape(tokens.shape[0], -1)
        losses = [
            F.cross_entropy(self.prior_logits(flat, heights, order).transpose(1, 2), flat)
            for order in (0, 1)
        ]
        return (losses[0] + losses[1]) / 2

    def surprisal(
        self, tokens: torch.Tensor, heights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Negative log-likelihood (N, h, w), nats, of each token (N, h, w), the mean of
        the two orders', and the most likely token (N, h, w) under their mean probability."""
        flat = tokens.reshape(tokens.shape[0], -1)
        nll = torch.zeros(flat.shape, device=flat.device)
        probability = torch.zeros((*flat.shape, self.codes), device=flat.device)
        for order in (0, 1):
            log_p = self.prior_logits(flat, heights, order).log_softmax(-1)
            nll -= log_p.gather(-1, flat[..., None])[..., 0] / 2
            probability += log_p.exp() / 2
        likely = probability.argmax(-1)
        return nll.reshape(tokens.shape), likely.reshape(tokens.shape)

    # --- evidence -------------------------------------------------------------------

    def analyse(self, volumes: torch.Tensor, *, slices: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Surprisal map (B, X, Y, Z), nats per token upsampled to voxels and averaged
        over ``surprisal_slices`` neighbouring slices, and healed decoding (B, X, Y,
        Z), float32, of volumes (B, X, Y, Z), ``slices`` axial slices per forward pass
        (at least one)."""
        self.eval()
        b, x, y, z = volumes.shape
        stack = volumes.float().permute(0, 3, 1, 2).reshape(b * z, 1, x, y)
        heights = torch.arange(z, device=volumes.device).repeat(b)
        nll_out = torch.empty((b * z, x, y), device=volumes.device)
        healed_out = torch.empty((b * z, x, y), device=volumes.device)
        per_pass = max(1, slices)
        with torch.inference_mode():
            for start in range(0, b * z, per_pass):
                chunk, at = stack[start : start + per_pass], heights[start : start + per_pass]
                tokens = self.tokenise(chunk)
                nll, likely = self.surprisal(tokens, at)
                healed = torch.where(nll > self.heal_nll, likely, tokens)
                healed_out[start : start + per_pass] = self.decode(self.lookup(healed), at, (x, y))[
                    :, 0
                ]
                padded = F.interpolate(
                    nll[:, None], scale_factor=STRIDE, mode="bilinear", align_corners=False
                )
                pad = pad_widths((x, y), multiple=STRIDE)
                nll_out[start : start + per_pass] = padded[
                    :, 0, pad[2] : pad[2] + x, pad[0] : pad[0] + y
                ]

        def volumes_of(out: torch.Tensor) -> torch.Tensor:
            return out.reshape(b, z, x, y).permute(0, 2, 3, 1).contiguous()

        surprisal = volumes_of(nll_out)
        if self.surprisal_slices > 1:
            width = self.surprisal_slices
            flat = surprisal.reshape(-1, 1, z)
            smooth = F.avg_pool1d(
                F.pad(flat, (width // 2, width // 2), mode="replicate"), width, stride=1
            )
            surprisal = smooth.reshape(surprisal.shape)
        return surprisal, volumes_of(healed_out)

    def raw_terms(
        self, volumes: torch.Tensor, *, scoring: dict[str, Any], slices: int
    ) -> torch.Tensor:
        """Uncalibrated anomaly terms (B, 2, X, Y, Z), float32, >= 0, of volumes
        (B, X, Y, Z): the tolerant intensity residual against the healed decoding
        (``scoring["tolerance"]``) weighted by the token surprisal in units of the
        healing threshold, and ``1 - SSIM`` against the healed decoding
        (``scoring["ssim_sigma"]``), clipped to [0, 2]. Until training sets the
        threshold the first term is zero."""
        surprisal, healed = self.analyse(volumes, slices=slices)
        terms = maps.raw_map(volumes.float(), healed, scoring=scoring)
        weight = surprisal / self.heal_nll
        return torch.stack([terms[:, 0] * weight, terms[:, 1]], dim=1)

    def reconstruct_volumes(self, volumes: torch.Tensor, *, slices: int) -> torch.Tensor:
        """Healed decodings (B, X, Y, Z), float32, of volumes (B, X, Y, Z) on the model's
        device (:meth:`analyse`)."""
        return self.analyse(volumes, slices=slices)[1]


def build_tokens(architecture: dict[str, Any], *, shape: tuple[int, int, int]) -> TokenSurprisal:
    """The ``token_surprisal`` network of ``architecture`` for crops of ``shape`` (X, Y, Z)."""
    return TokenSurprisal(
        channels=[int(c) for c in architecture["channels"]],
        shape=tuple(int(v) for v in shape),
        codes=int(architecture["codes"]),
        code_dim=int(architecture["code_dim"]),
        ema_decay=float(architecture["ema_decay"]),
        commitment=float(architecture["commitment"]),
        restart_share=float(architecture["restart_share"]),
        prior_width=int(architecture["prior_width"]),
        prior_layers=int(architecture["prior_layers"]),
        prior_heads=int(architecture["prior_heads"]),
        heal_quantile=float(architecture["heal_quantile"]),
        surprisal_slices=int(architecture.get("surprisal_slices", 1)),
    )
