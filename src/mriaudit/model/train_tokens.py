"""Training of the ``token_surprisal`` method: one fold's VQ autoencoder, then its token prior.

As the other trainers: the fold's volumes, the brain mask, the draws and the
loss live on the device as tensors, every draw comes from one
``torch.Generator``, the host reads one value back per epoch, and ``precision``
``bf16`` runs the networks under bfloat16 autocast (losses, the codebook and
its updates stay float32).

1. **Autoencoder**, ``epochs`` epochs: each draws ``options.slices_per_subject``
   axial slices with brain per training volume, ``batch_size`` a step, with the
   light intensity augmentation of the 3D methods on the input. The loss is
   the trimmed L1 of the decoding inside the brain plus the commitment term;
   the codebook follows by EMA with dead-code restarts after each step.
2. **Prior**, ``epochs * prior_epoch_factor`` epochs on the tokens of the clean
   training slices (the autoencoder frozen): cross-entropy of each token given
   those before it, in both orders.
3. **Measured after training** (saved with the weights): the tokens per code
   over every training slice with brain (``code_counts``; usage by
   :func:`~mriaudit.model.tokens.codebook_usage`), and the healing threshold
   ``heal_nll``, the ``heal_quantile`` of the training tokens' surprisal
   inside the brain.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mriaudit.model.ae3d import pad_widths
from mriaudit.model.data import BrainGrid
from mriaudit.model.fit import augment_volumes, autocast, cpu_state, log_epoch, mean_volume
from mriaudit.model.objective import _trimmed_l1, lr_factor
from mriaudit.model.options import TrainOptions
from mriaudit.model.tokens import STRIDE, TokenSurprisal, build_tokens, codebook_usage

log = logging.getLogger(__name__)

#: Training slices whose surprisal sets the healing threshold (a sample keeps it cheap).
HEAL_SAMPLE = 512


def _draws(
    subjects: int, heights: torch.Tensor, per_subject: int, *, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch's shuffled (subject, height) pairs: ``per_subject`` heights drawn from
    ``heights`` (the slices with brain) for every subject."""
    device = heights.device
    subject = torch.arange(subjects, device=device).repeat_interleave(per_subject)
    height = heights[torch.randint(len(heights), subject.shape, generator=generator, device=device)]
    order = torch.randperm(subject.numel(), generator=generator, device=device)
    return subject[order], height[order]


def _run_epochs(
    epochs: int,
    steps: Callable[[int], Iterator[torch.Tensor]],
    *,
    optimiser: torch.optim.Optimizer,
    learning_rate: float,
    warmup: float,
    steps_per_epoch: int,
    label: str,
) -> float:
    """The epoch loop of both stages: ``steps(epoch)`` is a generator yielding one
    step's loss at a time, resumed after that step's optimiser update; warm-up and
    cosine decay of the learning rate; one read-back per epoch."""
    total, step, loss_value = steps_per_epoch * epochs, 0, float("nan")
    for epoch in range(epochs):
        started = time.perf_counter()
        epoch_loss = None
        for loss in steps(epoch):
            for group in optimiser.param_groups:
                group["lr"] = learning_rate * lr_factor(step, total, warmup)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            epoch_loss = loss.detach() if epoch_loss is None else epoch_loss + loss.detach()
            step += 1
        loss_value = float(epoch_loss) / steps_per_epoch  # the epoch's one read-back
        log_epoch(label, epoch, epochs, loss_value, started)
    return loss_value


