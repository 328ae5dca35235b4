"""Output names of the workflow, BIDS-derivatives style, built in one place.

Every rule, script and test that needs an output path asks this module; no
path is concatenated anywhere else. ``out`` is the workflow's ``output_dir``
and ``sub`` the subject's BIDS id (without ``sub-``). Passing the literal
string ``"{bids_id}"`` as ``sub`` yields Snakemake wildcard patterns.
"""

from __future__ import annotations

from pathlib import Path

#: Stages of the per-subject ``preprocess`` job, in order.
PREPROCESS_STAGES: tuple[str, ...] = ("inventory", "convert", "n4", "register", "iqm")
#: Per-subject stages that write a status record (``*_qc.json``), in DAG order.
STAGES: tuple[str, ...] = (*PREPROCESS_STAGES, "score")


def subject_dir(out: str | Path, sub: str) -> Path:
    return Path(out) / f"sub-{sub}"


def _anat(out: str | Path, sub: str, suffix: str) -> Path:
    return subject_dir(out, sub) / "anat" / f"sub-{sub}_{suffix}"


def record(out: str | Path, sub: str, stage: str) -> Path:
    """Status record of one per-subject stage: ``sub-<id>_desc-<stage>_qc.json``."""
    if stage not in STAGES:
        message = f"unknown stage {stage!r}; expected one of {STAGES}"
        raise ValueError(message)
    return subject_dir(out, sub) / f"sub-{sub}_desc-{stage}_qc.json"


def series_table(out: str | Path, sub: str) -> Path:
    """Every series (or NIfTI file) found for the subject, with the selection verdict."""
    return subject_dir(out, sub) / f"sub-{sub}_series.tsv"


def t1w(out: str | Path, sub: str) -> Path:
    """Converted series, dcm2niix's voxel order and affine."""
    return _anat(out, sub, "T1w.nii.gz")


def t1w_sidecar(out: str | Path, sub: str) -> Path:
    return _anat(out, sub, "T1w.json")


def n4(out: str | Path, sub: str) -> Path:
    return _anat(out, sub, "desc-n4_T1w.nii.gz")


def head_mask(out: str | Path, sub: str) -> Path:
    """Head mask on the native grid (uint8)."""
    return _anat(out, sub, "desc-head_mask.nii.gz")


def preproc(out: str | Path, sub: str) -> Path:
    """Bias-corrected image resampled to the MNI152 template grid."""
    return _anat(out, sub, "space-MNI152_desc-preproc_T1w.nii.gz")


def brain_mask(out: str | Path, sub: str) -> Path:
    """Template brain mask on the template grid (what the model and scores use)."""
    return _anat(out, sub, "space-MNI152_desc-brain_mask.nii.gz")


def transform(out: str | Path, sub: str) -> Path:
    """Affine from native T1w to MNI152 (ITK/ANTs ``.mat``)."""
    return _anat(out, sub, "from-T1w_to-MNI152_mode-image_xfm.mat")


def anomaly_map(out: str | Path, sub: str) -> Path:
    return _anat(out, sub, "space-MNI152_desc-anomaly_map.nii.gz")


def _figure(out: str | Path, sub: str, suffix: str) -> Path:
    return subject_dir(out, sub) / "figures" / f"sub-{sub}_{suffix}"


def native_thumbnail(out: str | Path, sub: str) -> Path:
    """Three planes of the converted image, whole field of view (the report's native view)."""
    return _figure(out, sub, "desc-native_T1w.webp")


def anomaly_thumbnail(out: str | Path, sub: str) -> Path:
    """Three planes of the registered image with the anomaly map over it."""
    return _figure(out, sub, "space-MNI152_desc-anomaly_T1w.webp")


def subject_images(out: str | Path, sub: str) -> dict[str, Path]:
    """Every image (and transform) a subject can have, by name. Only the ones its stages
    made exist: a subject that failed or has no series has none (no placeholders)."""
    return {
        "T1w": t1w(out, sub),
        "T1w_sidecar": t1w_sidecar(out, sub),
        "n4": n4(out, sub),
        "head_mask": head_mask(out, sub),
        "preproc": preproc(out, sub),
        "brain_mask": brain_mask(out, sub),
        "transform": transform(out, sub),
        "anomaly_map": anomaly_map(out, sub),
        "native_thumbnail": native_thumbnail(out, sub),
        "anomaly_thumbnail": anomaly_thumbnail(out, sub),
    }


def subject_scores(out: str | Path, sub: str) -> Path:
    """Everything known about the subject, one JSON."""
    return subject_dir(out, sub) / f"sub-{sub}_scores.json"


def model_checkpoint(out: str | Path) -> Path:
    return Path(out) / "model" / "model.pt"


def model_sidecar(out: str | Path) -> Path:
    return Path(out) / "model" / "model.json"


def model_scores(out: str | Path) -> Path:
    """Every subject's score-stage status and raw score, one row each (the score job's table)."""
    return Path(out) / "model" / "anomaly_scores.tsv"


def cohort_dir(out: str | Path) -> Path:
    return Path(out) / "cohort"


def scores_table(out: str | Path) -> Path:
    return cohort_dir(out) / "scores.tsv"


def exclusions_table(out: str | Path) -> Path:
    return cohort_dir(out) / "exclusions.tsv"


def metrics(out: str | Path) -> Path:
    return cohort_dir(out) / "metrics.json"


def report(out: str | Path) -> Path:
    return cohort_dir(out) / "report.html"


def stage_table(out: str | Path) -> Path:
    """Status of every preprocess stage of every subject: what the cohort rules start from."""
    return cohort_dir(out) / "stages.tsv"


def cohort_table(out: str | Path) -> Path:
    """Subjects found in input_dir (folder, bids_id, collision or naming problems)."""
    return cohort_dir(out) / "subjects.tsv"


def log(out: str | Path, rule: str, sub: str | None = None) -> Path:
    name = f"sub-{sub}.log" if sub is not None else f"{rule}.log"
    return Path(out) / "logs" / rule / name


def benchmark(out: str | Path, rule: str, sub: str | None = None) -> Path:
    name = f"sub-{sub}.tsv" if sub is not None else f"{rule}.tsv"
    return Path(out) / "benchmarks" / rule / name
