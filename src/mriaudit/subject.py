"""One subject's chain up to template space: what the ``preprocess`` job runs.

inventory -> convert -> N4 -> registration -> IQMs, one after another in one
forked child process (``chain.run_chain``). Each stage still writes its own
status record (and its images) as it ends, and a stage that fails is a finding:
the stages after it are skipped with its reason. A crash (a segfault in ITK)
costs the stage it hit and the stages after it, which all need it anyway.

One process for the chain hands the images from stage to stage in memory
(``preprocess.Handoff``): N4 keeps the converted image it read, registration
and the IQMs take the corrected image and the head mask N4 wrote, instead of
reading the gzip files back; and the memory one stage frees is reused by the
next. The job uses the second core of a two-core machine for work that would
otherwise wait: the job's parent process compresses and writes the images
(``chain.run_chain``), and the IQMs that need no registration run in a forked
child while the registration runs (``iqm.NativeMeasures``). One process instead
of five also saves each stage's start-up (Python, ANTsPy and SciPy imports) and
four Snakemake jobs per subject, which is what a 10,000-subject DAG costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mriaudit import chain, derivatives, dicom, iqm, paths, preprocess
from mriaudit.contrasts import stage as contrast_stage


def preprocess_subject(
    folder: Path,
    *,
    out_dir: Path,
    bids_id: str,
    rules: dict[str, Any],
    resolution: int = 2,
    threads: int = 1,
    files: Sequence[str] = (),
    name: str = "",
    contrasts: Sequence[str] = (),
    in_memory: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run the per-subject stages of ``folder`` (DICOM or NIfTI) into ``out_dir``.

    ``bids_id`` is the subject's BIDS id (``paths`` names every output from
    it); ``rules`` the ``series`` config; ``resolution`` the template grid (mm);
    ``threads`` the ITK threads of N4, registration and IQMs; ``files`` and
    ``name`` restrict and name the inventory (``dicom.inventory_subject``'s
    ``only`` and ``name``: a BIDS run). Without ``in_memory`` every stage reads
    its inputs from the files the stages before it wrote (the same results; the
    tests compare the two). ``contrasts`` (``T2w``, ``FLAIR``; ``paths.EXTRA_CONTRASTS``)
    are audited after the T1w's stages (``mriaudit.contrasts.stage``), one record each
    (``paths.contrast_record``). Returns the records by stage name (``paths.STAGES``
    up to ``iqm``), then by contrast.
    """
    folder, out_dir = Path(folder), Path(out_dir)
    handoff = preprocess.Handoff() if in_memory else None

    def record(stage: str) -> Path:
        return paths.record(out_dir, bids_id, stage)

    t1w, n4 = paths.t1w(out_dir, bids_id), paths.n4(out_dir, bids_id)
    head_mask, transform = paths.head_mask(out_dir, bids_id), paths.transform(out_dir, bids_id)
    preproc = paths.preproc(out_dir, bids_id, res=resolution)
    brain_mask = paths.brain_mask(out_dir, bids_id, res=resolution)
    thumbnail = paths.native_thumbnail(out_dir, bids_id)
    beside = iqm.NativeMeasures(t1w, n4, head_mask, handoff=handoff) if handoff else None

    def register() -> dict[str, Any]:
        if beside is not None:  # on the other core, while the registration runs
            beside.start()
        return preprocess.register_subject(
            n4,
            out_image=preproc,
            out_mask=brain_mask,
            out_transform=transform,
            record_path=record("register"),
            upstream=[record("n4")],
            threads=threads,
            resolution=resolution,
            handoff=handoff,
        )

    steps = [
        chain.Step(
            "inventory",
            lambda: dicom.inventory_subject(
                folder,
                series_table=paths.series_table(out_dir, bids_id),
                record_path=record("inventory"),
                rules=rules,
                only=files,
                name=name,
                contrasts=contrasts,
            ),
            record("inventory"),
        ),
        chain.Step(
            "convert",
            lambda: dicom.convert_subject(
                folder,
                inventory_record=record("inventory"),
                out_image=t1w,
                out_sidecar=paths.t1w_sidecar(out_dir, bids_id),
                record_path=record("convert"),
                out_thumbnail=thumbnail,
            ),
            record("convert"),
            (t1w, paths.t1w_sidecar(out_dir, bids_id), thumbnail),
        ),
        chain.Step(
            "n4",
            lambda: preprocess.bias_correct_subject(
                t1w,
                out_image=n4,
                out_mask=head_mask,
                record_path=record("n4"),
                upstream=[record("convert")],
                threads=threads,
                handoff=handoff,
            ),
            record("n4"),
            (n4, head_mask),
        ),
        chain.Step("register", register, record("register"), (preproc, brain_mask, transform)),
        chain.Step(
            "iqm",
            lambda: iqm.iqm_subject(
                t1w,
                n4,
                head_mask,
                transform,
                record_path=record("iqm"),
                upstream=[record("register")],
                resolution=resolution,
                threads=threads,
                handoff=handoff,
                beside=beside,
            ),
            record("iqm"),
        ),
    ]
    steps += [
        _contrast_step(folder, out_dir, bids_id, c, resolution, threads, handoff) for c in contrasts
    ]
    done = chain.run_chain(steps, what=f"{bids_id}: preprocess")
    derivatives.write_sidecars(
        out_dir,
        bids_id,
        res=resolution,
        only=(
            "T1w",
            "n4",
            "head_mask",
            "preproc",
            "brain_mask",
            *(name for c in contrasts for name in (c, f"{c}_preproc")),
        ),
    )
    return done


def _contrast_step(
    folder: Path,
    out_dir: Path,
    bids_id: str,
    contrast: str,
    resolution: int,
    threads: int,
    handoff: preprocess.Handoff | None,
) -> chain.Step:
    """The chain step of one contrast beside the T1w (through the T1w's registration,
    or its own without a usable T1w)."""
    images = (
        paths.contrast_image(out_dir, bids_id, contrast),
        paths.contrast_sidecar(out_dir, bids_id, contrast),
        paths.contrast_to_t1w(out_dir, bids_id, contrast),
        paths.contrast_to_template(out_dir, bids_id, contrast),
        paths.contrast_preproc(out_dir, bids_id, contrast, res=resolution),
        paths.contrast_native_thumbnail(out_dir, bids_id, contrast),
        paths.contrast_template_thumbnail(out_dir, bids_id, contrast),
    )
    record = paths.contrast_record(out_dir, bids_id, contrast)
    return chain.Step(
        contrast,
        lambda: contrast_stage.contrast_subject(
            folder,
            contrast=contrast,
            inventory_record=paths.record(out_dir, bids_id, "inventory"),
            t1w_register=paths.record(out_dir, bids_id, "register"),
            t1w_n4=paths.n4(out_dir, bids_id),
            t1w_transform=paths.transform(out_dir, bids_id),
            out_image=images[0],
            out_sidecar=images[1],
            out_to_t1w=images[2],
            out_to_template=images[3],
            out_preproc=images[4],
            out_pictures=(images[5], images[6]),
            record_path=record,
            resolution=resolution,
            threads=threads,
            handoff=handoff,
        ),
        record,
        images,
    )
