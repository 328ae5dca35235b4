"""Snakemake wrapper: detection metrics against the given labels."""

from pathlib import Path

from mriaudit.evaluate import evaluate_cohort
from mriaudit.records import setup_logging

setup_logging(snakemake.log[0])
evaluate_cohort(
    Path(snakemake.input.scores),
    Path(snakemake.input.labels[0]),
    out_metrics=Path(snakemake.output.metrics),
    flag=dict(snakemake.params.flag),
    output_dir=Path(snakemake.params.output_dir),
)
