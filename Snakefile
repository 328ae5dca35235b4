# mriaudit: audit a cohort of MRI scans. Contract: DESIGN.md; config keys: src/mriaudit/schemas/config.schema.yaml.
from snakemake.utils import min_version, validate
from mriaudit.slurm import surface_refused_submissions

min_version("9.0")


configfile: "config.yaml"


report: "rules/report/workflow.rst"


validate(config, "src/mriaudit/schemas/config.schema.yaml", set_default=True)
# On SLURM, a submission that sbatch refuses (a partition the cluster lacks, a GPU its
# partition lacks) shows sbatch's own message in the run's output and in its rules' logs.
surface_refused_submissions()


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
