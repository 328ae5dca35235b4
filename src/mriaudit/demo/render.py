"""Rendering a subject's series: vendors, scanners, acquisitions, artefacts.

``render_subject`` turns a plan into a ``SubjectScan``: the 3D T1 (with the
plan's anomaly), most subjects a localizer, a few a 2D axial T2 as distractor
series, and with the plan's ``contrasts`` a 3D T2w and FLAIR of the same head
(the anomaly in the one the plan names), on a vendor-like scanner (Siemens, GE, Philips; 1.5 T and 3 T) with its
sequence names and timing (``VENDORS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from mriaudit.demo.anatomy import Anatomy, Lesion, _add_lesion, _draw_anatomy, _head
from mriaudit.demo.physics import (
    _T2_LUT,
    _WM,
    Grid,
    Scaling,
    _axes,
    _bias_field,
    _contrast_lut,
    _draw_scaling,
    _fit_grid,
    _flair_lut,
    _fold,
    _ghosting,
    _rician,
    _sample,
    _spike,
    _t2_lut,
)
from mriaudit.demo.plan import SubjectPlan


@dataclass(frozen=True)
class Vendor:
    """Vendor-like protocol names and sequence parameters (TR, TE, TI in ms, flip in degrees)."""

    name: str
    manufacturer: str
    models: dict[float, tuple[str, ...]]
    t1_description: dict[str, str]
    t1_tags: dict[str, object]
    t1_timing: dict[float, tuple[float, float, float, float]]
    t2_description: str
    t2_tags: dict[str, object]
    t2_3d_description: dict[str, str]
    t2_3d_sequence: str
    flair_3d_description: dict[str, str]
    flair_3d_sequence: str
    localizer_description: str
    bits_stored: int
    series_step: int


VENDORS = (
    Vendor(
        name="Siemens",
        manufacturer="SIEMENS",
        models={3.0: ("Prisma_fit", "Skyra"), 1.5: ("Avanto_fit", "Aera")},
        t1_description={"sagittal": "t1_mprage_sag_p2_iso", "axial": "t1_mprage_tra_p2_iso"},
        t1_tags={
            "SequenceName": "*tfl3d1_16ns",
            "ScanningSequence": ["GR", "IR"],
            "SequenceVariant": ["SK", "SP", "MP"],
            "ScanOptions": "IR",
        },
        t1_timing={3.0: (2300.0, 2.98, 900.0, 9.0), 1.5: (2400.0, 3.61, 1000.0, 8.0)},
        t2_description="t2_tse_tra",
        t2_tags={
            "SequenceName": "*tse2d1_15",
            "ScanningSequence": "SE",
            "SequenceVariant": ["SK", "SP", "OSP"],
        },
        t2_3d_description={"sagittal": "t2_spc_sag_p2_iso", "axial": "t2_spc_tra_p2_iso"},
        t2_3d_sequence="*spc_282ns",
        flair_3d_description={
            "sagittal": "t2_space_dark-fluid_sag_p2_iso",
            "axial": "t2_space_dark-fluid_tra_p2_iso",
        },
        flair_3d_sequence="*spcir_278ns",
        localizer_description="localizer",
        bits_stored=12,
        series_step=1,
    ),
    Vendor(
        name="GE",
        manufacturer="GE MEDICAL SYSTEMS",
        models={3.0: ("DISCOVERY MR750", "SIGNA Premier"), 1.5: ("Optima MR450w", "SIGNA Artist")},
        t1_description={"sagittal": "Sag T1 BRAVO", "axial": "Ax T1 BRAVO"},
        t1_tags={
            "SequenceName": "efgre3d",
            "ScanningSequence": ["GR", "IR"],
            "SequenceVariant": ["SS", "SK", "MP"],
            "ScanOptions": ["FAST_GEMS", "EDR_GEMS", "ACC_GEMS"],
        },
        t1_timing={3.0: (8.2, 3.2, 450.0, 12.0), 1.5: (10.4, 4.2, 600.0, 10.0)},
        t2_description="Ax T2 FSE",
        t2_tags={
            "SequenceName": "fse-xl",
            "ScanningSequence": "SE",
            "SequenceVariant": ["SK", "OSP"],
        },
        t2_3d_description={"sagittal": "Sag CUBE T2", "axial": "Ax CUBE T2"},
        t2_3d_sequence="cube",
        flair_3d_description={"sagittal": "Sag CUBE FLAIR", "axial": "Ax CUBE FLAIR"},
        flair_3d_sequence="cube",
        localizer_description="3Plane Localizer",
        bits_stored=16,
        series_step=1,
    ),
    Vendor(
        name="Philips",
        manufacturer="Philips Medical Systems",
        models={3.0: ("Ingenia", "Achieva dStream"), 1.5: ("Ingenia", "Achieva")},
        t1_description={"sagittal": "sT1W_3D_TFE", "axial": "T1W_3D_TFE"},
        t1_tags={
            "SequenceName": "T1TFE",
            "ScanningSequence": "GR",
            "SequenceVariant": ["SP", "MP"],
            "ScanOptions": "OTHER",
        },
        t1_timing={3.0: (8.1, 3.7, 950.0, 8.0), 1.5: (7.5, 3.5, 900.0, 8.0)},
        t2_description="T2W_TSE",
        t2_tags={"SequenceName": "TSE", "ScanningSequence": "SE", "SequenceVariant": "SK"},
        t2_3d_description={"sagittal": "sT2W_3D_TSE", "axial": "T2W_3D_TSE"},
        t2_3d_sequence="TSE3D",
        flair_3d_description={"sagittal": "3D_Brain_VIEW_FLAIR", "axial": "3D_FLAIR_tra"},
        flair_3d_sequence="IRTSE3D",
        localizer_description="Survey localizer",
        bits_stored=12,
        series_step=100,
    ),
)


@dataclass(frozen=True)
class Scanner:
    vendor: Vendor
    field_t: float
    model: str


def _draw_scanner(rng: np.random.Generator) -> Scanner:
    vendor = VENDORS[int(rng.integers(len(VENDORS)))]
    field_t = 3.0 if rng.random() < 0.6 else 1.5
    models = vendor.models[field_t]
    return Scanner(vendor, field_t, models[int(rng.integers(len(models)))])


@dataclass
class Series:
    """One DICOM series: frames (n, rows, columns) uint16 with per-frame geometry.

    ``positions`` (n, 3) and ``orientations`` (n, 6) are ImagePositionPatient
    and ImageOrientationPatient; ``dropped`` frames are not written (files removed).
    """

    role: str
    number: int
    description: str
    frames: np.ndarray
    positions: np.ndarray
    orientations: np.ndarray
    pixel_mm: float
    thickness_mm: float
    spacing_mm: float
    scaling: Scaling
    tags: dict[str, object]
    dropped: frozenset[int] = frozenset()


@dataclass
class SubjectScan:
    """Everything rendered for one subject; ``notes`` feed the labels' description."""

    plan: SubjectPlan
    scanner: Scanner
    anatomy: Anatomy
    series: list[Series] = field(default_factory=list)
    lesion: Lesion | None = None
    notes: list[str] = field(default_factory=list)

    def t1(self) -> Series | None:
        return next((s for s in self.series if s.role == "t1"), None)


