"""The model's methods (config ``model.method``): the ``ae3d`` 3D autoencoder, the
``itermask3d`` iterative inpainting and ``token_surprisal`` on the synthetic cohort of
``test_model`` (six normals, one subject with a 10 mm lesion), the same outputs for
every method, and the refusal of another method's checkpoint."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from mriaudit import cohort as cohort_module
from mriaudit.bench_model import synthetic_head
from mriaudit.intensity import normalize_intensity
from mriaudit.model import maps, score_subject, train_ae3d, train_itermask, train_tokens
from mriaudit.model.ae3d import build_ae3d
from mriaudit.model.data import BrainGrid, brain_grid
from mriaudit.model.itermask import build_itermask, high_pass
from mriaudit.model.methods import (
    DEFAULT_METHOD,
    METHODS,
    build_network,
    checkpoint_method,
    default_architecture,
)
from mriaudit.model.options import TrainOptions
from mriaudit.model.scorer import Scorer, load_checkpoint, raw_terms
from mriaudit.model.tokens import build_tokens, codebook_usage
from mriaudit.records import read_record

# The cohort fixture of test_model, imported: its parameters below "redefine" it.
# ruff: noqa: F811
from .test_model import (  # noqa: F401 (cohort)
    CHECKPOINT_KEYS,
    LESION_MM,
    LESION_RADIUS_MM,
    NORMALS,
    SIDECAR_KEYS,
    _train,
    cohort,
)

SCHEMA = Path(__file__).resolve().parents[2] / "src" / "mriaudit" / "schemas" / "config.schema.yaml"
#: ae3d as configured, with more passes per epoch: three training volumes per fold here.
AE3D = TrainOptions(
    architecture=default_architecture("ae3d") | {"passes_per_epoch": 4}, calibration_subjects=8
)
#: itermask3d likewise.
ITERMASK = TrainOptions(
    architecture=default_architecture("itermask3d") | {"passes_per_epoch": 4},
    calibration_subjects=8,
)
#: token_surprisal with every brain slice of its three training volumes per epoch.
TOKENS = TrainOptions(
    architecture=default_architecture("token_surprisal"),
    slices_per_subject=80,
    calibration_subjects=8,
)
#: The methods beside atlas_warp, each with a module fixture of the same name below.
TRAINED = ["ae3d", "itermask3d", "token_surprisal"]
#: Subjects whose outputs the layout test compares: one in the reference, one not.
LAYOUT = ["n00", "les"]
#: The cheapest atlas_warp that still writes every output.
TINY_ATLAS = TrainOptions(slices_per_subject=4, calibration_subjects=4)


def _score_all(
    cohort: dict, out: Path, labels: list[str], *, method: str | None
) -> dict[str, dict]:
    records = {}
    for label in labels:
        image, record = cohort["subjects"][label]
        records[label] = score_subject(
            image,
            checkpoint=out / "model.pt",
            subject=label,
            out_map=out / f"sub-{label}_anomaly_map.nii.gz",
            record_path=out / f"sub-{label}_desc-score_qc.json",
            upstream=[record],
            device="cpu",
            threads=2,
            method=method,
        )
    return records


def _training_volumes(count: int) -> tuple[BrainGrid, list[np.ndarray]]:
    """``count`` synthetic heads on the 2 mm crop, as the trainers store them (float16)."""
    grid = brain_grid(2)
    rng = np.random.default_rng(1)
    volumes = [
        normalize_intensity(synthetic_head(rng), grid.mask)[grid.index].astype(np.float16)
        for _ in range(count)
    ]
    return grid, volumes


def _assert_seeded_and_bf16_close(
    train_fold,
    volumes: list[np.ndarray],
    *,
    grid: BrainGrid,
    options: TrainOptions,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """Train twice in float32 and once under bfloat16 autocast: one seed, one result;
    bf16's last loss within 5 % of float32's. Returns the float32 state dict."""
    runs = {}
    for name, precision in [("fp32", "fp32"), ("again", "fp32"), ("bf16", "bf16")]:
        runs[name] = train_fold(
            volumes,
            grid=grid,
            epochs=2,
            batch_size=batch_size,
            learning_rate=2e-3,
            seed=5,
            device=torch.device("cpu"),
            options=options,
            precision=precision,
        )
    (fp32, loss), (again, loss_again), (_, loss_bf16) = runs["fp32"], runs["again"], runs["bf16"]
    assert all(torch.equal(fp32[key], again[key]) for key in fp32) and loss == loss_again
    assert abs(loss_bf16 - loss) <= 0.05 * loss
    return fp32


@pytest.fixture(scope="module")
def ae3d(cohort: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two ae3d fold models trained on the normals; the normals and the lesion scored."""
    out = tmp_path_factory.mktemp("ae3d")
    reference = [*NORMALS, "broken", "misreg"]
    sidecar = _train(
        cohort, out, reference=reference, folds=2, epochs=2, options=AE3D, method="ae3d"
    )
    records = _score_all(cohort, out, [*NORMALS, "les"], method="ae3d")
    return {"out": out, "sidecar": sidecar, "records": records}


