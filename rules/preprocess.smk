# One job per subject runs its whole chain up to template space (inventory, dcm2niix, N4,
# registration, IQMs, then each contrast beside the T1w; src/mriaudit/subject.py): each
# stage still writes its own record, and one job instead of five saves four process
# start-ups per subject and keeps a 10,000-subject DAG small. One thread: a second ITK thread speeds N4 by 8 % and
# registration by 18 % (1 mm T1, 2 cores), while two subjects side by side nearly double
# the throughput. The outputs are the stage records: the images (converted, bias-corrected,
# registered, masks, transform) exist only where their stage succeeded, so none is an
# output (a pipeline globbing the folder finds no empty image-shaped file).
rule preprocess:
    input:
        folder=subject_folder,
    output:
        inventory=str(paths.record(OUT, "{bids_id}", "inventory")),
        series=str(paths.series_table(OUT, "{bids_id}")),
        convert=str(paths.record(OUT, "{bids_id}", "convert")),
        n4=str(paths.record(OUT, "{bids_id}", "n4")),
        register=str(paths.record(OUT, "{bids_id}", "register")),
        iqm=str(paths.record(OUT, "{bids_id}", "iqm")),
        contrasts=[str(paths.contrast_record(OUT, "{bids_id}", c)) for c in EXTRA_CONTRASTS],
    log:
        str(paths.log(OUT, "preprocess", "{bids_id}")),
    benchmark:
        str(paths.benchmark(OUT, "preprocess", "{bids_id}"))
    params:
        output_dir=output_dir,
        files=unit_files,
        folder=unit_name,
        rules=config["series"],
        resolution=config["template_resolution"],
        contrasts=EXTRA_CONTRASTS,
    threads: 1
    resources:
        mem_mb=mem_per_attempt(2500),
        runtime=40,
    conda:
        "../envs/mriaudit.yaml"
    script:
        "../scripts/preprocess.py"
