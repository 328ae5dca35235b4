"""Snakemake wrapper: MRIQC-style image quality metrics on the native image."""

from pathlib import Path

from mriaudit.iqm import iqm_subject
from mriaudit.records import setup_logging

setup_logging(snakemake.log[0])
iqm_subject(
    Path(snakemake.input.raw),
    Path(snakemake.input.n4),
    Path(snakemake.input.head_mask),
    Path(snakemake.input.transform),
    record_path=Path(snakemake.output.record),
    upstream=[Path(snakemake.input.upstream)],
    resolution=snakemake.params.resolution,
    threads=snakemake.threads,
)
