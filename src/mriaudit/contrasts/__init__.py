"""T2w and FLAIR audited beside the T1w (config ``contrasts``).

Modules: ``select`` (which series is the T2w, which the FLAIR: the header-driven
selection of the T1's, per contrast), ``coregister`` (a contrast onto its own
T1w, rigid and cross-modal, and whether the two show one head), ``iqms`` (its
IQMs on its own grid and tissue classes), ``stage`` (the contrast's chain in the
``preprocess`` job: convert, N4, co-register, IQMs, check, template space; one
record per contrast). ``stage`` is imported as
``mriaudit.contrasts.stage``: the inventory imports ``select``, and the stage
imports the converter.
"""

from mriaudit.contrasts.select import choose_dicom, choose_nifti

__all__ = ["choose_dicom", "choose_nifti"]