@dataclass(frozen=True)
class Acquisition:
    """The T1 protocol of a subject: plane, tilt (degrees), voxel (mm), SNR, bias, contrast."""

    orientation: str
    tilt_deg: float
    pixel_mm: float
    slice_mm: float
    margins_mm: np.ndarray
    snr: float
    bias: float
    bias_coef: np.ndarray
    lut: tuple[np.ndarray, np.ndarray]


def _draw_acquisition(rng: np.random.Generator, voxel_size_mm: float) -> Acquisition:
    orientation = "sagittal" if rng.random() < 0.6 else "axial"
    tilt = 0.0 if rng.random() < 0.5 else float(rng.uniform(-8.0, 8.0))
    return Acquisition(
        orientation=orientation,
        tilt_deg=tilt,
        pixel_mm=round(voxel_size_mm * rng.uniform(0.9, 1.1), 4),
        slice_mm=round(voxel_size_mm * rng.uniform(0.9, 1.1), 4),
        margins_mm=rng.uniform(8.0, 18.0, size=3),
        snr=float(rng.uniform(15.0, 40.0)),
        bias=float(rng.uniform(0.03, 0.1)),
        bias_coef=rng.standard_normal((3, 3, 3)),
        lut=_contrast_lut(rng),
    )


def _phase_axis(orientation: str) -> int:
    """Array axis of the in-plane phase encoding (anterior-posterior): 2 = columns, 1 = rows."""
    return 2 if orientation == "sagittal" else 1


