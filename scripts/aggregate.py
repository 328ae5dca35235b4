"""Snakemake wrapper: one cohort table with robust z-scores, flags and reasons."""

from pathlib import Path

from mriaudit.aggregate import aggregate_cohort
from mriaudit.records import setup_logging

setup_logging(snakemake.log[0])
aggregate_cohort(
    Path(snakemake.params.input_dir),
    Path(snakemake.params.output_dir),
    labels_path=snakemake.params.labels or None,
    flag=dict(snakemake.params.flag),
    out_scores=Path(snakemake.output.scores),
    out_exclusions=Path(snakemake.output.exclusions),
    out_subjects=Path(snakemake.output.subjects),
    resolution=snakemake.params.resolution,
    contrasts=list(snakemake.params.contrasts),
)
