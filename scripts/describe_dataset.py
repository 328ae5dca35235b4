"""Snakemake wrapper: dataset_description.json, README and .bidsignore of the output folder."""

from pathlib import Path

from mriaudit.derivatives import write_dataset_files
from mriaudit.records import setup_logging

setup_logging(snakemake.log[0])
write_dataset_files(
    Path(snakemake.params.output_dir),
    input_dir=Path(snakemake.params.input_dir),
    config=dict(snakemake.params.config),
)
