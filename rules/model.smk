if TRAIN_MODEL:

    rule train_model:
        input:
            stages=str(paths.stage_table(OUT)),
        output:
            checkpoint=str(paths.model_checkpoint(OUT)),
            sidecar=str(paths.model_sidecar(OUT)),
        log:
            str(paths.log(OUT, "train_model")),
        benchmark:
            str(paths.benchmark(OUT, "train_model"))
        # The images and records are read through the stage table's subjects: as inputs
        # they would link the job to every subject's files (see rule collect).
        params:
            images=each_subject(paths.preproc, res=config["template_resolution"]),
            records=each_subject(paths.record, "register"),
            subjects=SUBJECTS,
            reference=reference_ids,
            method=MODEL["method"],
            contrast="T1w",
            fold_groups=fold_groups,
            training=config["training"],
            device=config["device"],
            resolution=config["template_resolution"],
        threads: 2
        resources:
            mem_mb=mem_per_attempt(8000),
            runtime=240,
            gpu=model_gpus,
        conda:
            "../envs/mriaudit.yaml"
        script:
            "../scripts/train_model.py"


# The cohort is scored in shards (`score.subjects_per_job` scans each, cohort.score_shards):
# a score job loads the model once per worker (one per thread on the CPU, one on a GPU)
# and scores its slice, and the DAG keeps no per-subject score job. Records and maps are
# written beside the scans' other outputs but are not declared: Snakemake would otherwise
# link every score job to thousands of files, and a subject without a map has no file
# that looks like one. The shards' tables are merged into the one score table the cohort
# rules read.
rule score:
    input:
        stages=str(paths.stage_table(OUT)),
        checkpoint=model_checkpoint,
    output:
        table=str(paths.score_shard(OUT, "{shard}")),
    log:
        str(paths.log(OUT, "score", shard="{shard}")),
    benchmark:
        str(paths.benchmark(OUT, "score", shard="{shard}"))
    params:
        output_dir=output_dir,
        subjects=shard_subjects,
        resolution=config["template_resolution"],
        device=config["device"],
        method=MODEL["method"],
        contrast="T1w",
    threads: 8
    resources:
        mem_mb=score_mem_mb,
        runtime=score_runtime,
        gpu=model_gpus,
    conda:
        "../envs/mriaudit.yaml"
    script:
        "../scripts/score.py"


rule merge_scores:
    input:
        shards=[str(paths.score_shard(OUT, shard)) for shard in SHARDS],
    output:
        table=str(paths.model_scores(OUT)),
    log:
        str(paths.log(OUT, "merge_scores")),
    benchmark:
        str(paths.benchmark(OUT, "merge_scores"))
    params:
        subjects=len(SUBJECTS),
    threads: 1
    resources:
        mem_mb=mem_per_attempt(500),
        runtime=10,
    conda:
        "../envs/mriaudit.yaml"
    script:
        "../scripts/merge_scores.py"


# Each contrast beside the T1w has a normative model of its own, trained out of fold on the
# same reference subjects that have the contrast (config model.checkpoint is the T1w's),
# and scored in the same shards.
rule train_contrast_model:
    input:
        stages=str(paths.stage_table(OUT)),
    output:
        checkpoint=str(paths.model_checkpoint(OUT, contrast="{contrast}")),
        sidecar=str(paths.model_sidecar(OUT, contrast="{contrast}")),
    log:
        str(paths.log(OUT, "train_model_{contrast}")),
    benchmark:
        str(paths.benchmark(OUT, "train_model_{contrast}"))
    params:
        images=contrast_images,
        records=contrast_records,
        subjects=SUBJECTS,
        reference=reference_ids,
        method=MODEL["method"],
        contrast=contrast_name,
        fold_groups=fold_groups,
        training=config["training"],
        device=config["device"],
        resolution=config["template_resolution"],
    threads: 2
    resources:
        mem_mb=mem_per_attempt(8000),
        runtime=240,
        gpu=model_gpus,
    conda:
        "../envs/mriaudit.yaml"
    script:
        "../scripts/train_model.py"


rule score_contrast:
    input:
        stages=str(paths.stage_table(OUT)),
        checkpoint=str(paths.model_checkpoint(OUT, contrast="{contrast}")),
    output:
        table=str(paths.score_shard(OUT, "{shard}", contrast="{contrast}")),
    log:
        str(paths.log(OUT, "score_{contrast}", shard="{shard}")),
    benchmark:
        str(paths.benchmark(OUT, "score_{contrast}", shard="{shard}"))
    params:
        output_dir=output_dir,
        subjects=shard_subjects,
        resolution=config["template_resolution"],
        device=config["device"],
        method=MODEL["method"],
        contrast=contrast_name,
    threads: 8
    resources:
        mem_mb=score_mem_mb,
        runtime=score_runtime,
        gpu=model_gpus,
    conda:
        "../envs/mriaudit.yaml"
    script:
        "../scripts/score.py"


rule merge_contrast_scores:
    input:
        shards=[str(paths.score_shard(OUT, shard, contrast="{contrast}")) for shard in SHARDS],
    output:
        table=str(paths.model_scores(OUT, contrast="{contrast}")),
    log:
        str(paths.log(OUT, "merge_scores_{contrast}")),
    benchmark:
        str(paths.benchmark(OUT, "merge_scores_{contrast}"))
    params:
        subjects=len(SUBJECTS),
    threads: 1
    resources:
        mem_mb=mem_per_attempt(500),
        runtime=10,
    conda:
        "../envs/mriaudit.yaml"
    script:
        "../scripts/merge_scores.py"
