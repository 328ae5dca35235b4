"""Snakemake wrapper: list the subject's series, choose one, audit its headers."""

from pathlib import Path

from mriaudit.dicom import inventory_subject
from mriaudit.records import setup_logging

setup_logging(snakemake.log[0])
inventory_subject(
    Path(snakemake.input.folder),
    series_table=Path(snakemake.output.series),
    record_path=Path(snakemake.output.record),
    rules=dict(snakemake.params.rules),
)
