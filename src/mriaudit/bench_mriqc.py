"""Rank agreement of our IQMs with MRIQC 24's own functions: ``python -m mriaudit.bench_mriqc``.

A real head (person F of ``../shared/data``: Siemens TrioTim MPRAGE, real
background noise) is degraded in two series, with fixed seeds:

- ``noise``: Rician noise of sigma ``NOISE_LEVELS`` x the head's 90th
  intensity percentile (the white-matter level);
- ``ghost``: an N/2 ghost, the magnitude plus ``GHOST_LEVELS`` x a copy
  shifted by half the field of view along the phase-encode (A-P) axis;

both starting from the clean image (15 images). Each degraded image goes
through the workflow's own n4, register and iqm code (``compute_iqms``): our
IQMs. The same preprocessed image, its tissue posteriors, masks and air are
then handed to MRIQC 24.0.2's functions (``mriqc.qc.anatomical``, run in a
separate interpreter, ``--mriqc-python``) composed as MRIQC's
``StructuralQC`` interface composes them, in three variants:

- ``same_masks``: MRIQC's estimators on our binary summary masks (posterior >
  0.85, eroded) and our air: the estimator alone;
- ``soft_pv``: MRIQC's estimators on our posteriors as partial-volume weights
  (MRIQC's convention) and our air;
- ``mriqc``: MRIQC's conventions throughout: posteriors as weights, the air
  of MRIQC's ``ArtifactMask`` (the "hat" above the glabella-inion plane,
  outside the head mask, less MRIQC's artefact mask), the image harmonised
  to a white-matter median of 1000;
- ``mriqc_fixed_seg``: as ``mriqc`` but with the clean image's posteriors
  for every image (a segmentation that does not follow the degradation);
- ``mriqc_template_scale``: as ``mriqc`` but on the image at the template's
  intensity scale (white matter 0.85, as ``mriaudit.heads`` and the demo
  write), not harmonised: MRIQC's ``summary_stats`` rounds intensities to
  integers first;
- ``mriqc_atropos``: MRIQC's conventions with MRIQC 24's own segmentation
  settings (ANTs Atropos initialised with the warped template priors, prior
  weight 0.1, MRF 0.01 over 1x1x1, ``atropos_pvms``) in place of our mixture:
  the closest to MRIQC 24 end to end this benchmark gets without SynthStrip;
- ``mriqc_atropos_fixed``: as ``mriqc_atropos`` with the clean image's
  Atropos posteriors for every image.

Per metric it prints Spearman's rho between ours and each variant over the
noise series, the ghost series and both pooled (the headline), and writes
``WORK/mriqc_agreement.json``. MRIQC is never a dependency of the project:
without ``--mriqc-python`` (or with one that cannot import MRIQC 24) or
without the shared data the benchmark says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import stats

from mriaudit import files, heads

log = logging.getLogger(__name__)

PROJECT = Path(__file__).resolve().parents[2]
#: Person of ``mriaudit.heads`` whose head is degraded (real Siemens background noise).
PERSON = "F"
#: Rician noise sigma per level, as a fraction of the head's 90th intensity percentile.
NOISE_LEVELS: tuple[float, ...] = (0.01, 0.02, 0.03, 0.05, 0.07, 0.10, 0.14)
#: N/2 ghost amplitude per level (fraction of the image added, shifted by half the FOV).
GHOST_LEVELS: tuple[float, ...] = (0.03, 0.06, 0.10, 0.15, 0.20, 0.30, 0.40)
SEED = 23
#: Metrics compared (our column names; MRIQC's are the same without ``iqm_``).
METRICS: tuple[str, ...] = (
    "iqm_cjv",
    "iqm_cnr",
    "iqm_snr_total",
    "iqm_snr_csf",
    "iqm_snr_gm",
    "iqm_snr_wm",
    "iqm_snrd_total",
    "iqm_efc",
    "iqm_fber",
    "iqm_wm2max",
)
VARIANTS: tuple[str, ...] = (
    "same_masks",
    "soft_pv",
    "mriqc",
    "mriqc_fixed_seg",
    "mriqc_template_scale",
    "mriqc_atropos",
    "mriqc_atropos_fixed",
)

# Runs in MRIQC's interpreter: MRIQC 24's own functions, composed as its StructuralQC
# interface composes them (mriqc/interfaces/anatomical.py). ``mriqc.config`` pulls in
# nipype and the whole workflow machinery; the functions only use it to log a warning,
# so a stub stands in for it. MRIQC's ``artifact_mask`` lives in the nipype interfaces
# module: its function definition is taken from that file's source, unchanged.
_RUNNER = r"""
import ast, json, logging, sys, types
from pathlib import Path
import numpy as np
import scipy.ndimage as nd
stub = types.ModuleType("mriqc.config")
stub.loggers = types.SimpleNamespace(interface=logging.getLogger("mriqc"))
sys.modules["mriqc.config"] = stub
import mriqc
from mriqc.qc import anatomical as qc
source = Path(qc.__file__).parents[1] / "interfaces" / "anatomical.py"
tree = ast.parse(source.read_text())
node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "artifact_mask")
space = {"np": np, "nd": nd}
exec(compile(ast.Module(body=[node], type_ignores=[]), str(source), "exec"), space)
artifact_mask = space["artifact_mask"]

