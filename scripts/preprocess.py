"""Snakemake wrapper: one subject's preprocess chain (T1w stages, then its other contrasts)."""

from pathlib import Path

from mriaudit.records import setup_logging
from mriaudit.subject import preprocess_subject

setup_logging(snakemake.log[0])
preprocess_subject(
    Path(snakemake.input.folder),
    out_dir=Path(snakemake.params.output_dir),
    bids_id=snakemake.wildcards.bids_id,
    rules=dict(snakemake.params.rules),
    resolution=snakemake.params.resolution,
    threads=snakemake.threads,
    files=list(snakemake.params.files),
    name=snakemake.params.folder,
    contrasts=list(snakemake.params.contrasts),
)
