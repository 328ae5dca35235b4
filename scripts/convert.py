"""Snakemake wrapper: convert the chosen series with dcm2niix (or copy the NIfTI)."""

from pathlib import Path

from mriaudit.dicom import convert_subject
from mriaudit.records import setup_logging

setup_logging(snakemake.log[0])
convert_subject(
    Path(snakemake.input.folder),
    inventory_record=Path(snakemake.input.inventory),
    out_image=Path(snakemake.output.image),
    out_sidecar=Path(snakemake.output.sidecar),
    record_path=Path(snakemake.output.record),
)
