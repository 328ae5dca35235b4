"""Snakemake wrapper: affine registration to the MNI152 template."""

from pathlib import Path

from mriaudit.preprocess import register_subject
from mriaudit.records import setup_logging

setup_logging(snakemake.log[0])
register_subject(
    Path(snakemake.input.image),
    out_image=Path(snakemake.output.image),
    out_mask=Path(snakemake.output.mask),
    out_transform=Path(snakemake.output.transform),
    record_path=Path(snakemake.output.record),
    upstream=[Path(snakemake.input.upstream)],
    threads=snakemake.threads,
    resolution=snakemake.params.resolution,
)
