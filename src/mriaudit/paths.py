"""Output names of the workflow, BIDS-derivatives style, built in one place.

Every rule, script and test that needs an output path asks this module; no
path is concatenated anywhere else. ``out`` is the workflow's ``output_dir``
and ``sub`` the scan's BIDS id: the file-name prefix without ``sub-``, i.e. the
subject label followed by the session and run entities when the scan has them
(``01``, ``01_ses-1``, ``02_run-2``, ``03_ses-b_run-1``). A scan's files live
in ``sub-<subject>/[ses-<session>/]``, named ``sub-<bids_id>_...``, as BIDS
lays them out. Passing the literal string ``"{bids_id}"`` as ``sub`` yields
Snakemake wildcard patterns, the folder then being the wildcard ``{scan_dir}``.

Template-space images name the space as TemplateFlow does: the nilearn MNI152
template is ICBM 2009a symmetric (``MNI152NLin2009aSym``) and ``res-<mm>`` is
its grid (``template_resolution``).
"""

from __future__ import annotations

from pathlib import Path

#: Stages of the per-subject ``preprocess`` job, in order.
PREPROCESS_STAGES: tuple[str, ...] = ("inventory", "convert", "n4", "register", "iqm")
#: Per-subject stages that write a status record (``*_qc.json``), in DAG order.
STAGES: tuple[str, ...] = (*PREPROCESS_STAGES, "score")


#: TemplateFlow's name of the template (nilearn's ICBM 2009a symmetric MNI152).
SPACE = "MNI152NLin2009aSym"
#: The scan wildcard of the rules, and the folder wildcard it implies.
WILDCARD = "{bids_id}"
SCAN_DIR_WILDCARD = "{scan_dir}"
_ENTITIES = ("ses", "run")


def entities(sub: str) -> dict[str, str]:
    """``"01_ses-1_run-2"`` -> ``{"sub": "01", "ses": "1", "run": "2"}`` (absent ones left out)."""
    subject, *rest = sub.split("_")
    found = {"sub": subject}
    for part in rest:
        key, _, value = part.partition("-")
        if key not in _ENTITIES or not value:
            message = f"BIDS id {sub!r}: {part!r} is not a ses-<label> or run-<index> entity"
            raise ValueError(message)
        found[key] = value
    return found


def scan_id(subject: str, *, session: str = "", run: str = "") -> str:
    """The BIDS id of a scan from its entity labels (the inverse of :func:`entities`)."""
    parts = [subject]
    if session:
        parts.append(f"ses-{session}")
    if run:
        parts.append(f"run-{run}")
    return "_".join(parts)


def scan_dir(sub: str) -> str:
    """The scan's folder relative to ``out``: ``sub-01`` or ``sub-01/ses-1``."""
    found = entities(sub)
    folder = f"sub-{found['sub']}"
    return f"{folder}/ses-{found['ses']}" if "ses" in found else folder


def subject_dir(out: str | Path, sub: str) -> Path:
    """The scan's folder (``sub-01``, or ``sub-01/ses-1`` for a session)."""
    if sub == WILDCARD:
        return Path(out) / SCAN_DIR_WILDCARD
    return Path(out) / scan_dir(sub)


def _anat(out: str | Path, sub: str, suffix: str) -> Path:
    return subject_dir(out, sub) / "anat" / f"sub-{sub}_{suffix}"


def record(out: str | Path, sub: str, stage: str) -> Path:
    """Status record of one per-subject stage: ``sub-<id>_desc-<stage>_qc.json``."""
    if stage not in STAGES:
        message = f"unknown stage {stage!r}; expected one of {STAGES}"
        raise ValueError(message)
    return subject_dir(out, sub) / f"sub-{sub}_desc-{stage}_qc.json"


#: The contrasts audited beside the T1w (config ``contrasts``), as BIDS suffixes.
EXTRA_CONTRASTS: tuple[str, ...] = ("T2w", "FLAIR")


def _extra_contrast(contrast: str) -> str:
    if contrast not in EXTRA_CONTRASTS:
        message = f"unknown contrast {contrast!r}; expected one of {EXTRA_CONTRASTS}"
        raise ValueError(message)
    return contrast


def contrast_record(out: str | Path, sub: str, contrast: str) -> Path:
    """Status record of a contrast audited beside the T1w (its whole chain: conversion, N4,
    co-registration to the T1w, the cross-contrast checks): ``sub-<id>_desc-<contrast>_qc.json``."""
    return subject_dir(out, sub) / f"sub-{sub}_desc-{_extra_contrast(contrast)}_qc.json"


def contrast_image(out: str | Path, sub: str, contrast: str) -> Path:
    """A contrast's converted series (``sub-<id>_T2w.nii.gz``, ``sub-<id>_FLAIR.nii.gz``)."""
    return _anat(out, sub, f"{_extra_contrast(contrast)}.nii.gz")


def contrast_sidecar(out: str | Path, sub: str, contrast: str) -> Path:
    return _anat(out, sub, f"{_extra_contrast(contrast)}.json")


