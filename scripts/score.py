"""Snakemake wrapper: voxel anomaly maps and anomaly scores of one shard of the cohort."""

from pathlib import Path

from mriaudit.model.score import score_cohort
from mriaudit.records import setup_logging

setup_logging(snakemake.log[0])
score_cohort(
    Path(snakemake.input.stages),
    checkpoint=Path(snakemake.input.checkpoint),
    out_dir=Path(snakemake.params.output_dir),
    out_table=Path(snakemake.output.table),
    resolution=snakemake.params.resolution,
    device=snakemake.params.device,
    threads=snakemake.threads,
    only=list(snakemake.params.subjects),
    method=snakemake.params.method,
    contrast=snakemake.params.contrast,
)
