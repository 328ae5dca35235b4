# One thread: the metrics are NumPy/SciPy work that a second thread speeds by 2 %.
rule iqm:
    input:
        raw=str(paths.t1w(OUT, "{subject}")),
        n4=str(paths.n4(OUT, "{subject}")),
        head_mask=str(paths.head_mask(OUT, "{subject}")),
        transform=str(paths.transform(OUT, "{subject}")),
        upstream=str(paths.record(OUT, "{subject}", "register")),
    output:
        record=str(paths.record(OUT, "{subject}", "iqm")),
    log:
        str(paths.log(OUT, "iqm", "{subject}")),
    benchmark:
        str(paths.benchmark(OUT, "iqm", "{subject}"))
    params:
        resolution=config["template_resolution"],
    threads: 1
    resources:
        mem_mb=mem_per_attempt(2500),
        runtime=20,
    conda:
        "../envs/mriaudit.yaml"
    script:
        "../scripts/iqm.py"
