"""Snakemake wrapper: the score jobs' tables, one after another, into the cohort's score table."""

import logging
from pathlib import Path

from mriaudit.records import setup_logging
from mriaudit.tables import concat_tsv

setup_logging(snakemake.log[0])
rows = concat_tsv([Path(p) for p in snakemake.input.shards], Path(snakemake.output.table))
logging.getLogger("merge_scores").info(
    "%d score tables, %d rows (%d subjects)",
    len(snakemake.input.shards),
    rows,
    snakemake.params.subjects,
)
