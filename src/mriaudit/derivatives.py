"""The output folder as a BIDS derivatives dataset: its description, sidecars and ignore list.

``dataset_description.json`` says what made the dataset (mriaudit, its
version, the run's config digest) and from what (``SourceDatasets``, and the
``raw`` link that ``Sources`` refer to). Every image gets a JSON sidecar with
what BIDS requires of a derivative T1w or mask (``SkullStripped``,
``Resolution`` where the name has ``res-``, ``Type`` of a mask) and its
``Sources`` as BIDS URIs. The parts BIDS has no name for (the stage records,
series tables, figures, the transform: BIDS has no transform suffix yet, the
cohort tables, report, model, logs and benchmarks) are listed in
``.bidsignore``, as the specification allows. The BIDS validator
(``bids-validator-deno``) passes the demo's output with no error (a test).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from mriaudit import __version__, files, paths

log = logging.getLogger(__name__)

#: BIDS version the names and sidecars follow.
BIDS_VERSION = "1.10.0"
#: What the validator must not read: everything here that BIDS has no name for. (Its
#: .bidsignore matching takes no trailing slash: "cohort/" would not match the folder.)
IGNORED = (
    "/cohort",
    "/model",
    "/logs",
    "/benchmarks",
    "/.mriaudit",
    "**/figures",
    "*_qc.json",
    "*_series.tsv",
    "*_scores.json",
    "*_xfm.mat",
)
_TEMPLATE = (
    "ICBM 2009a nonlinear symmetric MNI152 (TemplateFlow MNI152NLin2009aSym), as nilearn ships it"
)


def config_digest(config: dict[str, Any]) -> str:
    """First 12 hex digits of the SHA-256 of the config as sorted JSON: which settings made a run."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def resolution_text(res: int) -> str:
    return f"{res} mm isotropic: every {res}. voxel of the 1 mm template grid ({_TEMPLATE})"


def write_dataset_files(
    out_dir: Path, *, input_dir: Path, config: dict[str, Any]
) -> tuple[Path, Path, Path]:
    """Write ``dataset_description.json``, ``.bidsignore`` and ``README.md`` of ``out_dir``;
    returns their paths."""
    out_dir = Path(out_dir)
    source = Path(input_dir).resolve().as_uri()
    digest = config_digest(config)
    description = {
        "Name": f"mriaudit audit of {Path(input_dir).name}",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "mriaudit",
                "Version": __version__,
                "Description": f"config digest {digest}",
            }
        ],
        "SourceDatasets": [{"URL": source}],
        "DatasetLinks": {"raw": source},
    }
    readme = (
        "# mriaudit derivatives\n\n"
        f"Made by mriaudit {__version__} from {source}.\n"
        "Per scan: sub-<id>/[ses-<id>/]anat holds the converted T1w, the bias-corrected T1w,\n"
        "the head mask, the image and brain mask in template space "
        f"(space-{paths.SPACE}) and the anomaly map.\n"
        "cohort/ holds the audit (scores.tsv, exclusions.tsv, report.html, mriqc/); "
        ".bidsignore lists what BIDS has no name for.\n"
    )
    targets = (
        paths.dataset_description(out_dir),
        paths.bidsignore(out_dir),
        paths.dataset_readme(out_dir),
    )
    files.write_text(targets[0], json.dumps(description, indent=2) + "\n")
    files.write_text(targets[1], "\n".join(IGNORED) + "\n")
    files.write_text(targets[2], readme)
    log.info("%s: a BIDS derivatives dataset of %s (config digest %s)", out_dir, source, digest)
    return targets


def _uri(out_dir: Path, image: Path) -> str:
    return "bids::" + Path(image).relative_to(out_dir).as_posix()


