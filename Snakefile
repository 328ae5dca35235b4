# mriaudit: audit a cohort of MRI scans. Contract: DESIGN.md; config keys: src/mriaudit/schemas/config.schema.yaml.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


report: "rules/report/workflow.rst"


validate(config, "src/mriaudit/schemas/config.schema.yaml", set_default=True)


include: "rules/common.smk"
include: "rules/preprocess.smk"
include: "rules/model.smk"
include: "rules/cohort.smk"


localrules:
    all,
    describe_dataset,


rule all:
    default_target: True
    input:
        all_targets,