def measures(data, pvms, air, head, rot):
    try:
        return _measures(data, pvms, air, head, rot)
    except (ArithmeticError, ValueError) as error:
        return {"error": f"{type(error).__name__}: {error}"}

def _measures(data, pvms, air, head, rot):
    stats = qc.summary_stats(data, {**pvms, "bg": air})
    out = {}
    snrs = [qc.snr(stats[t]["median"], stats[t]["stdv"], stats[t]["n"]) for t in ("csf", "wm", "gm")]
    for t, v in zip(("csf", "wm", "gm"), snrs):
        out["snr_" + t] = v
    out["snr_total"] = float(np.mean(snrs))
    snrd = [qc.snr_dietrich(stats[t]["median"], mad_air=stats["bg"]["mad"], sigma_air=stats["bg"]["stdv"]) for t in ("csf", "wm", "gm")]
    out["snrd_total"] = float(np.mean(snrd))
    out["cnr"] = qc.cnr(stats["wm"]["median"], stats["gm"]["median"], stats["bg"]["stdv"], stats["wm"]["stdv"], stats["gm"]["stdv"])
    out["fber"] = qc.fber(data, head, rot)
    out["efc"] = qc.efc(data, rot)
    out["wm2max"] = qc.wm2max(data, stats["wm"]["median"])
    out["cjv"] = qc.cjv(stats["wm"]["median"], stats["gm"]["median"], stats["wm"]["mad"], stats["gm"]["mad"])
    return out

results = []
paths = json.loads(sys.argv[1])
first = np.load(paths[0])
clean_soft = {t: first["pv_" + t].astype(np.float64) for t in ("csf", "gm", "wm")}
clean_atropos = {t: first["atropos_" + t].astype(np.float64) for t in ("csf", "gm", "wm")}
for path in paths:
    z = np.load(path)
    data = z["data"].astype(np.float64)
    head, rot, hat = z["head"], z["frame"].astype(np.uint8), z["hat"]
    soft = {t: z["pv_" + t].astype(np.float64) for t in ("csf", "gm", "wm")}
    binary = {t: z["mask_" + t].astype(np.float64) for t in ("csf", "gm", "wm")}
    atropos = {t: z["atropos_" + t].astype(np.float64) for t in ("csf", "gm", "wm")}
    # MRIQC's Harmonize: white matter (pv >= 0.9, eroded) median scaled to 1000.
    wm = nd.binary_erosion(atropos["wm"] >= 0.9, structure=nd.generate_binary_structure(3, 2))
    harmonised = data * (1000.0 / np.median(data[wm]))
    # MRIQC's ArtifactMask: air is the hat outside the head mask, less the artefacts.
    hmdata = head | ~hat
    dist = nd.distance_transform_edt(~head)
    dist[~hmdata] = 0
    dist /= dist.max()
    art = artifact_mask(harmonised.astype(np.float32), ~hmdata, dist, zscore=10.0)
    air_mriqc = (~hmdata).astype(np.uint8)
    air_mriqc[art > 0] = 0
    air_ours = z["air"].astype(np.uint8)
    results.append({
        "same_masks": measures(harmonised, binary, air_ours, head.astype(np.uint8), rot),
        "soft_pv": measures(harmonised, soft, air_ours, head.astype(np.uint8), rot),
        "mriqc": measures(harmonised, soft, air_mriqc, head.astype(np.uint8), rot),
        "mriqc_fixed_seg": measures(harmonised, clean_soft, air_mriqc, head.astype(np.uint8), rot),
        "mriqc_atropos": measures(harmonised, atropos, air_mriqc, head.astype(np.uint8), rot),
        "mriqc_atropos_fixed": measures(harmonised, clean_atropos, air_mriqc, head.astype(np.uint8), rot),
        "mriqc_template_scale": measures(harmonised * (0.85 / 1000.0), soft, air_mriqc, head.astype(np.uint8), rot),
        "mriqc_artifact_voxels": int(np.count_nonzero(art)),
    })
