"""Snakemake wrapper: N4 bias correction with a head mask."""

from pathlib import Path

from mriaudit.preprocess import bias_correct_subject
from mriaudit.records import setup_logging

setup_logging(snakemake.log[0])
bias_correct_subject(
    Path(snakemake.input.image),
    out_image=Path(snakemake.output.image),
    out_mask=Path(snakemake.output.mask),
    record_path=Path(snakemake.output.record),
    upstream=[Path(snakemake.input.upstream)],
    threads=snakemake.threads,
)
