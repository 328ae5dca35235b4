"""Snakemake wrapper: the self-contained HTML audit report."""

from pathlib import Path

from mriaudit.records import setup_logging
from mriaudit.report import build_report

setup_logging(snakemake.log[0])
build_report(
    Path(snakemake.params.output_dir),
    scores_tsv=Path(snakemake.input.scores),
    exclusions_tsv=Path(snakemake.input.exclusions),
    metrics_json=Path(snakemake.input.metrics[0]) if snakemake.input.metrics else None,
    config=dict(snakemake.params.config),
    out_html=Path(snakemake.output.html),
    mriqc_agreement_tsv=(
        Path(snakemake.input.mriqc_agreement[0]) if snakemake.input.mriqc_agreement else None
    ),
)
