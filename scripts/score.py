"""Snakemake wrapper: voxel anomaly map and subject anomaly score."""

from pathlib import Path

from mriaudit.model.score import score_subject
from mriaudit.records import setup_logging

setup_logging(snakemake.log[0])
score_subject(
    Path(snakemake.input.image),
    checkpoint=Path(snakemake.input.checkpoint),
    subject=snakemake.wildcards.subject,
    out_map=Path(snakemake.output.anomaly_map),
    record_path=Path(snakemake.output.record),
    upstream=[Path(snakemake.input.upstream)],
    device=snakemake.params.device,
    threads=snakemake.threads,
)