def _sidecars(out_dir: Path, bids_id: str, res: int) -> dict[Path, dict[str, Any]]:
    image = {
        name: paths.subject_images(out_dir, bids_id, res=res)[name]
        for name in ("T1w", "n4", "head_mask", "preproc", "brain_mask", "transform", "anomaly_map")
    }
    grid = resolution_text(res)
    native = _uri(out_dir, image["T1w"])
    # The template as nilearn ships it: what the images in template space are aligned to.
    template = f"nilearn MNI152 template mni_icbm152_t1_tal_nlin_sym_09a at {res} mm"
    every = paths.subject_images(out_dir, bids_id, res=res)
    contrasts = {
        every[f"{contrast}_preproc"]: {
            "Description": (
                f"bias-corrected {contrast}, registered rigidly to the subject's T1w and "
                "resampled to the template through the T1w's affine"
            ),
            "SkullStripped": False,
            "Resolution": grid,
            "Sources": [
                _uri(out_dir, every[contrast]),
                _uri(out_dir, every[f"{contrast}_to_T1w"]),
                _uri(out_dir, image["transform"]),
            ],
            "SpatialReference": template,
        }
        for contrast in paths.EXTRA_CONTRASTS
    } | {
        every[f"{contrast}_anomaly_map"]: {
            "Description": (
                f"voxel anomaly map of the {contrast} normative model: robust z of the "
                "reconstruction error against the reference scans, smoothed"
            ),
            "Units": "robust z (dimensionless)",
            "SkullStripped": True,
            "Resolution": grid,
            "Sources": [
                _uri(out_dir, every[f"{contrast}_preproc"]),
                f"bids::model/{contrast}/model.pt",
            ],
            "SpatialReference": template,
        }
        for contrast in paths.EXTRA_CONTRASTS
    }
    return contrasts | {
        image["n4"]: {
            "Description": "N4 bias-field corrected T1w (ANTsPy), native grid",
            "SkullStripped": False,
            "Sources": [native, _uri(out_dir, image["head_mask"])],
            "SpatialReference": native,
        },
        image["head_mask"]: {
            "Type": "ROI",
            "Description": "head mask (the head and its surroundings, no air), native grid",
            "Sources": [native],
            "SpatialReference": native,
        },
        image["preproc"]: {
            "Description": "bias-corrected T1w, affinely registered and resampled to the template",
            "SkullStripped": False,
            "Resolution": grid,
            "Sources": [_uri(out_dir, image["n4"]), _uri(out_dir, image["transform"])],
            "SpatialReference": template,
        },
        image["brain_mask"]: {
            "Type": "Brain",
            "Description": "the template's brain mask (its T1 above 0.2 of its maximum, as nilearn)",
            "Resolution": grid,
            "Sources": [template],
            "SpatialReference": template,
        },
        image["anomaly_map"]: {
            "Description": (
                "voxel anomaly map of the normative model: robust z of the reconstruction error "
                "against the reference scans, smoothed; not an image of T1 contrast"
            ),
            "Units": "robust z (dimensionless)",
            "SkullStripped": True,
            "Resolution": grid,
            "Sources": [_uri(out_dir, image["preproc"]), "bids::model/model.pt"],
            "SpatialReference": template,
        },
    }


def write_sidecars(
    out_dir: Path, bids_id: str, *, res: int, only: tuple[str, ...] = ()
) -> list[Path]:
    """Write the sidecar of each image of ``bids_id`` that exists (``only``: of those images,
    by ``paths.subject_images`` name), and add ``SkullStripped`` and ``Description`` to the
    converted T1w's dcm2niix sidecar. Returns the sidecars written. A sidecar that cannot
    be written is a warning in the log: the images and records stand without it."""
    out_dir = Path(out_dir)
    images = paths.subject_images(out_dir, bids_id, res=res)
    wanted = {images[name] for name in only} if only else set(images.values())
    sidecars = {
        paths.sidecar(image): sidecar
        for image, sidecar in _sidecars(out_dir, bids_id, res).items()
        if image in wanted and image.is_file()
    }
    for name in ("T1w", *paths.EXTRA_CONTRASTS):
        converted, converted_json = images[name], images[f"{name}_sidecar"]
        if converted in wanted and converted.is_file():
            try:
                data = json.loads(converted_json.read_text())
            except (OSError, ValueError):
                data = {}
            data = data if isinstance(data, dict) else {}
            data.setdefault("SkullStripped", False)
            data.setdefault(
                "Description",
                f"the audited {name} series as dcm2niix converted it (or the input NIfTI)",
            )
            sidecars[converted_json] = data
    written = []
    for path, sidecar in sidecars.items():
        try:
            files.write_text(path, json.dumps(sidecar, indent=2) + "\n")
        except OSError as error:
            log.warning("sidecar %s not written: %s", path.name, error)
            continue
        written.append(path)
    return written