def _t1_artefacts(
    signal: np.ndarray, grid: Grid, plan: SubjectPlan, acq: Acquisition, rng: np.random.Generator
) -> tuple[np.ndarray, Grid, list[str]]:
    """Acquisition artefacts of the anomaly kinds that act on the complex signal."""
    notes: list[str] = []
    if plan.kind == "ghosting":
        signal, note = _ghosting(signal, _phase_axis(acq.orientation), rng)
        notes.append(note)
    elif plan.kind == "spike":
        signal, note = _spike(signal, rng)
        notes.append(note)
    elif plan.kind == "wraparound":
        keep = float(rng.uniform(0.68, 0.76))
        axis = _phase_axis(acq.orientation)
        signal, start = _fold(signal, axis, keep)
        grid = grid.cropped(axis, start, signal.shape[axis])
        notes.append(f"wrap-around: phase field of view cut to {keep:.0%}, the head folds over")
    return signal, grid, notes


def _render_t1(
    plan: SubjectPlan,
    head: np.ndarray,
    anatomy: Anatomy,
    scanner: Scanner,
    voxel_size_mm: float,
    contrast: str = "T1w",
    *,
    series: str = "",
) -> tuple[Series, list[str]]:
    """A 3D series with the plan's anomaly, and notes describing it and the protocol: the
    audited series (T1, or T2 for ``contrast="T2w"``), or with ``series`` (``T2w``,
    ``FLAIR``) that contrast beside the T1, with draws of its own."""

    def rng(stream: str) -> np.random.Generator:
        return plan.rng(stream, series=series)

    acq = _draw_acquisition(rng("acquisition"), voxel_size_mm)
    anomaly = rng("anomaly")
    row_dir, col_dir = _axes(acq.orientation, acq.tilt_deg)
    grid = _fit_grid(
        anatomy,
        row_dir=row_dir,
        col_dir=col_dir,
        pixel_mm=acq.pixel_mm,
        slice_mm=acq.slice_mm,
        margins_mm=acq.margins_mm,
    )
    notes: list[str] = []
    if contrast == "FLAIR":
        lut, wrong = _flair_lut(rng("contrast")), ""
    elif contrast == "T2w":
        lut = acq.lut if plan.kind == "wrong_contrast" else _t2_lut(rng("contrast"))
        wrong = "T1-like (CSF dark, white matter bright) labelled as T2"
    else:
        lut = _T2_LUT if plan.kind == "wrong_contrast" else acq.lut
        wrong = "T2-like (CSF bright, white matter dark) labelled as T1"
    if plan.kind == "wrong_contrast":
        notes.append(f"wrong contrast: {wrong}")
    image = np.interp(_sample(head, anatomy, grid), *lut).astype(np.float32)
    bias = float(anomaly.uniform(0.35, 0.45)) if plan.kind == "bias" else acq.bias
    if plan.kind == "bias":
        notes.append(f"strong bias field: +-{bias:.0%}")
    image *= _bias_field(bias, acq.bias_coef, head=image > 0.1)
    signal, grid, artefact_notes = _t1_artefacts(image, grid, plan, acq, anomaly)
    notes += artefact_notes
    snr = float(anomaly.uniform(3.0, 5.0)) if plan.kind == "noise" else acq.snr
    if plan.kind == "noise":
        notes.append(f"heavy noise: SNR {snr:.1f} (white matter / noise sigma)")
    magnitude = _rician(signal, _WM / snr, rng("noise"))
    scaling = _draw_scaling(rng("scaling"), scanner.vendor.bits_stored)
    frames = scaling.store(magnitude)
    dropped: frozenset[int] = frozenset()
    if plan.kind == "missing_slices":
        n = grid.shape[0]
        count = int(anomaly.integers(4, 9) if plan.variant == "zeroed" else anomaly.integers(3, 7))
        count = min(count, max(2, n // 6))
        # A block in the middle third, so a central slice of the other planes crosses it.
        first = int(anomaly.integers(n // 3, max(n // 3 + 1, 2 * n // 3 - count + 1)))
        block = range(first, first + count)
        if plan.variant == "removed":
            dropped = frozenset(block)
            notes.append(f"missing slices: files of slices {first + 1}-{first + count} removed")
        else:
            frames[first : first + count] = 0
            notes.append(f"missing slices: slices {first + 1}-{first + count} all zero")
    vendor = scanner.vendor
    if contrast == "FLAIR":
        # Variable-flip-angle turbo spin echo after a long inversion (SPACE/CUBE/VIEW FLAIR).
        tags = {
            **vendor.t2_tags,
            "SequenceName": vendor.flair_3d_sequence,
            "ScanningSequence": ["SE", "IR"],
        }
        timing = {
            "RepetitionTime": 5000.0,
            "EchoTime": 387.0,
            "InversionTime": 1800.0,
            "FlipAngle": 120.0,
        }
        description = vendor.flair_3d_description[acq.orientation]
        train = 278
    elif contrast == "T2w":
        # Variable-flip-angle turbo spin echo (SPACE, CUBE, VISTA): long TR and TE.
        tags = {**vendor.t2_tags, "SequenceName": vendor.t2_3d_sequence}
        timing = {"RepetitionTime": 3200.0, "EchoTime": 408.0, "FlipAngle": 120.0}
        description = vendor.t2_3d_description[acq.orientation]
        train = 282
    else:
        tags = dict(vendor.t1_tags)
        tr, te, ti, flip = vendor.t1_timing[scanner.field_t]
        timing = {"RepetitionTime": tr, "EchoTime": te, "InversionTime": ti, "FlipAngle": flip}
        description = vendor.t1_description[acq.orientation]
        train = 1 if vendor.name == "Siemens" else 150
    tags.update(
        MRAcquisitionType="3D",
        **timing,
        ImageType=["ORIGINAL", "PRIMARY", "M", "ND"],
        InPlanePhaseEncodingDirection="ROW" if _phase_axis(acq.orientation) == 2 else "COL",
        EchoTrainLength=train,
    )
    summary = (
        f"{vendor.name} {scanner.model} {scanner.field_t:g}T, {acq.orientation} 3D "
        f"{contrast.removesuffix('w')} "
        f"{acq.pixel_mm:.2f}x{acq.pixel_mm:.2f}x{acq.slice_mm:.2f} mm"
        + (f" tilted {acq.tilt_deg:.1f} deg" if acq.tilt_deg else "")
        + f", SNR {snr:.0f}"
    )
    rendered = Series(
        role=series.lower() or "t1",
        number=0,
        description=description,
        frames=frames,
        positions=grid.positions(),
        orientations=np.tile(grid.orientation(), (grid.shape[0], 1)),
        pixel_mm=acq.pixel_mm,
        thickness_mm=acq.slice_mm,
        spacing_mm=acq.slice_mm,
        scaling=scaling,
        tags=tags,
        dropped=dropped,
    )
    if series:
        notes = [f"{series} only: {note}" for note in notes]
    return rendered, [*notes, summary]


def _render_localizer(
    head: np.ndarray,
    anatomy: Anatomy,
    scanner: Scanner,
    voxel_size_mm: float,
    rng: np.random.Generator,
) -> Series:
    """Three orthogonal low-resolution slices through the head centre, one series."""
    pixel = round(2.0 * voxel_size_mm, 4)
    n = int(np.ceil(280.0 / pixel / 2) * 2)
    frames, positions, orientations = [], [], []
    centre = anatomy.centre_scanner
    for plane in ("sagittal", "coronal", "axial"):
        row_dir, col_dir = _axes(plane, 0.0)
        origin = centre - (n - 1) * pixel / 2 * (row_dir + col_dir)
        grid = Grid(np.round(origin, 4), row_dir, col_dir, pixel, 7.0, (1, n, n))
        image = _sample(head, anatomy, grid) ** 0.7
        frames.append(_rician(image, 0.07, rng)[0])
        positions.append(grid.origin)
        orientations.append(grid.orientation())
    scaling = _draw_scaling(rng, scanner.vendor.bits_stored)
    tags = {
        "MRAcquisitionType": "2D",
        "SequenceName": "*fl2d1" if scanner.vendor.name == "Siemens" else "fgre",
        "ScanningSequence": "GR",
        "SequenceVariant": ["SP", "OSP"],
        "RepetitionTime": 8.6,
        "EchoTime": 4.0,
        "FlipAngle": 20.0,
        "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"],
        "InPlanePhaseEncodingDirection": "ROW",
    }
    return Series(
        role="localizer",
        number=0,
        description=scanner.vendor.localizer_description,
        frames=scaling.store(np.stack(frames)),
        positions=np.stack(positions),
        orientations=np.stack(orientations),
        pixel_mm=pixel,
        thickness_mm=7.0,
        spacing_mm=7.0,
        scaling=scaling,
        tags=tags,
    )


def _render_t2(
    head: np.ndarray,
    anatomy: Anatomy,
    scanner: Scanner,
    voxel_size_mm: float,
    rng: np.random.Generator,
) -> Series:
    """A small 2D axial T2 (thick slices with a 20 % gap): a distractor series."""
    pixel = round(2.0 * voxel_size_mm, 4)
    thickness = round(4.0 * voxel_size_mm, 4)
    row_dir, col_dir = _axes("axial", 0.0)
    grid = _fit_grid(
        anatomy,
        row_dir=row_dir,
        col_dir=col_dir,
        pixel_mm=pixel,
        slice_mm=round(thickness * 1.2, 4),
        margins_mm=np.array([-20.0, 10.0, 10.0]),
    )
    image = np.interp(_sample(head, anatomy, grid), *_T2_LUT).astype(np.float32)
    scaling = _draw_scaling(rng, scanner.vendor.bits_stored)
    tags = dict(scanner.vendor.t2_tags)
    tags.update(
        MRAcquisitionType="2D",
        RepetitionTime=float(rng.choice([4000.0, 4500.0, 5000.0])),
        EchoTime=float(rng.choice([85.0, 98.0, 102.0])),
        FlipAngle=150.0 if scanner.vendor.name == "Siemens" else 90.0,
        ImageType=["ORIGINAL", "PRIMARY", "M", "ND"],
        InPlanePhaseEncodingDirection="COL",
        EchoTrainLength=16,
    )
    return Series(
        role="t2",
        number=0,
        description=scanner.vendor.t2_description,
        frames=scaling.store(_rician(image, _WM / 20.0, rng)),
        positions=grid.positions(),
        orientations=np.tile(grid.orientation(), (grid.shape[0], 1)),
        pixel_mm=pixel,
        thickness_mm=thickness,
        spacing_mm=grid.slice_mm,
        scaling=scaling,
        tags=tags,
    )


def render_subject(
    plan: SubjectPlan, *, voxel_size_mm: float, contrast: str = "T1w"
) -> SubjectScan:
    """Render every series of one subject in memory (nothing written).

    The audited 3D series, T1 (``contrast="T1w"``) or T2 (``"T2w"``, protocol
    names of SPACE, CUBE and 3D TSE), has (slices, rows, columns) about head
    size / ``voxel_size_mm`` voxels; localizer and the 2D T2 are coarser (2x
    pixel size).
    """
    if contrast not in ("T1w", "T2w"):
        message = f"unknown contrast {contrast!r}; expected 'T1w' or 'T2w'"
        raise ValueError(message)
    scanner = _draw_scanner(plan.rng("scanner"))
    head, points = _head(plan)
    anatomy = _draw_anatomy(plan.rng("anatomy"), points)
    scan = SubjectScan(plan=plan, scanner=scanner, anatomy=anatomy)
    if plan.kind == "empty_folder":
        scan.notes.append("empty folder: no files at all")
        return scan
    # The anomaly is in one contrast: the T1 (and what else shows the head) or another.
    in_t1 = plan.anomaly_contrast == "T1w"
    normal = replace(plan, kind="normal", variant="")
    normal_head = anomalous_head = head
    if plan.kind == "lesion":
        anomalous_head, scan.lesion = _add_lesion(head, plan)
        centre = ", ".join(f"{v:g}" for v in scan.lesion.centre_mni_mm)
        # A lesion of another contrast is bright there (T2: the T1-dark kind; FLAIR: the
        # T1-bright kind, through their look-up tables).
        what = scan.lesion.contrast if in_t1 else f"{plan.anomaly_contrast} only: bright"
        scan.notes.append(f"{what} lesion, radius {scan.lesion.radius_mm:g} mm at MNI ({centre})")
        if in_t1:
            head = anomalous_head
    extra = plan.rng("extra")
    if plan.has_localizer:
        scan.series.append(_render_localizer(head, anatomy, scanner, voxel_size_mm, extra))
    if plan.kind == "localizer_only":
        scan.notes.append("localizer only: no T1 (or any other image) series")
    else:
        if plan.has_t2:
            scan.series.append(_render_t2(head, anatomy, scanner, voxel_size_mm, extra))
        t1_plan = plan if in_t1 else normal
        t1, notes = _render_t1(t1_plan, head, anatomy, scanner, voxel_size_mm, contrast)
        scan.series.append(t1)
        scan.notes += notes
        for extra in plan.contrasts:
            mine = plan.anomaly_contrast == extra
            rendered, extra_notes = _render_t1(
                plan if mine else normal,
                anomalous_head if mine else normal_head,
                anatomy,
                scanner,
                voxel_size_mm,
                extra,
                series=extra,
            )
            scan.series.append(rendered)
            # The protocol summary of the T1 is enough; an anomaly's notes are kept.
            scan.notes += extra_notes[:-1]
    if plan.kind == "truncated_file":
        scan.notes.insert(0, "truncated file: one T1 DICOM file cut inside its pixel data")
    step = scanner.vendor.series_step
    for position, series in enumerate(scan.series, start=1):
        series.number = position * step + (1 if step > 1 else 0)
    return scan