print(json.dumps({"version": mriqc.__version__, "results": results}))
"""


def degrade(
    data: np.ndarray, *, kind: str, level: float, axis: int, seed: int = SEED
) -> np.ndarray:
    """One degraded copy of a magnitude image ``data`` (float32, same shape and units).

    ``kind`` ``noise``: Rician noise of sigma ``level`` x the 90th percentile
    of the positive intensities; ``ghost``: ``data + level * roll(data, N/2)``
    along ``axis`` (the N/2 ghost of alternating phase-encode lines);
    ``clean``: a copy.
    """
    x = np.asarray(data, dtype=np.float32)
    if kind == "clean":
        return x.copy()
    if kind == "noise":
        sigma = level * float(np.percentile(x[x > 0], 90))
        rng = np.random.default_rng(seed)
        real = x + rng.normal(0.0, sigma, x.shape).astype(np.float32)
        imag = rng.normal(0.0, sigma, x.shape).astype(np.float32)
        return np.sqrt(real * real + imag * imag)
    if kind == "ghost":
        return x + np.float32(level) * np.roll(x, x.shape[axis] // 2, axis=axis)
    message = f"unknown degradation {kind!r}; expected clean, noise or ghost"
    raise ValueError(message)


def series() -> list[tuple[str, float]]:
    """The images of the measurement: clean, then the noise and ghost levels."""
    return (
        [("clean", 0.0)]
        + [("noise", v) for v in NOISE_LEVELS]
        + [("ghost", v) for v in GHOST_LEVELS]
    )


def _maps(
    raw: Path, n4: Path, head_mask: Path, transform: Path, *, with_atropos: bool = True
) -> dict[str, np.ndarray]:
    """The masks and posteriors ``compute_iqms`` uses, on its canonical grid, for MRIQC."""
    from mriaudit.intensity import finite
    from mriaudit.iqm import grid as iqm_grid
    from mriaudit.iqm.masks import (
        HEAD_MARGIN_MM,
        artifact_mask,
        distance_mm,
        frame_mask,
        hat_mask,
        tissue_masks,
    )
    from mriaudit.iqm.priors import tissue_maps

    raw_img = iqm_grid._load(raw, "converted")
    grid = iqm_grid.Grid.of(raw_img)
    spacing = grid.spacing
    data = grid.canonical(
        finite(iqm_grid._load(n4, "n4").numpy().astype(np.float32), inf_to_zero=False)
    )
    np.clip(data, 0.0, None, out=data)
    head = grid.canonical(iqm_grid._load(head_mask, "head mask").numpy() > 0)
    frame = frame_mask(finite(grid.canonical(raw_img.numpy()), inf_to_zero=False))
    vox_to_mni, problem = iqm_grid.registration_affine(transform, grid)
    if vox_to_mni is None:
        message = f"no usable registration for {raw}: {problem}"
        raise RuntimeError(message)
    hat = hat_mask(data.shape, vox_to_mni=vox_to_mni, head=head, spacing_mm=spacing)
    distance = distance_mm(head, spacing)
    air = hat & (distance > HEAD_MARGIN_MM) & ~frame
    air &= ~artifact_mask(data, air, distance)
    (air,) = tissue_masks({"bg": air}, spacing).values()
    box, pvms, tpms, _ = tissue_maps(grid, data, head, transform, vox_to_mni, 2)
    masks = tissue_masks(pvms, spacing)
    atropos = atropos_pvms(data[box], tpms) if with_atropos else {}
    out = {"data": data, "head": head, "frame": frame, "hat": hat, "air": air}
    for name in pvms:
        for key, source in (("pv", pvms), ("mask", masks), ("atropos", atropos)):
            if name in source:
                full = np.zeros(data.shape, dtype=source[name].dtype)
                full[box] = source[name]
                out[f"{key}_{name}"] = full
    return out


def atropos_pvms(data: np.ndarray, priors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Tissue posteriors as MRIQC 24 segments (its ``init_brain_tissue_segmentation``).

    ANTs Atropos initialised with the prior probability images (CSF, GM, WM),
    prior weight 0.1, MRF smoothing 0.01 over a 1x1x1 neighbourhood, Atropos'
    default convergence (5 iterations, 0.001), inside the brain (where the
    priors are positive). ``priors`` are our warped, brain-normalised template
    priors (MRIQC warps the MNI 2009c TPMs and masks with SynthStrip).
    """
    import ants

    brain = sum(priors.values()) > 0
    image = ants.from_numpy(np.asarray(data, dtype=np.float32))
    mask = ants.from_numpy(brain.astype(np.float32))
    prior_images = [ants.from_numpy(priors[t].astype(np.float32)) for t in ("csf", "gm", "wm")]
    result = ants.atropos(
        a=image, x=mask, i=prior_images, m="[0.01,1x1x1]", c="[5,0.001]", priorweight=0.1
    )
    posteriors = [np.clip(p.numpy(), 0.0, 1.0) for p in result["probabilityimages"]]
    return {
        t: (p * brain).astype(np.float32)
        for t, p in zip(("csf", "gm", "wm"), posteriors, strict=True)
    }


