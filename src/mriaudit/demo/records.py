"""Synthetic cohort records at scale: what the workflow writes, without running it.

``synthetic_cohort`` writes the per-subject stage records, shared images and a
labels file of ``n`` subjects, so the cohort rules (aggregate, report) can be
measured at 1,000 to 100,000 subjects (``mriaudit.bench``) and the report
tested at the size a curator meets (tests). No image is rendered per subject.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from mriaudit import aggregate, paths, records, template, thumbnails
from mriaudit.aggregate import aggregate_cohort
from mriaudit.report import build_report


def synthetic_cohort(root: Path, n: int, *, seed: int = 0) -> dict[str, Path]:
    """``n`` subjects' stage records as the workflow writes them (6 % anomalous, 2 % failed).

    Every IQM column is present (the table has its real width); subjects that
    are not failed link one shared registered image and anomaly map (an 8 mm
    ball) and the report's two pictures, so the report can draw montages and
    subject views. Returns ``input``, ``out``, ``labels``.
    """
    rng = np.random.default_rng(seed)
    grid = template.load_template(resolution=2)
    iqm_names = [f"iqm_{name}" for name in aggregate.iqm_tables()[0] if name != "inu_range"]
    input_dir, out = root / "input", root / "out"
    image, anomaly = root / "image.nii.gz", root / "map.nii.gz"
    root.mkdir(parents=True, exist_ok=True)
    nib.save(grid, image)
    centre_mm = np.array([20.0, -10.0, 10.0])
    ijk = np.indices(grid.shape).reshape(3, -1).T
    world = nib.affines.apply_affine(grid.affine, ijk).reshape(*grid.shape, 3)
    ball = np.linalg.norm(world - centre_mm, axis=-1) < 8.0
    nib.save(nib.Nifti1Image((0.1 + 5.0 * ball).astype(np.float32), grid.affine), anomaly)
    # The report's two pictures per subject, at their real size (linked like the images).
    native, picture = root / "native.webp", root / "anomaly.webp"
    thumbnails.save_picture(thumbnails.native_picture(grid), native)
    anomaly_array = np.asarray(nib.load(anomaly).dataobj, dtype=np.float32)
    thumbnails.write_anomaly_thumbnail(image, anomaly_array, picture)
    lines = ["folder\ttruth"]
    for i in range(n):
        bids_id = f"{i:05d}"
        (input_dir / f"sub-{bids_id}").mkdir(parents=True)
        anomalous, failed = rng.random() < 0.06, rng.random() < 0.02
        lines.append(f"sub-{bids_id}\t{int(anomalous)}")
        header = {
            "hdr_manufacturer": "SIEMENS" if i % 3 else "GE MEDICAL SYSTEMS",
            "hdr_field_strength": 3.0,
            "hdr_tr": 2300.0 if i % 3 else 7.3,
            "hdr_te": 2.98 if i % 3 else 3.0,
            "hdr_voxel_x": 1.0,
            "hdr_voxel_y": 1.0,
            "hdr_voxel_z": 1.0,
        }
        iqms = dict(zip(iqm_names, rng.normal(10, 1, len(iqm_names)), strict=True))
        iqms["iqm_snr_wm"] = rng.normal(10, 1) - 6 * anomalous * rng.random()
        stage_records = {
            "inventory": records.make_record("inventory", metrics=header),
            "convert": records.make_record("convert", metrics={"conv_n_warnings": 0}),
            "n4": records.make_record("n4", metrics={"iqm_inu_range": rng.normal(0.3, 0.03)}),
            "register": records.make_record("register", metrics={"reg_similarity": 0.8}),
            "iqm": records.make_record("iqm", metrics=iqms),
            "score": records.make_record(
                "score",
                metrics={"anomaly_raw": rng.normal(1.0, 0.1) + anomalous * rng.uniform(0.2, 1.0)},
                fold=i % 3,
                in_reference=True,
                top_regions=[{"centroid_mm": centre_mm.tolist(), "volume_ml": 1.0, "peak": 3.0}],
            ),
        }
        if failed:
            reason = "dcm2niix: no image"
            stage_records["convert"] = records.make_record(
                "convert", status="failed", reason=reason
            )
            for stage in ("n4", "register", "iqm", "score"):
                stage_records[stage] = records.make_record(
                    stage, status="failed", reason=reason, skipped=True
                )
        for stage, record in stage_records.items():
            path = paths.record(out, bids_id, stage)
            path.parent.mkdir(parents=True, exist_ok=True)
            # Compact JSON: the same content as records.write_json, much faster to make.
            path.write_text(json.dumps(record))
        preproc, amap = paths.preproc(out, bids_id, res=2), paths.anomaly_map(out, bids_id, res=2)
        preproc.parent.mkdir(parents=True, exist_ok=True)
        if not failed:
            preproc.symlink_to(image)
            amap.symlink_to(anomaly)
            for link, target in (
                (paths.native_thumbnail(out, bids_id), native),
                (paths.anomaly_thumbnail(out, bids_id), picture),
            ):
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(target)
    labels = root / "labels.tsv"
    labels.write_text("\n".join(lines) + "\n")
    return {"input": input_dir, "out": out, "labels": labels}


def synthetic_report(root: Path, n: int, *, report: dict | None = None) -> dict:
    """``synthetic_cohort`` of ``n`` subjects, aggregated and reported as the two rules do.

    ``report`` is the config's ``report`` section. Returns ``page`` (the report's
    path), ``frame`` (the scores table) and ``build_s`` (seconds of the report alone).
    """
    cohort = synthetic_cohort(root, n)
    out = cohort["out"]
    frame = aggregate_cohort(
        cohort["input"],
        out,
        labels_path=str(cohort["labels"]),
        flag={},
        out_scores=paths.scores_table(out),
        out_exclusions=paths.exclusions_table(out),
        out_subjects=paths.cohort_table(out),
        resolution=2,
    )
    start = time.perf_counter()
    build_report(
        out,
        scores_tsv=paths.scores_table(out),
        exclusions_tsv=paths.exclusions_table(out),
        metrics_json=None,
        config={"flag": {}, "report": dict(report or {})},
        out_html=paths.report(out),
    )
    return {"page": paths.report(out), "frame": frame, "build_s": time.perf_counter() - start}
