# The cohort's gather point: the rules after it read the subjects' records and images
# through this table (and the score table), so Snakemake's DAG does not link each of them
# to thousands of per-subject files (that costs time quadratic in the cohort size).
# It waits on the last record each preprocess job writes: one file per job orders the
# jobs (Snakemake reruns a job when any of its outputs is missing), and 100,000 inputs
# instead of 500,000 keep a 100,000-subject plan within minutes and memory.
rule collect:
    input:
        records=each_subject(paths.record, paths.PREPROCESS_STAGES[-1]),
    output:
        table=str(paths.stage_table(OUT)),
    log:
        str(paths.log(OUT, "collect")),
    benchmark:
        str(paths.benchmark(OUT, "collect"))
    params:
        output_dir=output_dir,
        subjects=SUBJECTS,
        flag=config["flag"],
        contrasts=EXTRA_CONTRASTS,
    threads: 1
    resources:
        mem_mb=mem_per_attempt(1000),
        runtime=10,
    conda:
        "../envs/mriaudit.yaml"
    script:
        "../scripts/collect.py"


rule aggregate:
    input:
        stages=str(paths.stage_table(OUT)),
        model_scores=str(paths.model_scores(OUT)),
        contrast_scores=contrast_model_scores,
        labels=labels_input,
    output:
        scores=report(
            str(paths.scores_table(OUT)), caption="report/scores.rst", category="Cohort tables"
        ),
        exclusions=report(
            str(paths.exclusions_table(OUT)),
            caption="report/exclusions.rst",
            category="Cohort tables",
        ),
        subjects=str(paths.cohort_table(OUT)),
        subject_scores=each_subject(paths.subject_scores),
    log:
        str(paths.log(OUT, "aggregate")),
    benchmark:
        str(paths.benchmark(OUT, "aggregate"))
    params:
        input_dir=config["input_dir"],
        output_dir=output_dir,
        labels=LABELS,
        flag=config["flag"],
        resolution=config["template_resolution"],
        contrasts=EXTRA_CONTRASTS,
    threads: 1
    resources:
        mem_mb=mem_per_attempt(4000),
        runtime=30,
    conda:
        "../envs/mriaudit.yaml"
    script:
        "../scripts/aggregate.py"


rule evaluate:
    input:
        scores=str(paths.scores_table(OUT)),
        labels=labels_input,
        model_scores=str(paths.model_scores(OUT)),
    output:
        metrics=report(str(paths.metrics(OUT)), caption="report/metrics.rst", category="Detection"),
    log:
        str(paths.log(OUT, "evaluate")),
    benchmark:
        str(paths.benchmark(OUT, "evaluate"))
    params:
        flag=config["flag"],
        output_dir=output_dir,
    threads: 1
    resources:
        mem_mb=mem_per_attempt(2000),
        runtime=10,
    conda:
        "../envs/mriaudit.yaml"
    script:
        "../scripts/evaluate.py"


rule report:
    input:
        scores=str(paths.scores_table(OUT)),
        exclusions=str(paths.exclusions_table(OUT)),
        metrics=metrics_input,
        model_scores=str(paths.model_scores(OUT)),
        mriqc_agreement=mriqc_agreement_input,
    output:
        html=report(
            str(paths.report(OUT)),
            caption="report/audit_report.rst",
            category="Cohort audit",
            labels={"figure": "audit report"},
        ),
    log:
        str(paths.log(OUT, "report")),
    benchmark:
        str(paths.benchmark(OUT, "report"))
    params:
        output_dir=output_dir,
        config=config,
    threads: 1
    resources:
        mem_mb=mem_per_attempt(4000),
        runtime=30,
    conda:
        "../envs/mriaudit.yaml"
    script:
        "../scripts/report.py"


# What makes the output folder a BIDS derivatives dataset: its description (version and
# the run's config digest), README and the .bidsignore of the parts BIDS has no name for.
rule describe_dataset:
    output:
        description=str(paths.dataset_description(OUT)),
        bidsignore=str(paths.bidsignore(OUT)),
        readme=str(paths.dataset_readme(OUT)),
    log:
        str(paths.log(OUT, "describe_dataset")),
    benchmark:
        str(paths.benchmark(OUT, "describe_dataset"))
    params:
        input_dir=config["input_dir"],
        output_dir=output_dir,
        config=config,
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        "../envs/mriaudit.yaml"
    script:
        "../scripts/describe_dataset.py"


# The IQMs in MRIQC's layout and names (group_T1w.tsv, one JSON per scan), for MRIQC-side
# tools (classifiers, viewers); the JSONs are written beside the table, not outputs.
rule export_mriqc:
    input:
        scores=str(paths.scores_table(OUT)),
    output:
        group=str(paths.mriqc_group_table(OUT)),
    log:
        str(paths.log(OUT, "export_mriqc")),
    benchmark:
        str(paths.benchmark(OUT, "export_mriqc"))
    params:
        output_dir=output_dir,
    threads: 1
    resources:
        mem_mb=mem_per_attempt(2000),
        runtime=10,
    conda:
        "../envs/mriaudit.yaml"
    script:
        "../scripts/export_mriqc.py"


# With mriqc_dir: MRIQC's own IQMs of the same scans against ours, metric by metric.
rule compare_mriqc:
    input:
        scores=str(paths.scores_table(OUT)),
    output:
        agreement=str(paths.mriqc_agreement(OUT)),
    log:
        str(paths.log(OUT, "compare_mriqc")),
    benchmark:
        str(paths.benchmark(OUT, "compare_mriqc"))
    params:
        mriqc_dir=config["mriqc_dir"],
    threads: 1
    resources:
        mem_mb=mem_per_attempt(2000),
        runtime=10,
    conda:
        "../envs/mriaudit.yaml"
    script:
        "../scripts/compare_mriqc.py"