def _phase_axis(image: nib.Nifti1Image) -> int:
    """Voxel axis of the anterior-posterior direction (F's phase-encode axis)."""
    codes = nib.aff2axcodes(image.affine)
    return next(i for i, c in enumerate(codes) if c in ("A", "P"))


def ours_and_maps(raw: Path, work: Path, *, threads: int = 2) -> tuple[dict[str, float], Path]:
    """Run n4, register and iqm on ``raw``; return our IQMs and the saved maps (``.npz``)."""
    from mriaudit.iqm.stage import compute_iqms
    from mriaudit.preprocess.bias import bias_correct_subject
    from mriaudit.preprocess.registration import register_subject

    n4, head, transform = work / "n4.nii.gz", work / "head.nii.gz", work / "xfm.mat"
    bias_correct_subject(
        raw, out_image=n4, out_mask=head, record_path=work / "n4.json", upstream=[], threads=threads
    )
    register_subject(
        n4,
        out_image=work / "reg.nii.gz",
        out_mask=work / "regmask.nii.gz",
        out_transform=transform,
        record_path=work / "register.json",
        upstream=[],
        threads=threads,
    )
    metrics, _, _ = compute_iqms(raw, n4, head, transform)
    maps = _maps(raw, n4, head, transform)
    path = work / "maps.npz"
    np.savez(path, **maps)
    return {m: float(metrics[m]) for m in METRICS}, path


