"""Snakemake wrapper: our IQMs against an MRIQC run's, per metric."""

from pathlib import Path

from mriaudit.mriqc import compare_cohort
from mriaudit.records import setup_logging

setup_logging(snakemake.log[0])
compare_cohort(
    Path(snakemake.input.scores),
    mriqc_dir=Path(snakemake.params.mriqc_dir),
    out_table=Path(snakemake.output.agreement),
)
