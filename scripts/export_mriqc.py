"""Snakemake wrapper: the IQMs in MRIQC's layout (group_T1w.tsv and per-scan JSON)."""

from pathlib import Path

from mriaudit.mriqc import export_cohort
from mriaudit.records import setup_logging

setup_logging(snakemake.log[0])
export_cohort(
    Path(snakemake.input.scores),
    out_group=Path(snakemake.output.group),
)
