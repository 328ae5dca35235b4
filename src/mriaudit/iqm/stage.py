"""The iqm stage: the IQMs of one subject's native T1-weighted image.

:func:`iqm_subject` works on the native grid in closest-RAS voxel order
(``mriaudit.iqm.grid``). The tissue classes come from the MNI152 tissue priors
warped there with the inverse of the registration affine (``priors``, then the
mixture of ``tissues``); air is the background clear of the head, the frame and
the face (``masks``); artefacts are air voxels far above the air noise level and
away from the head.

Metrics that need the tissue classes are NaN (``null`` in the record's JSON)
when no usable segmentation exists (failed registration, non-brain image); the
others are always computed and the record carries a warning with the reason.
Likewise the background metrics when there is no air (zero-filled background).

The measures come in three parts (``measures``): those that need no
registration (frame, EFC, FBER, artefacts, FWHM), the background's (air, QI1)
and the tissues'. In the preprocess job the first two run in a forked child
(``beside.NativeMeasures``): the first while the registration runs, the second
while this process segments the tissues; :func:`compute_iqms` puts them together.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mriaudit import records
from mriaudit.iqm.grid import native_arrays, registration_affine
from mriaudit.iqm.measures import (
    air_tissue_measures,
    background_measures,
    combine,
    native_measures,
    tissue_measures,
)

if TYPE_CHECKING:
    from mriaudit.iqm.beside import NativeMeasures
    from mriaudit.preprocess.images import Handoff

STAGE = "iqm"


def _itk_threads(threads: int) -> None:
    # ANTs reads the thread count from the environment (as ants.set_ants_deterministic does).
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(1, int(threads)))


def compute_iqms(
    raw_image: Path,
    n4_image: Path,
    head_mask: Path,
    transform: Path,
    *,
    resolution: int = 2,
    handoff: Handoff | None = None,
    beside: NativeMeasures | None = None,
) -> tuple[dict[str, float], list[str], dict[str, Any]]:
    """Every IQM of one subject: (metrics named ``iqm_*``, warnings, details).

    Images as in :func:`iqm_subject`. Metrics that cannot be computed are NaN
    and a warning says why. Raises ``records.StageError`` when the images
    cannot be read, differ in grid or hold no signal. With a ``handoff``, the
    bias-corrected image and the head mask kept there (by the N4 stage of the
    same process) are taken from memory; the converted image is read for its
    grid as ITK sees it (ANTs' geometry of the file, as the tissue priors are
    warped onto it). ``beside``: a started :class:`NativeMeasures`, which
    computes the native and background measures in its child (``details``
    then hold its cost as ``beside_registration``).
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    if beside is not None and beside.started:
        grid, raw, data, head = beside.native_arrays()
        registration = registration_affine(transform, grid)
        beside.registered(registration[0])
        tissues, values = tissue_measures(
            grid, raw, data, head, transform, registration, resolution
        )
        timings["tissues"] = round(time.perf_counter() - started, 3)
        native, air, cost = beside.collect()
        timings["collect"] = round(time.perf_counter() - started - timings["tissues"], 3)
    else:
        grid, raw, data, head = native_arrays(raw_image, n4_image, head_mask, handoff)
        timings["load"] = round(time.perf_counter() - started, 3)
        native, frame, head_distance = native_measures(grid, raw, data, head)
        timings["native"] = round(time.perf_counter() - started - sum(timings.values()), 3)
        registration = registration_affine(transform, grid)
        air = background_measures(data, head, frame, head_distance, grid.spacing, registration[0])
        del frame, head_distance
        timings["background"] = round(time.perf_counter() - started - sum(timings.values()), 3)
        tissues, values = tissue_measures(
            grid, raw, data, head, transform, registration, resolution
        )
        timings["tissues"] = round(time.perf_counter() - started - sum(timings.values()), 3)
        cost = None
    extra = air_tissue_measures(values, air, data, native.details["top"]) if values else {}
    metrics, warnings, details = combine(native, air.part, tissues, extra, timings)
    if cost is not None:
        details["beside_registration"] = cost
    return metrics, warnings, details


def iqm_subject(
    raw_image: Path,
    n4_image: Path,
    head_mask: Path,
    transform: Path,
    *,
    record_path: Path,
    upstream: Sequence[Path],
    resolution: int = 2,
    threads: int = 1,
    handoff: Handoff | None = None,
    beside: NativeMeasures | None = None,
) -> dict:
    """Stage ``iqm``: MRIQC-style metrics of one subject, written to its status record.

    ``raw_image``: the converted native T1w (any orientation); ``n4_image``: its
    bias-corrected version on the same grid; ``head_mask``: uint8 head mask on
    that grid; ``transform``: ANTs affine ``.mat`` from the registration
    (fixed = MNI152 template, moving = native image); ``resolution``: template
    grid (mm) whose tissue priors are warped; ``threads``: ITK threads. The
    record's ``metrics`` hold every name in ``IQM_NAMES`` (``None`` where
    undefined, with a warning saying why); ``details`` hold mask sizes and the
    tissue mixture's fit. A scan that cannot be read ends as a ``failed``
    record. With a ``handoff`` (stages in one process), the images the N4 stage
    kept there are taken from memory (see :func:`compute_iqms`); ``beside``: the
    measures started beside the registration (:class:`NativeMeasures`), collected
    here. Returns the record.
    """
    _itk_threads(threads)

    def work() -> dict[str, Any]:
        metrics, warnings, details = compute_iqms(
            Path(raw_image),
            Path(n4_image),
            Path(head_mask),
            Path(transform),
            resolution=resolution,
            handoff=handoff,
            beside=beside,
        )
        return records.make_record(STAGE, metrics=metrics, warnings=warnings, details=details)

    try:
        return records.run_stage(STAGE, work, record_path=record_path, upstream=upstream)
    finally:
        if beside is not None:
            beside.close()