def contrast_to_t1w(out: str | Path, sub: str, contrast: str) -> Path:
    """Rigid transform of a contrast onto the subject's T1w (ITK/ANTs ``.mat``, T1w points
    to the contrast's points), fMRIPrep's name."""
    return _anat(out, sub, f"from-{_extra_contrast(contrast)}_to-T1w_mode-image_xfm.mat")


def contrast_to_template(out: str | Path, sub: str, contrast: str) -> Path:
    """Affine of a contrast registered to the template directly, when its subject has no
    usable T1w (ITK/ANTs ``.mat``, template points to the contrast's points)."""
    return _anat(out, sub, f"from-{_extra_contrast(contrast)}_to-{SPACE}_mode-image_xfm.mat")


def contrast_preproc(out: str | Path, sub: str, contrast: str, *, res: int) -> Path:
    """A bias-corrected contrast on the template grid, through its T1w's transform (or its
    own, :func:`contrast_to_template`, without a usable T1w)."""
    return _anat(out, sub, f"{_template(res)}_desc-preproc_{_extra_contrast(contrast)}.nii.gz")


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


def _template(res: int) -> str:
    return f"space-{SPACE}_res-{res}"


def preproc(out: str | Path, sub: str, *, res: int) -> Path:
    """Bias-corrected image resampled to the template grid of ``res`` mm."""
    return _anat(out, sub, f"{_template(res)}_desc-preproc_T1w.nii.gz")


def brain_mask(out: str | Path, sub: str, *, res: int) -> Path:
    """Template brain mask on the template grid (what the model and scores use)."""
    return _anat(out, sub, f"{_template(res)}_desc-brain_mask.nii.gz")


def transform(out: str | Path, sub: str) -> Path:
    """Affine from native T1w to the template (ITK/ANTs ``.mat``; BIDS has no transform
    suffix yet, so ``.bidsignore`` lists it; the name is fMRIPrep's convention)."""
    return _anat(out, sub, f"from-T1w_to-{SPACE}_mode-image_xfm.mat")


def _contrast(contrast: str) -> str:
    return contrast if contrast == "T1w" else _extra_contrast(contrast)


def anomaly_map(out: str | Path, sub: str, *, res: int, contrast: str = "T1w") -> Path:
    """Voxel anomaly map (robust z) on the template grid, of the T1w or of another
    ``contrast``'s model. BIDS derivatives keep the source's suffix and say what was
    derived with ``desc``; the sidecar says it is a z-map."""
    return _anat(out, sub, f"{_template(res)}_desc-anomaly_{_contrast(contrast)}.nii.gz")


def _figure(out: str | Path, sub: str, suffix: str) -> Path:
    return subject_dir(out, sub) / "figures" / f"sub-{sub}_{suffix}"


def native_thumbnail(out: str | Path, sub: str) -> Path:
    """Three planes of the converted image, whole field of view (the report's native view)."""
    return _figure(out, sub, "desc-native_T1w.webp")


def anomaly_thumbnail(out: str | Path, sub: str, *, contrast: str = "T1w") -> Path:
    """Three planes of the registered image (of ``contrast``) with the anomaly map over it."""
    return _figure(out, sub, f"space-{SPACE}_desc-anomaly_{_contrast(contrast)}.webp")


def contrast_score_record(out: str | Path, sub: str, contrast: str) -> Path:
    """Status record of the score stage of a contrast's model: ``sub-<id>_desc-<contrast>score_qc.json``."""
    return subject_dir(out, sub) / f"sub-{sub}_desc-{_extra_contrast(contrast)}score_qc.json"


def contrast_native_thumbnail(out: str | Path, sub: str, contrast: str) -> Path:
    """Three planes of a contrast's converted image, whole field of view."""
    return _figure(out, sub, f"desc-native_{_extra_contrast(contrast)}.webp")


def contrast_template_thumbnail(out: str | Path, sub: str, contrast: str) -> Path:
    """Three planes of a contrast on the template grid (beside the T1w's, the same planes)."""
    return _figure(out, sub, f"space-{SPACE}_desc-preproc_{_extra_contrast(contrast)}.webp")


def sidecar(image: str | Path) -> Path:
    """The JSON sidecar of a NIfTI image (same name, ``.json``)."""
    image = Path(image)
    return image.with_name(image.name.removesuffix(".gz").removesuffix(".nii") + ".json")


