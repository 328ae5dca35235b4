if TRAIN_MODEL:

    rule train_model:
        input:
            images=each_subject(paths.preproc),
            records=each_subject(paths.record, "register"),
        output:
            checkpoint=str(paths.model_checkpoint(OUT)),
            sidecar=str(paths.model_sidecar(OUT)),
        log:
            str(paths.log(OUT, "train_model")),
        benchmark:
            str(paths.benchmark(OUT, "train_model"))
        params:
            subjects=SUBJECTS,
            reference=reference_labels,
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


rule score:
    input:
        image=str(paths.preproc(OUT, "{subject}")),
        checkpoint=model_checkpoint,
        upstream=str(paths.record(OUT, "{subject}", "register")),
    output:
        anomaly_map=str(paths.anomaly_map(OUT, "{subject}")),
        record=str(paths.record(OUT, "{subject}", "score")),
    log:
        str(paths.log(OUT, "score", "{subject}")),
    benchmark:
        str(paths.benchmark(OUT, "score", "{subject}"))
    params:
        device=config["device"],
    threads: 1
    resources:
        mem_mb=mem_per_attempt(3000),
        runtime=20,
        gpu=model_gpus,
    conda:
        "../envs/mriaudit.yaml"
    script:
        "../scripts/score.py"