def _all_tokens(
    model: TokenSurprisal, stack: torch.Tensor, heights: torch.Tensor, *, batch: int
) -> torch.Tensor:
    """Tokens (N, H, h, w) of every volume of ``stack`` (N, X, Y, Z) at ``heights`` (H,)."""
    out = []
    with torch.inference_mode():
        for volume in stack:
            slices = volume[:, :, heights].permute(2, 0, 1)[:, None].float()
            out.append(torch.cat([model.tokenise(s) for s in slices.split(batch)]))
    return torch.stack(out)


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
    """Train one token model on cropped, normalised volumes (X, Y, Z each) (see the
    module's docstring). Returns the CPU state dict and the prior's mean loss
    (nats per token) of its last epoch."""
    architecture = options.architecture
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    # (N, X, Y, Z), as stored (float16): a batch is one gather.
    stack = torch.from_numpy(np.stack(volumes)).to(device)
    n, x, y, _ = stack.shape
    brain = torch.from_numpy(grid.crop_mask.astype(np.float32)).to(device)
    heights = brain.flatten(0, 1).amax(0).nonzero()[:, 0]  # the slices with brain
    model = build_tokens(architecture, shape=tuple(stack.shape[1:])).to(device)
    model.set_mean(mean_volume(stack))
    per_subject = min(options.slices_per_subject, len(heights))
    steps_per_epoch = -(-n * per_subject // batch_size)

    def vq_steps(epoch: int) -> Iterator[torch.Tensor]:
        del epoch
        subject, height = _draws(n, heights, per_subject, generator=generator)
        for first in range(0, subject.numel(), batch_size):
            s, h = subject[first : first + batch_size], height[first : first + batch_size]
            slices = stack[s, :, :, h].float()  # (B, X, Y)
            inputs, target = augment_volumes(
                slices[..., None], generator=generator, options=options
            )
            inputs, target = inputs[..., 0], target[..., 0]  # (B, 1, X, Y)
            with autocast(device, precision):
                vectors = model.encode(inputs)
            vectors = vectors.float()
            tokens = model.quantise(vectors.detach())
            chosen = model.lookup(tokens)
            straight = vectors + (chosen - vectors).detach()
            with autocast(device, precision):
                decoded = model.decode(straight, h, (x, y))
            mask = brain[:, :, h].permute(2, 0, 1)[:, None]
            loss = _trimmed_l1(decoded.float(), target, mask, options.trim)
            loss = loss + model.commitment * F.mse_loss(vectors, chosen.detach())
            yield loss
            # Resumed after the optimiser's step: the codebook follows this batch.
            model.update_codebook(vectors.detach(), tokens, generator=generator)

    model.train()
    _run_epochs(
        epochs,
        vq_steps,
        optimiser=torch.optim.Adam(model.vq_parameters(), lr=learning_rate),
        learning_rate=learning_rate,
        warmup=options.warmup,
        steps_per_epoch=steps_per_epoch,
        label=f"{label}autoencoder ",
    )
    model.eval()
    tokens = _all_tokens(model, stack, heights, batch=batch_size)  # (N, H, h, w)
    model.code_counts.copy_(torch.bincount(tokens.flatten(), minlength=model.codes).float())

    def prior_steps(epoch: int) -> Iterator[torch.Tensor]:
        del epoch
        subject, slot = _draws(
            n, torch.arange(len(heights), device=device), per_subject, generator=generator
        )
        for first in range(0, subject.numel(), batch_size):
            s, k = subject[first : first + batch_size], slot[first : first + batch_size]
            with autocast(device, precision):
                yield model.prior_loss(tokens[s, k], heights[k])

    model.train()
    loss = _run_epochs(
        epochs * int(architecture["prior_epoch_factor"]),
        prior_steps,
        optimiser=torch.optim.Adam(model.prior_parameters(), lr=learning_rate),
        learning_rate=learning_rate,
        warmup=options.warmup,
        steps_per_epoch=steps_per_epoch,
        label=f"{label}prior ",
    )
    model.eval()
    model.heal_nll.copy_(_heal_threshold(model, tokens, heights, brain, generator=generator))
    usage = codebook_usage(model.code_counts)
    log.info(
        "%scodebook: %d of %d codes used, perplexity %.1f; healing above %.2f nats",
        label,
        usage["codes_used"],
        usage["codes"],
        usage["perplexity"],
        float(model.heal_nll),
    )
    return cpu_state(model), loss


def _heal_threshold(
    model: TokenSurprisal,
    tokens: torch.Tensor,
    heights: torch.Tensor,
    brain: torch.Tensor,
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """The ``heal_quantile`` of the surprisal (nats) of training tokens whose 8 mm
    square holds brain, over up to :data:`HEAL_SAMPLE` training slices."""
    n, count = tokens.shape[:2]
    device = tokens.device
    pick = torch.randperm(n * count, generator=generator, device=device)[:HEAL_SAMPLE]
    subject, slot = pick // count, pick % count
    padded = F.pad(
        brain.permute(2, 0, 1)[:, None], pad_widths(tuple(brain.shape[:2]), multiple=STRIDE)
    )
    inside = F.avg_pool2d(padded, STRIDE)[:, 0] > 0  # (Z, h, w)
    values = []
    with torch.inference_mode():
        for first in range(0, len(pick), 64):
            s, k = subject[first : first + 64], slot[first : first + 64]
            nll, _ = model.surprisal(tokens[s, k], heights[k])
            values.append(nll[inside[heights[k]]])
    return torch.quantile(torch.cat(values), model.heal_quantile)