def subject_images(out: str | Path, sub: str, *, res: int) -> dict[str, Path]:
    """Every image (and transform) a subject can have, by name. Only the ones its stages
    made exist: a subject that failed or has no series has none (no placeholders)."""
    return {
        "T1w": t1w(out, sub),
        "T1w_sidecar": t1w_sidecar(out, sub),
        "n4": n4(out, sub),
        "head_mask": head_mask(out, sub),
        "preproc": preproc(out, sub, res=res),
        "brain_mask": brain_mask(out, sub, res=res),
        "transform": transform(out, sub),
        "anomaly_map": anomaly_map(out, sub, res=res),
        "native_thumbnail": native_thumbnail(out, sub),
        "anomaly_thumbnail": anomaly_thumbnail(out, sub),
        **{
            name: path
            for contrast in EXTRA_CONTRASTS
            for name, path in (
                (contrast, contrast_image(out, sub, contrast)),
                (f"{contrast}_sidecar", contrast_sidecar(out, sub, contrast)),
                (f"{contrast}_to_T1w", contrast_to_t1w(out, sub, contrast)),
                (f"{contrast}_preproc", contrast_preproc(out, sub, contrast, res=res)),
                (f"{contrast}_native_thumbnail", contrast_native_thumbnail(out, sub, contrast)),
                (f"{contrast}_template_thumbnail", contrast_template_thumbnail(out, sub, contrast)),
                (f"{contrast}_anomaly_map", anomaly_map(out, sub, res=res, contrast=contrast)),
                (
                    f"{contrast}_anomaly_thumbnail",
                    anomaly_thumbnail(out, sub, contrast=contrast),
                ),
            )
        },
    }


def subject_scores(out: str | Path, sub: str) -> Path:
    """Everything known about the subject, one JSON."""
    return subject_dir(out, sub) / f"sub-{sub}_scores.json"


def _model_dir(out: str | Path, contrast: str) -> Path:
    """``model/`` for the T1w's model, ``model/<contrast>/`` for another contrast's
    (``"{contrast}"``: the rules' wildcard)."""
    if contrast == "T1w":
        return Path(out) / "model"
    if contrast != "{contrast}":
        _extra_contrast(contrast)
    return Path(out) / "model" / contrast


def model_checkpoint(out: str | Path, *, contrast: str = "T1w") -> Path:
    return _model_dir(out, contrast) / "model.pt"


def model_sidecar(out: str | Path, *, contrast: str = "T1w") -> Path:
    return _model_dir(out, contrast) / "model.json"


def model_scores(out: str | Path, *, contrast: str = "T1w") -> Path:
    """Every subject's score-stage status and raw score, one row each (the score jobs' tables, merged)."""
    return _model_dir(out, contrast) / "anomaly_scores.tsv"


def score_shard(out: str | Path, shard: str, *, contrast: str = "T1w") -> Path:
    """The score table of one score job: the slice ``shard`` (``"001of004"``, ``"{shard}"``
    for the rule's pattern) of the cohort (see ``cohort.score_shards``)."""
    return _model_dir(out, contrast) / "shards" / f"anomaly_scores_shard-{shard}.tsv"


def dataset_description(out: str | Path) -> Path:
    """What makes ``out`` a BIDS derivatives dataset (with ``README`` and ``.bidsignore``)."""
    return Path(out) / "dataset_description.json"


def bidsignore(out: str | Path) -> Path:
    return Path(out) / ".bidsignore"


def dataset_readme(out: str | Path) -> Path:
    return Path(out) / "README.md"


def index_cache(out: str | Path) -> Path:
    """pybids' index of a BIDS input, kept between Snakemake processes (``bids_input``)."""
    return Path(out) / ".mriaudit" / "bids-index"


def mriqc_dir(out: str | Path) -> Path:
    """The IQMs in MRIQC's layout (``group_T1w.tsv`` and per-image JSON)."""
    return cohort_dir(out) / "mriqc"


def mriqc_group_table(out: str | Path) -> Path:
    """Every scan's IQMs under MRIQC's names, as MRIQC's group table."""
    return mriqc_dir(out) / "group_T1w.tsv"


def mriqc_agreement(out: str | Path) -> Path:
    """Per metric, how the IQMs agree with those of the MRIQC run in ``mriqc_dir``."""
    return mriqc_dir(out) / "agreement.tsv"


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


def _per_rule(
    out: str | Path, kind: str, rule: str, sub: str | None, suffix: str, shard: str | None
) -> Path:
    """``<kind>/<rule>/<rule><suffix>``, per scan ``<kind>/<rule>/<scan folder>/sub-<id><suffix>``
    (the scan's folder too, as Snakemake wants every wildcard of a rule's outputs here), or
    per shard of the cohort ``<kind>/<rule>/<rule>_shard-<shard><suffix>``."""
    if sub is not None:
        return subject_dir(Path(out) / kind / rule, sub) / f"sub-{sub}{suffix}"
    if shard is not None:
        return Path(out) / kind / rule / f"{rule}_shard-{shard}{suffix}"
    return Path(out) / kind / rule / f"{rule}{suffix}"


def log(out: str | Path, rule: str, sub: str | None = None, *, shard: str | None = None) -> Path:
    return _per_rule(out, "logs", rule, sub, ".log", shard)


def benchmark(
    out: str | Path, rule: str, sub: str | None = None, *, shard: str | None = None
) -> Path:
    return _per_rule(out, "benchmarks", rule, sub, ".tsv", shard)
