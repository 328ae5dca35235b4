"""Training on the device: torch augmentation, the atlas in torch, the sync-free trimmed
loss, seeds, and bfloat16 autocast against float32 (on the CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from mriaudit.bench_model import synthetic_head
from mriaudit.intensity import normalize_intensity
from mriaudit.model.augment import _shift, augment_batch
from mriaudit.model.data import brain_grid
from mriaudit.model.device import resolve_precision
from mriaudit.model.network import build_network
from mriaudit.model.objective import _trimmed_l1
from mriaudit.model.options import TrainOptions
from mriaudit.model.scorer import reconstruct
from mriaudit.model.train_atlas import _median_volume, _to_atlas_space, train_fold

CPU = torch.device("cpu")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device=CPU).manual_seed(seed)


def test_shift_rolls_each_image_by_its_own_offset() -> None:
    images = torch.rand((4, 3, 10, 12))
    shifts = torch.tensor([[0, 0], [2, -1], [-2, 2], [1, 0]])
    rolled = _shift(images, shifts)
    for i, (dx, dy) in enumerate(shifts.tolist()):
        assert torch.equal(rolled[i], torch.roll(images[i], (dx, dy), dims=(1, 2)))


def test_augment_batch_is_seeded_and_keeps_the_target_clean() -> None:
    batch = torch.rand((8, 3, 32, 40)) + 0.1
    mask = (torch.rand((8, 1, 32, 40)) > 0.5).float()
    options = TrainOptions()
    first = augment_batch(batch, mask, context=1, generator=_generator(3), options=options)
    again = augment_batch(batch, mask, context=1, generator=_generator(3), options=options)
    other = augment_batch(batch, mask, context=1, generator=_generator(4), options=options)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    inputs, target, loss_mask = first
    assert inputs.shape == batch.shape and target.shape == loss_mask.shape == (8, 1, 32, 40)
    # Without corruption the input's centre slice is the target: only the inputs are corrupted.
    clean = TrainOptions(noise_probability=0.0, patch_probability=0.0, fine_noise_std=0.0)
    inputs, target, loss_mask = augment_batch(
        batch, mask, context=1, generator=_generator(3), options=clean
    )
    assert torch.allclose(inputs[:, 1:2], target.clamp(0.0, 1.5))
    # The mask moves with the image: its shift is one of the allowed ones.
    for i in range(8):
        assert any(
            torch.equal(loss_mask[i], torch.roll(mask[i], (dx, dy), dims=(1, 2)))
            for dx in range(-2, 3)
            for dy in range(-2, 3)
        )


def test_trimmed_l1_matches_the_masked_quantile() -> None:
    generator = _generator(0)
    output = torch.rand((4, 1, 30, 30), generator=generator)
    target = torch.rand((4, 1, 30, 30), generator=generator)
    mask = (torch.rand((4, 1, 30, 30), generator=generator) > 0.3).float()
    errors = (output - target).abs()
    cutoff = torch.quantile(errors.flatten()[mask.flatten() > 0.5], 0.9)
    weight = mask * (errors <= cutoff)
    expected = (errors * weight).sum() / weight.sum()
    assert torch.allclose(_trimmed_l1(output, target, mask, 0.1), expected)
    assert float(_trimmed_l1(output, target, torch.zeros_like(mask), 0.1)) == 0.0


@pytest.mark.parametrize("n", [5, 6])
def test_median_volume_is_numpy_median(n: int) -> None:
    volumes = np.random.default_rng(n).random((n, 4, 5, 6)).astype(np.float16)
    expected = np.median(volumes.astype(np.float32), axis=0)
    assert np.array_equal(_median_volume(torch.from_numpy(volumes)).numpy(), expected)


def test_to_atlas_space_samples_where_the_displacement_points() -> None:
    """The torch resampling equals scipy's trilinear map_coordinates at q - u(q)."""
    rng = np.random.default_rng(2)
    shape = (24, 32, 16)  # X, Y, Z
    model = build_network(TrainOptions().architecture, shape=shape)
    torch.manual_seed(0)
    for head in (model.flow, model.intensity):
        torch.nn.init.normal_(head.weight, std=0.5)
        torch.nn.init.normal_(head.bias, std=0.5)
    model.eval()
    volume = ndimage.gaussian_filter(rng.random(shape), 2).astype(np.float32)
    stacked = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume, 2, 0)))
    with torch.no_grad():
        moved = _to_atlas_space(model, stacked, batch_size=5).numpy()
        z = torch.arange(shape[2])
        neighbours = (z[:, None] + torch.arange(-1, 2)[None, :]).clamp(0, shape[2] - 1)
        flow, gain, offset = (t.numpy() for t in model.fields(stacked[neighbours], z))
    assert np.abs(flow).max() > 0.5  # the check means something only with a displacement
    coords = np.indices(shape, dtype=np.float32) - np.moveaxis(flow, 0, 3)
    sampled = ndimage.map_coordinates(volume, coords, order=1, mode="nearest")
    expected = (sampled - np.moveaxis(offset[:, 0], 0, 2)) / np.moveaxis(gain[:, 0], 0, 2)
    np.testing.assert_allclose(np.moveaxis(moved, 0, 2), expected, atol=1e-5)


def test_resolve_precision() -> None:
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp16", CPU)


def test_training_is_seeded_and_bf16_keeps_the_fp32_result() -> None:
    """Same seed, same weights; bfloat16 autocast (on the CPU here) ends within 2 % of
    the float32 loss and reconstructs a subject within 5 % of its residual."""
    grid = brain_grid(2)
    rng = np.random.default_rng(1)
    volumes = [
        normalize_intensity(synthetic_head(rng), grid.mask)[grid.index].astype(np.float16)
        for _ in range(4)
    ]
    options = TrainOptions(slices_per_subject=12)
    runs = {}
    for name, precision in [("fp32", "fp32"), ("again", "fp32"), ("bf16", "bf16")]:
        state, loss = train_fold(
            volumes,
            grid=grid,
            epochs=2,
            batch_size=16,
            learning_rate=2e-3,
            seed=5,
            device=CPU,
            options=options,
            precision=precision,
        )
        model = build_network(options.architecture, shape=volumes[0].shape)
        model.load_state_dict(state)
        subject = volumes[0].astype(np.float32)
        runs[name] = (state, loss, reconstruct(model, subject, device=CPU))
    fp32, again, bf16 = runs["fp32"], runs["again"], runs["bf16"]
    assert all(torch.equal(fp32[0][key], again[0][key]) for key in fp32[0])
    assert fp32[1] == again[1]
    assert abs(bf16[1] - fp32[1]) <= 0.02 * fp32[1]
    brain = grid.crop_mask
    residual = np.abs(subject - fp32[2])[brain].mean()
    assert np.abs(bf16[2] - fp32[2])[brain].mean() <= 0.05 * residual
    assert not np.array_equal(bf16[2], fp32[2])  # autocast did run in bfloat16
