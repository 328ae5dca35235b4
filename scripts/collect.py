"""Snakemake wrapper: the status of every subject's preprocess stages, one table."""

from pathlib import Path

from mriaudit.aggregate import write_stage_table
from mriaudit.records import setup_logging

setup_logging(snakemake.log[0])
write_stage_table(
    Path(snakemake.params.output_dir),
    list(snakemake.params.subjects),
    out_tsv=Path(snakemake.output.table),
    flag=dict(snakemake.params.flag),
    contrasts=list(snakemake.params.contrasts),
)
