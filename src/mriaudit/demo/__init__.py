"""Demo cohort: realistic DICOM subjects made from the MNI152 template, with labels.

``python -m mriaudit.demo OUTDIR`` writes one folder per subject under OUTDIR
and a labels TSV (columns ``folder``, ``truth``, ``kind``, ``description`` and
the lesion centre in MNI mm). Everything is deterministic for a seed.

A labelled minority is anomalous (truth 1): lesions, motion ghosting, k-space
spikes, wrap-around, heavy noise, strong bias, missing slices, wrong contrast;
plus broken inputs: a truncated DICOM file, an empty folder, a subject with
only a localizer. ``plan_real_heads`` and ``write_cohort`` run the same
machinery on real heads (``mriaudit.heads``) instead of the template: the
detection benchmark.

Modules, in the order a subject is made: ``plan`` (what each subject is),
``anatomy`` (head, deformation, lesion), ``physics`` (acquisition grid, contrast,
bias, artefacts, noise), ``render`` (vendors and the series of a subject),
``writer`` (DICOM files), ``generate`` (the cohort on disk, labels, command line).
"""

from mriaudit.demo.generate import (
    LABEL_COLUMNS,
    TEMPLATE_PERSON,
    generate_cohort,
    main,
    write_cohort,
)
from mriaudit.demo.plan import (
    ANOMALY_KINDS,
    BROKEN_KINDS,
    KINDS,
    MIN_SUBJECTS,
    SubjectPlan,
    plan_cohort,
    plan_real_heads,
)
from mriaudit.demo.render import VENDORS, Series, SubjectScan, render_subject
from mriaudit.demo.writer import write_subject

__all__ = [
    "ANOMALY_KINDS",
    "BROKEN_KINDS",
    "KINDS",
    "LABEL_COLUMNS",
    "MIN_SUBJECTS",
    "TEMPLATE_PERSON",
    "VENDORS",
    "Series",
    "SubjectPlan",
    "SubjectScan",
    "generate_cohort",
    "main",
    "plan_cohort",
    "plan_real_heads",
    "render_subject",
    "write_cohort",
    "write_subject",
]
