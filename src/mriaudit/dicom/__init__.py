"""Inventory and conversion of one subject folder: DICOM series, or NIfTI files.

``inventory_subject`` reads DICOM headers only (pydicom; pixel data of plain
files stay on disk; compressed files and archives through ``mriaudit.sources``),
groups the files by SeriesInstanceUID, writes one TSV row per series with its
header class (``mriaudit.series``) and selection verdict, chooses the audited
series (the best 3D T1-weighted series by what the headers say, the user's
name rules on top; else the best 2D T1 series with the finding ``2d_only``)
and audits the chosen series' headers: missing or duplicated slices,
non-uniform spacing, mixed orientations or sizes, inconsistent rescaling,
unreadable files, and which identifying tags are filled. A folder with NIfTI
files and no DICOM is a NIfTI subject.

``convert_subject`` converts the chosen series with the dcm2niix binary of the
PyPI package (or copies the chosen NIfTI) into the contract's
``sub-<id>_T1w.nii.gz`` and JSON sidecar, keeping dcm2niix's voxel order and
affine, and strips identifying keys from the sidecar.

PHI: only tag *names* ever leave this package; identifying values are never
logged, stored or returned. Header strings (descriptions, protocols) are stored
as plain data with control characters removed; they are never interpreted.
The subject folder is only read: conversion works on links to (or decompressed
copies of) the chosen files in a private temporary folder.

Modules, in the order a subject passes them: ``scan`` (headers of every file,
grouped into series), ``geometry`` (slice positions, gaps, orientation),
``table`` (one series-table row per series), ``nifti`` (NIfTI input),
``inventory`` (the stage: selection, findings, record), ``convert`` (the stage:
dcm2niix, gap filling, the sidecar, the image check).
"""

from mriaudit.dicom.convert import (
    SIDECAR_PHI_KEYS,
    check_image,
    clean_sidecar,
    convert_subject,
    fill_missing_slices,
    run_dcm2niix,
)
from mriaudit.dicom.geometry import SliceGaps, orientation_label, slice_gaps
from mriaudit.dicom.inventory import (
    FINDINGS,
    METRIC_KEYS,
    SELECTION_FINDINGS,
    inventory_subject,
)
from mriaudit.dicom.nifti import choose_nifti
from mriaudit.dicom.scan import PHI_TAGS
from mriaudit.dicom.table import SERIES_COLUMNS, write_series_table

__all__ = [
    "FINDINGS",
    "METRIC_KEYS",
    "PHI_TAGS",
    "SELECTION_FINDINGS",
    "SERIES_COLUMNS",
    "SIDECAR_PHI_KEYS",
    "SliceGaps",
    "check_image",
    "choose_nifti",
    "clean_sidecar",
    "convert_subject",
    "fill_missing_slices",
    "inventory_subject",
    "orientation_label",
    "run_dcm2niix",
    "slice_gaps",
    "write_series_table",
]
