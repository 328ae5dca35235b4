"""One subject's chain up to template space: what the ``preprocess`` job runs.

inventory -> convert -> N4 -> registration -> IQMs, one after another in one
process. Each stage still writes its own status record and runs in its own
forked child (``records.run_stage``), so a stage that fails or crashes is a
finding and the stages after it are skipped with its reason. One process
instead of five saves each stage's start-up (Python, ANTsPy and SciPy imports)
and four Snakemake jobs per subject, which is what a 10,000-subject DAG costs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mriaudit import derivatives, dicom, iqm, paths, preprocess


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
) -> dict[str, dict[str, Any]]:
    """Run the per-subject stages of ``folder`` (DICOM or NIfTI) into ``out_dir``.

    ``bids_id`` is the subject's BIDS id (``paths`` names every output from
    it); ``rules`` the ``series`` config; ``resolution`` the template grid (mm);
    ``threads`` the ITK threads of N4, registration and IQMs; ``files`` and
    ``name`` restrict and name the inventory (``dicom.inventory_subject``'s
    ``only`` and ``name``: a BIDS run). Returns the
    stage records by stage name (``paths.STAGES`` up to ``iqm``).
    """
    folder, out_dir = Path(folder), Path(out_dir)

    def record(stage: str) -> Path:
        return paths.record(out_dir, bids_id, stage)

    done: dict[str, dict[str, Any]] = {}
    done["inventory"] = dicom.inventory_subject(
        folder,
        series_table=paths.series_table(out_dir, bids_id),
        record_path=record("inventory"),
        rules=rules,
        only=files,
        name=name,
    )
    done["convert"] = dicom.convert_subject(
        folder,
        inventory_record=record("inventory"),
        out_image=paths.t1w(out_dir, bids_id),
        out_sidecar=paths.t1w_sidecar(out_dir, bids_id),
        record_path=record("convert"),
        out_thumbnail=paths.native_thumbnail(out_dir, bids_id),
    )
    done["n4"] = preprocess.bias_correct_subject(
        paths.t1w(out_dir, bids_id),
        out_image=paths.n4(out_dir, bids_id),
        out_mask=paths.head_mask(out_dir, bids_id),
        record_path=record("n4"),
        upstream=[record("convert")],
        threads=threads,
    )
    done["register"] = preprocess.register_subject(
        paths.n4(out_dir, bids_id),
        out_image=paths.preproc(out_dir, bids_id, res=resolution),
        out_mask=paths.brain_mask(out_dir, bids_id, res=resolution),
        out_transform=paths.transform(out_dir, bids_id),
        record_path=record("register"),
        upstream=[record("n4")],
        threads=threads,
        resolution=resolution,
    )
    done["iqm"] = iqm.iqm_subject(
        paths.t1w(out_dir, bids_id),
        paths.n4(out_dir, bids_id),
        paths.head_mask(out_dir, bids_id),
        paths.transform(out_dir, bids_id),
        record_path=record("iqm"),
        upstream=[record("register")],
        resolution=resolution,
        threads=threads,
    )
    derivatives.write_sidecars(
        out_dir, bids_id, res=resolution, only=("T1w", "n4", "head_mask", "preproc", "brain_mask")
    )
    return done
