# Cohort listing and named input functions; everything else lives in src/mriaudit.
from pathlib import Path

from mriaudit import cohort, paths, series

OUT = config["output_dir"]
INPUT_DIR = Path(config["input_dir"])
LABELS = config["labels"]
# config model as {"method", "checkpoint"} (a plain string is the checkpoint).
MODEL = cohort.model_settings(config["model"])
TRAIN_MODEL = MODEL["checkpoint"] == "train"
# The contrasts audited beside the T1w (config contrasts), in paths.EXTRA_CONTRASTS order.
EXTRA_CONTRASTS = [c for c in paths.EXTRA_CONTRASTS if c in config["contrasts"]]
# A bad series regex is a configuration error: fail before any job, naming the key.
series.resolve_rules(config["series"])

# Subjects are known from a directory listing, so the DAG is fixed before the run.
# A missing input_dir leaves the cohort empty here (lint and --help still work)
# and fails with a message naming the key as soon as targets are needed.
COHORT = (
    cohort.list_subjects(INPUT_DIR, cache_dir=paths.index_cache(OUT)) if INPUT_DIR.is_dir() else []
)
SUBJECTS = cohort.processed_ids(COHORT)
UNITS = {s.bids_id: s for s in COHORT if s.processed}
# The score jobs' slices of the cohort ({shard label: bids ids}).
SHARDS = cohort.score_shards(SUBJECTS, subjects_per_job=config["score"]["subjects_per_job"])
# Labels that name no subject folder are a configuration error too.
if LABELS and COHORT:
    try:
        cohort.check_labels(LABELS, COHORT)
    except ValueError as error:
        raise WorkflowError(str(error)) from None


# A scan's BIDS id is its subject label, then its session and run entities (paths.py).
wildcard_constraints:
    bids_id="[A-Za-z0-9]+(_ses-[A-Za-z0-9]+)?(_run-[0-9]+)?",
    scan_dir="sub-[A-Za-z0-9]+(/ses-[A-Za-z0-9]+)?",
    shard="[0-9]+of[0-9]+",
    contrast="|".join(paths.EXTRA_CONTRASTS),


def each_subject(path_function, *args, **kwargs):
    """The path ``path_function(OUT, bids_id, *args, **kwargs)`` of every processed scan."""
    return [str(path_function(OUT, bids_id, *args, **kwargs)) for bids_id in SUBJECTS]


def cohort_outputs():
    targets = [
        paths.scores_table(OUT),
        paths.exclusions_table(OUT),
        paths.report(OUT),
        paths.mriqc_group_table(OUT),
        paths.dataset_description(OUT),
        paths.bidsignore(OUT),
        paths.dataset_readme(OUT),
    ]
    if LABELS:
        targets.append(paths.metrics(OUT))
    return [str(t) for t in targets]


def all_targets(wildcards):
    if not INPUT_DIR.is_dir():
        raise WorkflowError(
            f"config key input_dir: {str(INPUT_DIR)!r} is not a folder; "
            "run with --config input_dir=/path/to/cohort"
        )
    return cohort_outputs()


def subject_folder(wildcards):
    return str(INPUT_DIR / UNITS[wildcards.bids_id].entry)


def unit_files(wildcards):
    """The files of a BIDS run (relative to its folder); empty: every file of the folder."""
    return list(UNITS[wildcards.bids_id].files)


def unit_name(wildcards):
    """The unit's name in the labels file and the series.choose config."""
    return UNITS[wildcards.bids_id].folder


def labels_input(wildcards):
    return [LABELS] if LABELS else []


def model_checkpoint(wildcards):
    return str(paths.model_checkpoint(OUT)) if TRAIN_MODEL else MODEL["checkpoint"]


def contrast_images(wildcards):
    """Every subject's image of ``{contrast}`` on the template grid (what its model reads)."""
    return each_subject(
        paths.contrast_preproc, wildcards.contrast, res=config["template_resolution"]
    )


def contrast_name(wildcards):
    return wildcards.contrast


def contrast_records(wildcards):
    return each_subject(paths.contrast_record, wildcards.contrast)


def contrast_model_scores(wildcards):
    """The score tables of the contrasts' models: the cohort rules wait for them."""
    return [str(paths.model_scores(OUT, contrast=c)) for c in EXTRA_CONTRASTS]


def mriqc_agreement_input(wildcards):
    return [str(paths.mriqc_agreement(OUT))] if config["mriqc_dir"] else []


def metrics_input(wildcards):
    return [str(paths.metrics(OUT))] if LABELS else []


def fold_groups(wildcards):
    return cohort.read_fold_groups(config["training"]["fold_groups"], subjects=COHORT)


def reference_ids(wildcards):
    return cohort.resolve_reference(config["reference"], subjects=COHORT, labels_path=LABELS)


def mem_per_attempt(first_mb):
    """``mem_mb`` that grows with each retry (x1, x2, x3): a job killed for memory comes back with more."""

    def mem_mb(wildcards, attempt):
        return first_mb * attempt

    return mem_mb


def score_mem_mb(wildcards, threads, attempt):
    """A worker process per thread, each with torch, the model and one subject (~700 MB)."""
    return (1000 + 700 * threads) * attempt


def shard_subjects(wildcards):
    """The BIDS ids a score job scores."""
    return SHARDS[wildcards.shard]


def score_runtime(wildcards):
    """Minutes: ~3 s per subject on one CPU worker, plus start-up."""
    return 10 + len(SHARDS[wildcards.shard]) // 20


def model_gpus(wildcards):
    return 0 if config["device"] == "cpu" else 1


def output_dir(wildcards):
    """config output_dir, where a script writes what is not a Snakemake output (images beside
    the records, a subject's JSON). A function: lint reads a plain path prefix as hard-coded."""
    return OUT
