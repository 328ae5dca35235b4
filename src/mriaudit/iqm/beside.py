"""The IQMs that run beside the registration, in a forked child (the preprocess job).

The measures that need no registration and the background's run in a child on
the other core (:class:`NativeMeasures`): the first while this process registers,
the second while it segments the tissues. The stage (``stage.compute_iqms``)
collects them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mriaudit import chain, isolation, records
from mriaudit.iqm.grid import Grid, native_arrays
from mriaudit.iqm.measures import Air, Part, background_measures, native_measures
from mriaudit.iqm.stage import STAGE

if TYPE_CHECKING:
    from mriaudit.preprocess.images import Handoff

log = logging.getLogger(__name__)


class NativeMeasures:
    """The IQMs computed beside the registration (the preprocess job).

    In ``chain.run_chain``'s child, :meth:`start` (once the N4 stage has kept its
    images in ``handoff``) puts the native images on the canonical grid here and
    forks a child, on the other core, that computes the measures that need no
    registration (:func:`native_measures`) while this process registers, then
    waits for the registration (:meth:`registered`) and computes the background's
    measures (:func:`background_measures`) while this process segments the
    tissues. The IQM stage collects them (``stage.compute_iqms``). The child only
    reads what this process had: the results are those of the stage computing
    everything itself, which it does where nothing was started. A failure or
    crash of the child is the IQM stage's, with its reason.
    """

    def __init__(self, raw_image: Path, n4_image: Path, head_mask: Path, *, handoff: Handoff):
        self.images = (Path(raw_image), Path(n4_image), Path(head_mask))
        self.handoff = handoff
        self.arrays: tuple[Grid, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._problem: Exception | None = None
        self._finish: Callable[[], isolation.ChildOutcome] | None = None
        self._to_child = self._air_values = -1
        self._load_s = 0.0

    @property
    def started(self) -> bool:
        return self._finish is not None or self._problem is not None

    def start(self) -> None:
        """Start the child (when in a chain, N4 kept its images and Linux has memory files)."""
        _, n4_image, head_mask = self.images
        if not (chain.in_chain() and n4_image in self.handoff and head_mask in self.handoff):
            return
        if not hasattr(os, "memfd_create"):
            return
        started = time.perf_counter()
        try:
            self.arrays = native_arrays(*self.images, self.handoff)
        except Exception as error:  # the IQM stage's failure: raised when it collects
            self._problem = error
            return
        self._load_s = round(time.perf_counter() - started, 3)
        grid, raw, data, head = self.arrays
        from_parent, self._to_child = os.pipe()
        air_values = self._air_values = os.memfd_create("iqm-air")

        def measure() -> dict[str, Any]:
            os.close(self._to_child)
            try:
                begun = time.perf_counter()
                native, frame, head_distance = native_measures(grid, raw, data, head)
                middle = time.perf_counter()
                with os.fdopen(from_parent, "rb") as pipe:
                    message = pipe.read()
                if not message:  # the IQM stage is skipped
                    return {"skipped": True}
                vox_to_mni = json.loads(message)["vox_to_mni"]
                vox_to_mni = None if vox_to_mni is None else np.asarray(vox_to_mni)
                waited = time.perf_counter()
                air = background_measures(
                    data, head, frame, head_distance, grid.spacing, vox_to_mni
                )
                if air.values is not None:
                    with open(air_values, "wb", closefd=False) as stream:
                        np.save(stream, air.values)
            except Exception as error:
                log.exception("iqm: the measures beside the registration failed")
                return {"error": f"{STAGE}: {type(error).__name__}: {error}"[:300]}
            timings = {
                "native": round(middle - begun, 3),
                "background": round(time.perf_counter() - waited, 3),
            }
            return {
                "native": native.as_json(),
                "air": air.part.as_json() | {"stats": air.stats},
                "timings": timings,
            }

        self._finish = isolation.start_in_child(measure, what=f"{STAGE} (beside registration)")
        os.close(from_parent)

    def native_arrays(self) -> tuple[Grid, np.ndarray, np.ndarray, np.ndarray]:
        """The canonical grid and images the child works on; raises the problem that
        kept :meth:`start` from making them."""
        if self._problem is not None:
            raise self._problem
        if self.arrays is None:
            message = "the measures beside the registration were not started"
            raise RuntimeError(message)
        return self.arrays

    def registered(self, vox_to_mni: np.ndarray | None) -> None:
        """Let the child go on with the background (the registration's affine, or None)."""
        if self._to_child >= 0:
            matrix = None if vox_to_mni is None else np.asarray(vox_to_mni).tolist()
            with contextlib.suppress(BrokenPipeError):  # a child that died: see collect
                os.write(self._to_child, json.dumps({"vox_to_mni": matrix}).encode())
            os.close(self._to_child)
            self._to_child = -1

    def collect(self) -> tuple[Part, Air, dict[str, Any]]:
        """The child's native and background measures and its cost; raises
        ``records.StageError`` where they failed."""
        if self._problem is not None:
            raise self._problem
        if self._finish is None:
            message = "the measures beside the registration were not started"
            raise RuntimeError(message)
        self.registered(None)  # (no-op once sent)
        outcome = self._finish()
        self._finish = None
        result = outcome.result
        if result is None:
            message = f"{STAGE}: crashed ({outcome.how}) beside the registration"
            raise records.StageError(message)
        if "error" in result:
            raise records.StageError(result["error"])
        native = Part(**result["native"])
        air_json = dict(result["air"])
        stats = air_json.pop("stats")
        values = None
        if stats is not None:
            with open(self._air_values, "rb", closefd=False) as stream:
                stream.seek(0)
                values = np.load(stream)
        air = Air(Part(**air_json), values, stats)
        cost = {"load_s": self._load_s, **result["timings"], **outcome.cost}
        return native, air, cost

    def close(self) -> None:
        """Let a child that was started go (the IQM stage was skipped) and wait for it."""
        if self._to_child >= 0:
            os.close(self._to_child)  # end of file: the child stops
            self._to_child = -1
        if self._finish is not None:
            self._finish()
            self._finish = None
        if self._air_values >= 0:
            os.close(self._air_values)
            self._air_values = -1
        self.arrays = None
