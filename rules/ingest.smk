rule inventory:
    input:
        folder=subject_folder,
    output:
        record=str(paths.record(OUT, "{subject}", "inventory")),
        series=str(paths.series_table(OUT, "{subject}")),
    log:
        str(paths.log(OUT, "inventory", "{subject}")),
    benchmark:
        str(paths.benchmark(OUT, "inventory", "{subject}"))
    params:
        rules=config["series"],
    threads: 1
    resources:
        mem_mb=mem_per_attempt(1000),
        runtime=10,
    conda:
        "../envs/mriaudit.yaml"
    script:
        "../scripts/inventory.py"


rule convert:
    input:
        folder=subject_folder,
        inventory=str(paths.record(OUT, "{subject}", "inventory")),
    output:
        image=str(paths.t1w(OUT, "{subject}")),
        sidecar=str(paths.t1w_sidecar(OUT, "{subject}")),
        record=str(paths.record(OUT, "{subject}", "convert")),
    log:
        str(paths.log(OUT, "convert", "{subject}")),
    benchmark:
        str(paths.benchmark(OUT, "convert", "{subject}"))
    threads: 1
    resources:
        mem_mb=mem_per_attempt(2000),
        runtime=15,
    conda:
        "../envs/mriaudit.yaml"
    script:
        "../scripts/convert.py"