@pytest.fixture(scope="module")
def itermask3d(cohort: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two itermask3d fold models trained on the normals; the normals and the lesion scored."""
    out = tmp_path_factory.mktemp("itermask3d")
    reference = [*NORMALS, "broken", "misreg"]
    sidecar = _train(
        cohort, out, reference=reference, folds=2, epochs=2, options=ITERMASK, method="itermask3d"
    )
    records = _score_all(cohort, out, [*NORMALS, "les"], method="itermask3d")
    return {"out": out, "sidecar": sidecar, "records": records}


@pytest.fixture(scope="module")
def token_surprisal(cohort: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two token_surprisal fold models trained on the normals; the normals and the
    lesion scored."""
    out = tmp_path_factory.mktemp("token_surprisal")
    reference = [*NORMALS, "broken", "misreg"]
    sidecar = _train(
        cohort,
        out,
        reference=reference,
        folds=2,
        epochs=4,
        options=TOKENS,
        method="token_surprisal",
    )
    records = _score_all(cohort, out, [*NORMALS, "les"], method="token_surprisal")
    return {"out": out, "sidecar": sidecar, "records": records}


@pytest.fixture(scope="module")
def atlas(cohort: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A minimal atlas_warp model of the same cohort (the default method)."""
    out = tmp_path_factory.mktemp("atlas")
    sidecar = _train(cohort, out, reference=NORMALS, folds=2, epochs=1, options=TINY_ATLAS)
    records = _score_all(cohort, out, LAYOUT, method=None)
    return {"out": out, "sidecar": sidecar, "records": records}


@pytest.mark.parametrize("method", TRAINED)
def test_lesion_scores_above_every_normal_and_its_map_peaks_inside(
    method: str, request: pytest.FixtureRequest
) -> None:
    run = request.getfixturevalue(method)
    records = run["records"]
    assert all(records[label]["status"] == "ok" for label in records)
    normal = [records[label]["metrics"]["anomaly_raw"] for label in NORMALS]
    assert records["les"]["metrics"]["anomaly_raw"] > max(normal)
    image = nib.load(run["out"] / "sub-les_anomaly_map.nii.gz")
    peak = np.unravel_index(np.argmax(np.asarray(image.dataobj)), image.shape)
    peak_mm = image.affine[:3, :3] @ np.array(peak) + image.affine[:3, 3]
    assert np.linalg.norm(peak_mm - LESION_MM) < LESION_RADIUS_MM


@pytest.mark.parametrize("method", TRAINED)
def test_switching_method_keeps_the_output_layout(
    method: str, atlas: dict, request: pytest.FixtureRequest
) -> None:
    runs = {method: request.getfixturevalue(method), "atlas_warp": atlas}
    checkpoints = {m: load_checkpoint(run["out"] / "model.pt") for m, run in runs.items()}
    sidecars = {m: json.loads((run["out"] / "model.json").read_text()) for m, run in runs.items()}
    assert set(checkpoints[method]) == set(checkpoints["atlas_warp"]) >= CHECKPOINT_KEYS
    assert set(sidecars[method]) == set(sidecars["atlas_warp"]) >= SIDECAR_KEYS
    for name in runs:
        assert checkpoints[name]["method"] == sidecars[name]["method"] == name
        assert checkpoints[name]["architecture"]["name"] == name
        assert checkpoint_method(checkpoints[name]) == name
    assert set(checkpoints[method]["calibration"][0]) == set(
        checkpoints["atlas_warp"]["calibration"][0]
    )
    for label in LAYOUT:
        record, other = runs[method]["records"][label], atlas["records"][label]
        assert set(record) == set(other) and set(record["metrics"]) == set(other["metrics"])
        maps = [nib.load(run["out"] / f"sub-{label}_anomaly_map.nii.gz") for run in runs.values()]
        assert maps[0].shape == maps[1].shape and maps[0].get_data_dtype() == np.float32
        np.testing.assert_allclose(maps[0].affine, maps[1].affine)


def test_a_checkpoint_of_another_method_is_refused(
    ae3d: dict,
    atlas: dict,
    itermask3d: dict,
    token_surprisal: dict,
    cohort: dict,
    tmp_path: Path,
) -> None:
    image, upstream = cohort["subjects"]["les"]
    for run, asked, trained_as in [
        (ae3d, "atlas_warp", "ae3d"),
        (atlas, "ae3d", "atlas_warp"),
        (itermask3d, "ae3d", "itermask3d"),
        (token_surprisal, "itermask3d", "token_surprisal"),
    ]:
        record = score_subject(
            image,
            checkpoint=run["out"] / "model.pt",
            subject="les",
            out_map=tmp_path / f"{asked}.nii.gz",
            record_path=tmp_path / f"{asked}.json",
            upstream=[upstream],
            device="cpu",
            method=asked,
        )
        assert record == read_record(tmp_path / f"{asked}.json")
        assert record["status"] == "ok" and "not_scored" in record["findings"]
        assert record["metrics"]["anomaly_raw"] is None
        reason = next(w for w in record["warnings"] if w.startswith("not scored"))
        assert f"trained with model.method {trained_as!r}" in reason
        assert f"asks for {asked!r}" in reason
        assert not (tmp_path / f"{asked}.nii.gz").exists()  # nothing that reads as a result
        scorer = Scorer.load(run["out"] / "model.pt", device="cpu", method=asked)
        assert not scorer.trained and not scorer.models
    # The method it was trained with, or no demand (the API's default), scores.
    assert Scorer.load(ae3d["out"] / "model.pt", device="cpu", method="ae3d").trained
    assert Scorer.load(ae3d["out"] / "model.pt", device="cpu").trained


def test_the_default_method_is_atlas_warp_and_unknown_ones_are_refused(
    atlas: dict, cohort: dict, tmp_path: Path
) -> None:
    assert DEFAULT_METHOD == "atlas_warp" == atlas["sidecar"]["method"]
    with pytest.raises(ValueError, match="unknown model method 'vae'"):
        _train(cohort, tmp_path, reference=NORMALS, method="vae")
    with pytest.raises(ValueError, match="unknown network 'vae'"):
        build_network({"name": "vae"}, shape=(8, 8, 8))
    # A checkpoint from before the methods names none: it is an atlas_warp one.
    assert checkpoint_method({"architecture": {"name": "atlas_warp"}}) == "atlas_warp"
    assert checkpoint_method({"status": "failed"}) == "atlas_warp"


def test_config_model_key_matches_the_methods() -> None:
    schema = yaml.safe_load(SCHEMA.read_text())["properties"]["model"]
    keys = schema["then"]["properties"]
    assert tuple(keys["method"]["enum"]) == METHODS
    assert keys["method"]["default"] == DEFAULT_METHOD == cohort_module.DEFAULT_MODEL_METHOD
    settings = cohort_module.model_settings
    assert settings("train") == {"method": DEFAULT_METHOD, "checkpoint": "train"}
    assert settings("/m/model.pt") == {"method": DEFAULT_METHOD, "checkpoint": "/m/model.pt"}
    assert settings({"method": "ae3d", "checkpoint": "train"}) == {
        "method": "ae3d",
        "checkpoint": "train",
    }


def test_ae3d_keeps_any_crop_shape_and_cannot_copy_its_input() -> None:
    """Padding is cut off again; the bottleneck holds 1/64 of the 2 mm voxels' values."""
    torch.manual_seed(0)
    model = build_ae3d(default_architecture("ae3d"), shape=(30, 36, 21))
    volumes = torch.rand((3, 30, 36, 21))
    out = model.reconstruct_volumes(volumes, slices=32)  # one volume per pass
    assert out.shape == volumes.shape and out.dtype == torch.float32
    together = model.reconstruct_volumes(volumes, slices=1024)
    torch.testing.assert_close(out, together, rtol=1e-4, atol=1e-5)
    # The encoder works on the 4 mm grid: the 2 mm crop (80, 96, 80 padded) pooled.
    code = model.encoder(torch.zeros((1, 1, 40, 48, 40)))
    assert code.shape == (1, 8, 10, 12, 10) and code.numel() * 64 == 80 * 96 * 80


def test_ae3d_training_is_seeded_and_bf16_keeps_the_fp32_result() -> None:
    """As atlas_warp's trainer: one seed, one result; bfloat16 autocast ends near float32."""
    grid, volumes = _training_volumes(3)
    fp32 = _assert_seeded_and_bf16_close(
        train_ae3d.train_fold, volumes, grid=grid, options=AE3D, batch_size=32
    )
    # The mean of the fold's volumes is the model's starting point, saved with it.
    mean = np.mean([v.astype(np.float32) for v in volumes], axis=0)
    np.testing.assert_allclose(fp32["mean"].numpy(), mean, atol=1e-5)


def test_itermask_high_pass_removes_low_frequencies_and_keeps_edges() -> None:
    """A constant or a slow cosine (wavelength 10 voxels, under the radius) vanishes;
    a box keeps its faces (large values there) but not its inside intensity."""
    shape = (20, 24, 20)
    constant = torch.full((1, *shape), 0.7)
    assert high_pass(constant, radius=0.25).abs().max() < 1e-5
    wave = torch.cos(2 * torch.pi * 0.1 * torch.arange(shape[0]).float())
    slow = wave[None, :, None, None].expand(1, *shape)
    assert high_pass(slow, radius=0.25).abs().max() < 1e-5
    box = torch.zeros((1, *shape))
    box[:, 5:15, 6:18, 5:15] = 1.0
    detail = high_pass(box, radius=0.25)[0]
    assert detail[4:6, 12, 10].abs().min() > 0.25  # the face at x = 5
    assert detail[10, 12, 10].abs() < 0.1  # the box's middle: its level is gone
    assert abs(float(detail.mean())) < 1e-5


def test_itermask_keeps_any_crop_shape_and_shrinks_an_untrained_mask() -> None:
    """Padding is cut off again; batching changes nothing (the threshold is each
    subject's own); outside the final mask the reconstruction is the image itself."""
    torch.manual_seed(0)
    model = build_itermask(default_architecture("itermask3d"), shape=(30, 36, 21))
    volumes = torch.rand((3, 30, 36, 21))
    out = model.reconstruct_volumes(volumes, slices=32)  # one volume per pass
    assert out.shape == volumes.shape and out.dtype == torch.float32
    together = model.reconstruct_volumes(volumes, slices=1024)
    torch.testing.assert_close(out, together, rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        recon, masks = model.iterate(volumes)
    counts = [int(m.sum()) for m in masks]
    assert counts[0] == 3 * int(model.working_brain().sum())  # the whole brain first
    assert counts[-1] < 0.1 * counts[0]  # the 95th percentile's share, at most
    hidden = model.to_crop(masks[-1][:, None].float(), mode="nearest") > 0.5
    assert torch.equal(recon[~hidden], volumes[~hidden])


def test_itermask_mask_shrinks_onto_the_lesion(itermask3d: dict, cohort: dict) -> None:
    """From the whole brain, every iteration's mask within the last, and the final mask
    covers most of the lesion and little of the rest of the brain."""
    image, _ = cohort["subjects"]["les"]
    scorer = Scorer.load(itermask3d["out"] / "model.pt", device="cpu", method="itermask3d")
    prepared = scorer.prepare(image, "les")
    model = scorer.models[prepared.folds[0]]
    with torch.inference_mode():
        _, masks = model.iterate(torch.from_numpy(prepared.volume)[None])
    assert len(masks) >= 3
    for before, after in itertools.pairwise(masks):
        assert bool((after <= before).all()) and int(after.sum()) < int(before.sum())
    grid = scorer.grid
    centre = np.linalg.solve(grid.affine[:3, :3], LESION_MM - grid.affine[:3, 3])
    distance = np.linalg.norm((np.indices(grid.shape).T - centre).T, axis=0) * 2.0
    lesion = (distance < LESION_RADIUS_MM)[grid.index] & grid.crop_mask
    rest = grid.crop_mask & ~lesion
    final = (model.to_crop(masks[-1][:, None].float(), mode="nearest") > 0.5)[0].numpy()
    on_lesion, on_rest = final[lesion].mean(), final[rest].mean()
    assert on_lesion > 0.5 and on_lesion > 10 * on_rest, (on_lesion, on_rest)


def test_itermask_training_is_seeded_and_bf16_keeps_the_fp32_result() -> None:
    """As ae3d's trainer: one seed, one result; bfloat16 autocast ends near float32."""
    grid, volumes = _training_volumes(3)
    options = replace(ITERMASK, architecture=ITERMASK.architecture | {"passes_per_epoch": 1})
    fp32 = _assert_seeded_and_bf16_close(
        train_itermask.train_fold, volumes, grid=grid, options=options, batch_size=32
    )
    mean = np.mean([v.astype(np.float32) for v in volumes], axis=0)
    np.testing.assert_allclose(fp32["mean"].numpy(), mean, atol=1e-5)
    np.testing.assert_array_equal(fp32["brain"].numpy(), grid.crop_mask.astype(np.float32))


def test_token_codebook_usage_is_measured_and_the_codebook_does_not_collapse(
    token_surprisal: dict,
) -> None:
    """Every fold's sidecar says how many codes its training tokens use; the EMA
    codebook with dead-code restarts spreads them over many codes."""
    diagnostics = token_surprisal["sidecar"]["fold_diagnostics"]
    assert len(diagnostics) == 2
    checkpoint = load_checkpoint(token_surprisal["out"] / "model.pt")
    for fold, measured in enumerate(diagnostics):
        usage = measured["codebook"]
        counts = checkpoint["state_dicts"][fold]["code_counts"]
        assert usage == codebook_usage(counts)
        assert usage["codes"] == 128 and usage["codes_used"] >= 32, usage
        assert usage["perplexity"] >= 16, usage
        assert torch.isfinite(checkpoint["state_dicts"][fold]["heal_nll"])


def test_codebook_usage_of_even_and_collapsed_counts() -> None:
    even = codebook_usage(torch.full((8,), 5.0))
    assert even["codes_used"] == 8 and even["perplexity"] == pytest.approx(8.0)
    collapsed = codebook_usage(torch.tensor([40.0, 0, 0, 0]))
    assert collapsed["codes_used"] == 1 and collapsed["perplexity"] == pytest.approx(1.0)
    assert codebook_usage(torch.zeros(4))["codes_used"] == 0


def test_token_terms_keep_any_crop_shape_and_batching_changes_nothing() -> None:
    """Padding is cut off again; both terms are >= 0 on the crop's voxels; the residual
    against the healed decoding counts in units of the surprisal threshold."""
    torch.manual_seed(0)
    model = build_tokens(default_architecture("token_surprisal"), shape=(30, 36, 21))
    assert model.grid == (8, 9)
    volumes = torch.rand((2, 30, 36, 21))
    scoring = TOKENS.scoring
    one = raw_terms(model, volumes, scoring=scoring, slices=5)
    together = raw_terms(model, volumes, scoring=scoring, slices=1024)
    assert one.shape == (2, 2, 30, 36, 21) and one.dtype == torch.float32
    torch.testing.assert_close(one, together, rtol=1e-4, atol=1e-4)
    assert float(one.min()) >= 0.0
    # An untrained prior spreads its probability: about log(128) nats per token, and
    # before training sets the threshold no token counts as surprising.
    surprisal, _ = model.analyse(volumes, slices=32)
    assert abs(float(surprisal.mean()) - np.log(128)) < 1.0
    assert float(one[:, 0].max()) == 0.0
    model.heal_nll.fill_(float(surprisal.median()))
    weighted = raw_terms(model, volumes, scoring=scoring, slices=32)[:, 0]
    surprisal, healed = model.analyse(volumes, slices=32)
    residual = maps.raw_map(volumes, healed, scoring=scoring)[:, 0]
    torch.testing.assert_close(weighted, residual * surprisal / model.heal_nll)
    recon = model.reconstruct_volumes(volumes, slices=7)
    assert recon.shape == volumes.shape


def test_token_prior_is_causal_in_each_order() -> None:
    """Changing a token changes the prediction of the tokens after it in raster order
    and of those before it in the reversed order, never its own."""
    torch.manual_seed(0)
    model = build_tokens(default_architecture("token_surprisal"), shape=(16, 16, 4)).eval()
    tokens = torch.randint(128, (1, 16))
    changed = tokens.clone()
    changed[0, 7] = (tokens[0, 7] + 1) % 128
    heights = torch.tensor([2])
    with torch.inference_mode():
        for order, unaffected in [(0, slice(0, 8)), (1, slice(7, 16))]:
            before = model.prior_logits(tokens, heights, order)
            after = model.prior_logits(changed, heights, order)
            torch.testing.assert_close(before[:, unaffected], after[:, unaffected])
            assert not torch.allclose(before, after)


def test_token_training_is_seeded_and_bf16_keeps_the_fp32_result() -> None:
    """As the other trainers: one seed, one result; bfloat16 autocast ends near float32."""
    grid, volumes = _training_volumes(2)
    options = replace(TOKENS, slices_per_subject=16)
    _assert_seeded_and_bf16_close(
        train_tokens.train_fold, volumes, grid=grid, options=options, batch_size=16
    )
