if TRAIN_MODEL:

    rule train_model:
        input:
            records=each_subject(paths.record, "register"),
            stages=str(paths.stage_table(OUT)),
        output:
            checkpoint=str(paths.model_checkpoint(OUT)),
            sidecar=str(paths.model_sidecar(OUT)),
        log:
            str(paths.log(OUT, "train_model")),
        benchmark:
            str(paths.benchmark(OUT, "train_model"))
        params:
            images=each_subject(paths.preproc, res=config["template_resolution"]),
            subjects=SUBJECTS,
            reference=reference_ids,
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


# One job scores the whole cohort: the model is loaded once per worker (one per thread on
# the CPU, one on a GPU) instead of once per subject, and the DAG keeps no per-subject
# score job. The downstream rules depend on its table; the records are listed too, so
# each is a target. The maps are written only for scored subjects, so they are not
# outputs: a subject without a map has no file that looks like one.
rule score:
    input:
        stages=str(paths.stage_table(OUT)),
        checkpoint=model_checkpoint,
    output:
        table=str(paths.model_scores(OUT)),
        records=each_subject(paths.record, "score"),
    log:
        str(paths.log(OUT, "score")),
    benchmark:
        str(paths.benchmark(OUT, "score"))
    params:
        output_dir=output_dir,
        resolution=config["template_resolution"],
        device=config["device"],
    threads: 8
    resources:
        mem_mb=score_mem_mb,
        runtime=score_runtime,
        gpu=model_gpus,
    conda:
        "../envs/mriaudit.yaml"
    script:
        "../scripts/score.py"