def run_mriqc(python: str, maps: list[Path]) -> dict[str, Any]:
    """MRIQC 24's measures of every saved map set (see ``_RUNNER``), via ``python``."""
    result = subprocess.run(
        [python, "-c", _RUNNER, json.dumps([str(p) for p in maps])],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        message = f"MRIQC's functions failed under {python}: {result.stderr.strip()[-800:]}"
        raise RuntimeError(message)
    return json.loads(result.stdout.strip().splitlines()[-1])


def mriqc_version(python: str) -> str | None:
    """MRIQC's version importable by ``python``, or None."""
    try:
        result = subprocess.run(
            [python, "-c", "import mriqc; print(mriqc.__version__)"],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def rho(first: list[float], second: list[float]) -> float | None:
    """Spearman's rho of two equal-length lists (pairs with a NaN dropped); None below 3."""
    pairs = [
        (a, b) for a, b in zip(first, second, strict=True) if math.isfinite(a) and math.isfinite(b)
    ]
    if len(pairs) < 3:
        return None
    value = stats.spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic
    return round(float(value), 3) if math.isfinite(value) else None


def agreement_table(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per metric and variant: rho over the noise series, the ghost series and all images."""
    subsets = {
        "noise": [r for r in rows if r["kind"] in ("clean", "noise")],
        "ghost": [r for r in rows if r["kind"] in ("clean", "ghost")],
        "pooled": rows,
    }
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for metric in METRICS:
        name = metric.removeprefix("iqm_")
        table[metric] = {
            variant: {
                subset: rho(
                    [r["ours"][metric] for r in chosen],
                    [r["mriqc"][variant].get(name, math.nan) for r in chosen],
                )
                for subset, chosen in subsets.items()
            }
            for variant in VARIANTS
        }
    return table


def format_table(table: dict[str, dict[str, dict[str, float | None]]]) -> str:
    """The agreement as text: per series (pooled, noise, ghost) a metric x variant block of rho."""
    lines = []
    for subset in ("pooled", "noise", "ghost"):
        lines.append(f"{subset:<16}" + "".join(f"{v:>22}" for v in VARIANTS))
        for metric, by_variant in table.items():
            cells = [
                "n/a" if (v := by_variant[k][subset]) is None else f"{v:.2f}" for k in VARIANTS
            ]
            lines.append(f"{metric:<16}" + "".join(f"{c:>22}" for c in cells))
        lines.append("")
    return "\n".join(lines).rstrip()


def run(
    work: Path, data_root: Path, *, mriqc_python: str, person: str = PERSON, threads: int = 2
) -> dict[str, Any]:
    """The whole measurement under ``work``; returns what ``mriqc_agreement.json`` holds."""
    from mriaudit.iqm.stage import _itk_threads

    _itk_threads(threads)  # Atropos reads the thread count from the environment
    entry = heads.person(person)
    source = data_root / entry.source
    scratch = Path(tempfile.mkdtemp(dir=work, prefix="convert-"))
    try:
        converted = heads.dicom_to_nifti(source, scratch) if source.is_dir() else source
        image = nib.load(converted)
        clean = np.asarray(image.dataobj, dtype=np.float32)
        affine = image.affine
        axis = _phase_axis(image)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows: list[dict[str, Any]] = []
    maps: list[Path] = []
    for index, (kind, level) in enumerate(series()):
        folder = work / f"{index:02d}_{kind}_{level:g}"
        folder.mkdir(parents=True, exist_ok=True)
        raw = folder / "raw.nii.gz"
        if not raw.is_file():
            degraded = degrade(clean, kind=kind, level=level, axis=axis, seed=SEED + index)
            nib.save(nib.Nifti1Image(degraded, affine), raw)
        cached, path = folder / "ours.json", folder / "maps.npz"
        if cached.is_file() and path.is_file() and "atropos_wm" in np.load(path).files:
            ours = json.loads(cached.read_text())
        else:
            ours, path = ours_and_maps(raw, folder, threads=threads)
            files.write_text(cached, json.dumps(ours) + "\n")
        log.info("%s %g: %s", kind, level, ours)
        rows.append({"kind": kind, "level": level, "ours": ours})
        maps.append(path)
    theirs = run_mriqc(mriqc_python, maps)
    for row, result in zip(rows, theirs["results"], strict=True):
        row["mriqc"] = result
    for path in maps:  # large; the measurement is kept in the JSON
        path.unlink()
    return {
        "mriqc_version": theirs["version"],
        "person": person,
        "series": {"noise": list(NOISE_LEVELS), "ghost": list(GHOST_LEVELS), "seed": SEED},
        "rho": agreement_table(rows),
        "images": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mriaudit.bench_mriqc", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--work", type=Path, default=Path("results/bench/mriqc"))
    parser.add_argument("--shared-data", type=Path, default=PROJECT.parent / "shared" / "data")
    parser.add_argument(
        "--mriqc-python",
        default=None,
        help="an interpreter that imports MRIQC 24 (make bench-mriqc builds .venv-mriqc/bin/python)",
    )
    parser.add_argument("--person", default=PERSON, help="a person of mriaudit.heads (A-F)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    version = mriqc_version(args.mriqc_python) if args.mriqc_python else None
    if version is None or not version.startswith("24."):
        where = args.mriqc_python or "no --mriqc-python given"
        print(f"MRIQC agreement benchmark skipped: no MRIQC 24 ({where}, found {version})")
        return 0
    data_root = heads.unpack_shared(args.shared_data, args.work)
    if data_root is None:
        print(f"MRIQC agreement benchmark skipped: no real heads at {args.shared_data}")
        return 0
    result = run(
        args.work,
        data_root,
        mriqc_python=args.mriqc_python,
        person=args.person,
        threads=args.threads,
    )
    out = args.work / "mriqc_agreement.json"
    files.write_text(out, json.dumps(result, indent=2) + "\n")
    print(
        f"MRIQC {result['mriqc_version']} vs mriaudit, Spearman rho over {len(result['images'])} images"
    )
    print(format_table(result["rho"]))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
