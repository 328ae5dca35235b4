"""T2w and FLAIR detection on real heads and real lesions: ``python -m mriaudit.bench_contrasts``
(part of ``make bench``).

Two questions the demo cannot answer, one cohort, one run of the workflow with
``contrasts: [T1w, T2w, FLAIR]``:

- **Per anomaly kind, per contrast, on real anatomy.** The six real people of
  ``mriaudit.heads`` rendered ``renditions`` times each with a T2w and a FLAIR
  beside their T1 (the demo's contrast look-up tables on the person's own head),
  and each kind of ``demo.CONTRAST_ANOMALIES`` planted ``per_kind`` times in one
  contrast only, on people taken in turn. Training is leave one person out
  (``training.fold_groups`` by person, one fold per person), so no subject is
  scored by a model that saw its person.
- **Real lesions against a real healthy scan.** Real clinical series of
  ``../shared`` join the cohort as they were exported: the healthy T2 (no T1
  beside it), two stroke T2 (alone), the BraTS and TCGA gliomas (T1, T2, FLAIR),
  a FLAIR with a posterior hyperintensity (alone), and a T1 with a PD of the same
  person (the PD must be recognised, not audited as a T2w). They are outside
  ``reference`` (an external test set, as a curator would declare it), so each
  contrast's model never trains on them; a contrast without its T1w reaches the
  template on its own (``contrasts.stage``).

Labels are read only here, after the run; they never reach the workflow.
Figures go to ``contrasts.json`` under the work folder.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mriaudit import demo, heads
from mriaudit.aggregate import read_scores
from mriaudit.bench_detection import (
    cohort_options,
    cohort_parser,
    run_workflow,
    scores_for,
    shared_root,
    write_result,
)
from mriaudit.demo.plan import CONTRAST_ANOMALIES, SubjectPlan

log = logging.getLogger(__name__)

CONTRASTS = ("T2w", "FLAIR")

#: Real clinical scans of ../shared/data/nifti: folder -> (what it is, {file name in
#: the folder: path under nifti/}, {contrast: truth}). Truth 1: the contrast shows a
#: lesion; 0: healthy. A contrast not listed is not judged for that folder.
REAL_SCANS: dict[str, tuple[str, dict[str, str], dict[str, int]]] = {
    "real-healthy-t2": (
        "healthy T2, no T1 beside it",
        {"register_T2w.nii.gz": "niivue-demo-images/register_T2w.nii.gz"},
        {"T2w": 0},
    ),
    "real-stroke-clinical": (
        "stroke T2 (neurolabusc Clinical), no T1",
        {"T2.nii": "neurolabusc-Clinical/T2.nii"},
        {"T2w": 1},
    ),
    "real-stroke-arc": (
        "chronic stroke T2 (Aphasia Recovery Cohort), no T1",
        {"M2265_T2w.nii.gz": "ARC-T2lesion/M2265_T2w.nii.gz"},
        {"T2w": 1},
    ),
    "real-glioma-brats": (
        "glioma, BraTS T1, T1-contrast, T2, FLAIR (skull-stripped)",
        {
            f"BraTS-GLI-00001-000-{s}.nii.gz": f"BraTS-GLI-00001-000/BraTS-GLI-00001-000-{s}.nii.gz"
            for s in ("t1n", "t1c", "t2w", "t2f")
        },
        {"T2w": 1, "FLAIR": 1},
    ),
    "real-glioma-tcga": (
        "glioma, TCGA clinical 2D series with skull (5.5 mm slices)",
        {},  # every file of TCGA-FG-6692/raw
        {"T2w": 1, "FLAIR": 1},
    ),
    "real-flair-hyperintensity": (
        "FLAIR with a posterior hyperintensity (niivue), no T1",
        {"FLAIR.nii.gz": "niivue/FLAIR.nii.gz"},
        {"FLAIR": 1},
    ),
    "real-pd": (
        "healthy T1 and PD of one person: the PD is no T2w",
        {
            "chris_t1.nii.gz": "niivue-demo-images/chris_t1.nii.gz",
            "chris_PD.nii.gz": "niivue-demo-images/chris_PD.nii.gz",
        },
        {},
    ),
}
TCGA_RAW = "TCGA-FG-6692/raw"


def plan_cohort(
    prepared: dict[str, Path], *, renditions: int, per_kind: int, seed: int
) -> list[SubjectPlan]:
    """Every person ``renditions`` times normal with a T2w and a FLAIR, and each kind of
    ``CONTRAST_ANOMALIES`` ``per_kind`` times in its contrast only, on people in turn
    (renditions of their own: a person's normals keep their number)."""
    anomalies = [
        (contrast, kind, variant)
        for contrast in CONTRASTS
        for kind, variant in CONTRAST_ANOMALIES[contrast]
        for _ in range(per_kind)
    ]
    people = sorted(prepared)
    extra = -(-len(anomalies) // len(people))
    plans = demo.plan_real_heads(
        {p: str(path) for p, path in prepared.items()},
        renditions=renditions + extra,
        per_kind=1,
        seed=seed,
    )
    normals = {
        p: [plan for plan in plans if plan.kind == "normal" and plan.person == p] for p in people
    }
    kept = []
    for person in people:
        taken = anomalies[people.index(person) :: len(people)]
        for plan, (contrast, kind, variant) in zip(normals[person], taken, strict=False):
            kept.append(replace(plan, kind=kind, variant=variant, anomaly_contrast=contrast))
        kept += normals[person][len(taken) : len(taken) + renditions]
    return sorted(
        (replace(plan, contrasts=CONTRASTS, has_t2=False) for plan in kept),
        key=lambda plan: plan.folder,
    )


def write_real_scans(nifti: Path, input_dir: Path) -> pd.DataFrame:
    """The ``REAL_SCANS`` folders under ``input_dir``; their truth table (one row per
    folder and judged contrast)."""
    rows = []
    for folder, (what, files, truth) in REAL_SCANS.items():
        target = input_dir / folder
        target.mkdir(parents=True, exist_ok=True)
        sources = files or {p.name: f"{TCGA_RAW}/{p.name}" for p in (nifti / TCGA_RAW).glob("*")}
        for name, relative in sources.items():
            shutil.copyfile(nifti / relative, target / name)
        rows += [
            {"folder": folder, "what": what, "contrast": c, "truth": t} for c, t in truth.items()
        ]
    return pd.DataFrame(rows, columns=["folder", "what", "contrast", "truth"])


def build_cohort(
    work: Path, data_root: Path, *, renditions: int, per_kind: int, seed: int, voxel_size_mm: float
) -> tuple[Path, pd.DataFrame, pd.DataFrame]:
    """Render the heads' cohort and copy the real scans; returns (input_dir, rendered
    labels, real scans' truth)."""
    prepared = heads.prepared_heads(data_root, work / "heads")
    plans = plan_cohort(prepared, renditions=renditions, per_kind=per_kind, seed=seed)
    input_dir, labels_path = work / "input", work / "labels.tsv"
    recipe = {
        "heads": heads.RECIPE,
        "renditions": renditions,
        "per_kind": per_kind,
        "seed": seed,
        "voxel_size_mm": voxel_size_mm,
        "real": sorted(REAL_SCANS),
    }
    stamp = work / "cohort.json"
    if not labels_path.is_file() or not stamp.is_file() or json.loads(stamp.read_text()) != recipe:
        for stale in (input_dir, work / "out"):
            shutil.rmtree(stale, ignore_errors=True)
        labels_path.unlink(missing_ok=True)
        demo.write_cohort(plans, input_dir, voxel_size_mm=voxel_size_mm, labels_path=labels_path)
        stamp.write_text(json.dumps(recipe))
    real = write_real_scans(data_root / "nifti", input_dir)
    labels = pd.read_csv(labels_path, sep="\t", dtype={"folder": str}, keep_default_na=False)
    return input_dir, labels, real


def _flagged_for(frame: pd.DataFrame, contrast: str) -> np.ndarray:
    reasons = frame["flag_reasons"].fillna("").astype(str)
    return reasons.str.contains(f"{contrast}: ", regex=False).to_numpy()


def _ranking(frame: pd.DataFrame, column: str) -> np.ndarray:
    values = pd.to_numeric(frame.get(column), errors="coerce").to_numpy(dtype=float)
    low = np.nanmin(values) - 1.0 if np.isfinite(values).any() else 0.0
    return np.where(np.isfinite(values), values, low)


def contrast_figures(
    scores: pd.DataFrame, labels: pd.DataFrame, real: pd.DataFrame, contrast: str
) -> dict[str, Any]:
    """One contrast's figures: per kind on the rendered heads, and the real scans."""
    prefix = contrast.lower()
    audit, model = f"{prefix}_audit_score", f"{prefix}_anomaly_score"
    rendered = scores.merge(labels[["folder", "kind", "contrast", "person"]], on="folder")
    normal = rendered["kind"].to_numpy(dtype=str) == "normal"
    own = rendered["contrast"].to_numpy(dtype=str) == contrast
    anomalous = ~normal & own
    # Subjects with an anomaly in another contrast are normal in this one.
    negatives = normal | ~own
    flagged = _flagged_for(rendered, contrast)
    figures: dict[str, Any] = {
        "n_normal": int(negatives.sum()),
        "false_flags": sorted(rendered.loc[negatives & flagged, "folder"].tolist()),
        "kinds": {},
        "real": [],
    }
    kinds = ["overall", *sorted(set(rendered.loc[anomalous, "kind"]))]
    for kind in kinds:
        members = anomalous if kind == "overall" else anomalous & (rendered["kind"] == kind)
        keep = members | negatives
        entry: dict[str, Any] = {"n": int(members.sum())}
        for name, column in (("audit", audit), ("model", model)):
            entry[name] = scores_for(members[keep], _ranking(rendered, column)[keep])
        entry["tpr"] = round(float(flagged[members].mean()), 4) if members.any() else None
        entry["missed"] = sorted(rendered.loc[members & ~flagged, "folder"].tolist())
        figures["kinds"][kind] = entry
    # The real scans, placed among the rendered normals of this contrast.
    normal_audit = _ranking(rendered, audit)[negatives]
    by_folder = scores.set_index("folder")
    for row in real[real["contrast"] == contrast].itertuples(index=False):
        entry = by_folder.loc[row.folder]
        value = _rounded(entry.get(audit))
        figures["real"].append(
            {
                "folder": row.folder,
                "what": row.what,
                "truth": int(row.truth),
                "status": str(entry.get(f"{prefix}_status", "")),
                "audit_score": value,
                "anomaly_score": _rounded(entry.get(model)),
                "flagged": f"{contrast}: " in str(entry.get("flag_reasons") or ""),
                "above_rendered_normals": None
                if value is None
                else round(float((normal_audit < value).mean()), 3),
            }
        )
    # Each score's ranking of the real lesions against the real healthy scan.
    figures["real_lesions_above_real_healthy"] = {}
    for name in ("audit_score", "anomaly_score"):
        healthy = [r[name] for r in figures["real"] if r["truth"] == 0 and r[name] is not None]
        lesioned = [r[name] for r in figures["real"] if r["truth"] == 1 and r[name] is not None]
        figures["real_lesions_above_real_healthy"][name] = (
            {"above": sum(v > max(healthy) for v in lesioned), "of": len(lesioned)}
            if healthy
            else None
        )
    return figures


def _rounded(value: Any) -> float | None:
    number = pd.to_numeric(value, errors="coerce")
    return None if pd.isna(number) else round(float(number), 3)


def pd_recognised(work: Path) -> dict[str, Any]:
    """What the cohort's T2w column says of the subject whose only other image is a PD."""
    scores = read_scores(work / "out" / "cohort" / "scores.tsv")
    row = scores.loc[scores["folder"] == "real-pd"].iloc[0]
    return {"t2w_status": str(row.get("t2w_status")), "t2w_reason": str(row.get("t2w_reason"))}


def table(result: dict[str, Any]) -> str:
    """The figures as plain text, one block per contrast."""
    lines = []
    for contrast, figures in result["contrasts"].items():
        lines.append(
            f"{contrast} (rendered real heads, leave one person out): {figures['n_normal']} "
            f"normal in {contrast}; false flags: {', '.join(figures['false_flags']) or 'none'}"
        )
        lines.append(
            f"  {'kind':<10}{'n':>3}{'audit AUROC':>13}{'AUPRC':>7}"
            f"{'model AUROC':>13}{'AUPRC':>7}{'flag TPR':>10}"
        )
        for kind, entry in figures["kinds"].items():
            cells = "".join(
                f"{_cell(entry[name]['auroc']):>13}{_cell(entry[name]['auprc']):>7}"
                for name in ("audit", "model")
            )
            lines.append(f"  {kind:<10}{entry['n']:>3}{cells}{_cell(entry['tpr']):>10}")
        lines.append(f"  real scans ({contrast} audit score; share of rendered normals below):")
        for row in figures["real"]:
            lines.append(
                f"    {row['folder']:<28}{'lesion' if row['truth'] else 'healthy':<8}"
                f"{_cell(row['audit_score']):>8}{_cell(row['above_rendered_normals']):>7}"
                f"  {'flagged' if row['flagged'] else '-'}  ({row['what']})"
            )
        for name, above in figures["real_lesions_above_real_healthy"].items():
            if above is not None:
                lines.append(
                    f"  real lesions above the real healthy scan by {name}: "
                    f"{above['above']} of {above['of']}"
                )

        lines.append("")
    lines.append(f"PD beside a T1: T2w {result['pd']['t2w_status']} ({result['pd']['t2w_reason']})")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def run(
    work: Path,
    data_root: Path,
    *,
    renditions: int = 2,
    per_kind: int = 2,
    seed: int = 0,
    voxel_size_mm: float = 1.2,
    cores: int = 2,
) -> dict[str, Any]:
    """Build the cohort under ``work``, run the workflow, return the figures."""
    input_dir, labels, real = build_cohort(
        work,
        data_root,
        renditions=renditions,
        per_kind=per_kind,
        seed=seed,
        voxel_size_mm=voxel_size_mm,
    )
    groups = work / "person_groups.tsv"
    labels.rename(columns={"person": "group"})[["folder", "group"]].to_csv(
        groups, sep="\t", index=False
    )
    persons = int(labels["person"].nunique())
    config = {
        "labels": "",  # labels never reach the workflow here
        "contrasts": ["T1w", *CONTRASTS],
        "reference": sorted(labels["folder"]),
        "training": {"fold_groups": str(groups), "folds": persons},
    }
    wall = run_workflow(
        input_dir,
        work / "out",
        Path(),
        cores=cores,
        config=config,
        configfile=work / "config.yaml",
    )
    scores = read_scores(work / "out" / "cohort" / "scores.tsv")
    return {
        "cohort": {
            "persons": persons,
            "renditions": renditions,
            "per_kind": per_kind,
            "seed": seed,
            "voxel_size_mm": voxel_size_mm,
            "real_scans": sorted(REAL_SCANS),
        },
        "wall_s": round(wall, 1),
        "contrasts": {c: contrast_figures(scores, labels, real, c) for c in CONTRASTS},
        "pd": pd_recognised(work),
    }


def main(argv: list[str] | None = None) -> int:
    parser = cohort_parser(
        "python -m mriaudit.bench_contrasts",
        __doc__.split("\n")[0],
        work="results/bench/contrasts",
        renditions=2,
    )
    args = parser.parse_args(argv)
    data_root = shared_root(args, what="contrast")
    if data_root is None:
        return 0
    result = run(args.work, data_root, **cohort_options(args))
    write_result(result, args.work / "contrasts.json", table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
