# mriaudit: audit a cohort of MRI scans. Contract: DESIGN.md; config keys: schemas/config.schema.yaml.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "schemas/config.schema.yaml", set_default=True)


include: "rules/common.smk"
include: "rules/preprocess.smk"
include: "rules/model.smk"
include: "rules/cohort.smk"


localrules:
    all,


rule all:
    default_target: True
    input:
        all_targets,
