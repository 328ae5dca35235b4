"""Snakemake wrapper: train one contrast's normative model(s) on the reference subjects."""

from pathlib import Path

from mriaudit.aggregate import read_prescreen, read_scanner_groups
from mriaudit.model.train import train_cohort
from mriaudit.records import setup_logging

setup_logging(snakemake.log[0])
training = dict(snakemake.params.training)
train_cohort(
    [Path(p) for p in snakemake.params.images],
    [Path(p) for p in snakemake.params.records],
    list(snakemake.params.subjects),
    reference=list(snakemake.params.reference),
    out_checkpoint=Path(snakemake.output.checkpoint),
    out_sidecar=Path(snakemake.output.sidecar),
    folds=training["folds"],
    epochs=training["epochs"],
    batch_size=training["batch_size"],
    learning_rate=training["learning_rate"],
    seed=training["seed"],
    device=snakemake.params.device,
    precision=training["precision"],
    threads=snakemake.threads,
    resolution=snakemake.params.resolution,
    fold_groups=dict(snakemake.params.fold_groups),
    prescreened=read_prescreen(Path(snakemake.input.stages), contrast=snakemake.params.contrast),
    max_subjects=training["max_subjects"],
    scanner_groups=read_scanner_groups(Path(snakemake.input.stages)),
    method=snakemake.params.method,
    contrast=snakemake.params.contrast,
)
