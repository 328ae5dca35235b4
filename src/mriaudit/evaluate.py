"""Detection metrics of the audit against known labels (1 = anomalous, 0 = normal).

Two views of the same cohort:

- the continuous ``audit_score`` over labelled subjects that have one
  (AUROC, AUPRC with stratified bootstrap 95 % CIs, ROC and PR curves, and the
  operating point at the audit threshold the flags use), and the same
  figures of the model's ``anomaly_score`` alone (``model_only``);
- the final ``flagged`` column over every labelled subject, where a failed or
  ``no_series`` subject counts as flagged (it is excluded either way).

When the labels also give lesions (centre and radius, see
:func:`mriaudit.cohort.read_lesions`), their anomaly maps are checked too: is
the map's maximum in the lesion, and how well do map values separate lesion
voxels from the rest (voxel-level AUPRC)?
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from mriaudit import cohort, paths
from mriaudit.aggregate import flag_settings, read_scores, subject_image, table_threshold
from mriaudit.aggregate.rows import contrast_column
from mriaudit.records import OK, write_json

log = logging.getLogger(__name__)

#: Curves are thinned to at most this many points (enough for a figure).
MAX_CURVE_POINTS = 500
#: A map maximum at most this far (mm) outside a lesion still finds it.
LOCALISATION_TOLERANCE_MM = 5.0


def confusion(labels: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """Counts and rates of binary predictions (n,) bool against labels (n,) 0/1.

    tpr (sensitivity), fpr, precision and f1 are NaN where undefined.
    """
    y = np.asarray(labels).astype(bool)
    p = np.asarray(predicted).astype(bool)
    tp, fp = int(np.sum(p & y)), int(np.sum(p & ~y))
    fn, tn = int(np.sum(~p & y)), int(np.sum(~p & ~y))

    def ratio(a: int, b: int) -> float:
        return a / b if b else math.nan

    precision, tpr = ratio(tp, tp + fp), ratio(tp, tp + fn)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "tpr": tpr,
        "fpr": ratio(fp, fp + tn),
        "precision": precision,
        "f1": f1,
    }


def rank_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC as the Mann-Whitney U statistic with midranks for ties (equals sklearn's).

    ``labels`` (n,) 0/1 with both classes present, ``scores`` (n,) float.
    Several times faster than ``roc_auc_score``, which matters inside a bootstrap.
    """
    y = np.asarray(labels).astype(bool)
    ranks = stats.rankdata(scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def step_average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision, the step-wise sum sklearn's ``average_precision_score`` computes.

    ``AP = sum_k (R_k - R_{k-1}) P_k`` over the distinct score thresholds,
    highest first; ``labels`` (n,) 0/1 with at least one positive.
    """
    order = np.argsort(-np.asarray(scores, dtype=float), kind="mergesort")
    s = np.asarray(scores, dtype=float)[order]
    y = np.asarray(labels)[order].astype(float)
    # Last index of every run of equal scores: one operating point per threshold.
    last = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tps = np.cumsum(y)[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def bootstrap_ci(
    labels: np.ndarray, scores: np.ndarray, *, n_bootstrap: int, seed: int
) -> dict[str, list[float] | None]:
    """95 % percentile CIs of AUROC and AUPRC by stratified bootstrap.

    Positives and negatives are resampled separately (with replacement), so
    every resample keeps the class counts and both metrics stay defined.
    """
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=float)
    positives, negatives = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if n_bootstrap < 1 or positives.size == 0 or negatives.size == 0:
        return {"auroc": None, "auprc": None}
    rng = np.random.default_rng(seed)
    aurocs, auprcs = np.empty(n_bootstrap), np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        sample = np.concatenate(
            [rng.choice(positives, positives.size), rng.choice(negatives, negatives.size)]
        )
        aurocs[b] = rank_auroc(y[sample], s[sample])
        auprcs[b] = step_average_precision(y[sample], s[sample])
    return {
        "auroc": np.percentile(aurocs, [2.5, 97.5]).tolist(),
        "auprc": np.percentile(auprcs, [2.5, 97.5]).tolist(),
    }


def lesion_localisation(
    anomaly_map: str | Path,
    *,
    centre_mm: tuple[float, float, float],
    radius_mm: float,
    tolerance_mm: float = LOCALISATION_TOLERANCE_MM,
) -> dict[str, Any]:
    """Where a voxel anomaly map peaks against a known spherical lesion.

    ``centre_mm`` is the lesion centre in the map's world coordinates (mm),
    ``radius_mm`` its radius. Over the map's finite voxels: ``peak_mm`` (world
    mm of the maximum), ``peak_distance_mm`` (from the lesion surface, 0 when
    inside), ``hit`` (that distance <= ``tolerance_mm``), ``lesion_voxels``
    and ``voxel_auprc`` (average precision of map values for voxels inside the
    sphere; None when the map holds no lesion voxel). Raises ``ValueError``
    when the map has no finite voxel.
    """
    image = nib.load(anomaly_map)
    data = np.asarray(image.dataobj, dtype=np.float32)
    finite = np.isfinite(data)
    if not finite.any():
        message = f"anomaly map {Path(anomaly_map).name} has no finite voxel"
        raise ValueError(message)
    voxels = np.argwhere(finite)  # row order matches data[finite]
    world = voxels @ image.affine[:3, :3].T + image.affine[:3, 3]
    distance = np.linalg.norm(world - np.asarray(centre_mm, dtype=float), axis=1)
    values = data[finite]
    inside = distance <= radius_mm
    peak = int(np.argmax(values))
    peak_distance = max(0.0, float(distance[peak]) - radius_mm)
    auprc = (
        float(average_precision_score(inside, values))
        if inside.any() and not inside.all()
        else None
    )
    return {
        "peak_mm": [round(float(v), 1) for v in world[peak]],
        "peak_distance_mm": round(peak_distance, 2),
        "hit": peak_distance <= tolerance_mm,
        "lesion_voxels": int(inside.sum()),
        "voxel_auprc": auprc,
    }


def localisation_summary(
    out_dir: Path, frame_rows: list[dict[str, Any]], lesions: dict[str, tuple[float, ...]]
) -> dict[str, Any]:
    """``lesion_localisation`` of every subject with a known lesion, and the cohort summary.

    ``frame_rows`` are scores.tsv rows (``folder``, ``bids_id``, ``status``). A
    lesion subject without a usable anomaly map counts as a miss, with the reason.
    """
    cases = []
    for row in frame_rows:
        if row["folder"] not in lesions:
            continue
        *centre, radius = lesions[row["folder"]]
        case: dict[str, Any] = {"folder": row["folder"], "radius_mm": radius, "hit": False}
        anomaly_map = subject_image(out_dir, row["bids_id"], "anomaly_map")
        try:
            if row["status"] != OK or anomaly_map is None or not anomaly_map.is_file():
                message = f"no anomaly map (status {row['status']})"
                raise ValueError(message)
            case.update(lesion_localisation(anomaly_map, centre_mm=tuple(centre), radius_mm=radius))
        except Exception as error:
            # A damaged map (truncated gzip, not a NIfTI) is a miss with its reason.
            case["problem"] = str(error) or type(error).__name__
        cases.append(case)
    auprcs = [c["voxel_auprc"] for c in cases if c.get("voxel_auprc") is not None]
    n_hit = sum(c["hit"] for c in cases)
    return {
        "n": len(cases),
        "n_hit": n_hit,
        "hit_rate": n_hit / len(cases) if cases else None,
        "tolerance_mm": LOCALISATION_TOLERANCE_MM,
        "voxel_auprc_mean": float(np.mean(auprcs)) if auprcs else None,
        "voxel_auprc_median": float(np.median(auprcs)) if auprcs else None,
        "cases": cases,
    }


def _thin(points: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """Keep at most MAX_CURVE_POINTS evenly spaced points (first and last kept)."""
    n = len(next(iter(points.values())))
    keep = np.arange(n)
    if n > MAX_CURVE_POINTS:
        keep = np.unique(np.linspace(0, n - 1, MAX_CURVE_POINTS).round().astype(int))
    return {name: np.asarray(values, dtype=float)[keep].tolist() for name, values in points.items()}


def _curves(y: np.ndarray, s: np.ndarray, *, n_bootstrap: int, seed: int) -> dict[str, Any]:
    """AUROC, AUPRC (with bootstrap CIs) and thinned ROC and PR curves of scores ``s`` (n,)."""
    intervals = bootstrap_ci(y, s, n_bootstrap=n_bootstrap, seed=seed)
    fpr, tpr, roc_thresholds = roc_curve(y, s)
    precision, recall, pr_thresholds = precision_recall_curve(y, s)
    return {
        "auroc": float(roc_auc_score(y, s)),
        "auprc": float(average_precision_score(y, s)),
        "auroc_ci": intervals["auroc"],
        "auprc_ci": intervals["auprc"],
        "roc_curve": _thin({"fpr": fpr, "tpr": tpr, "threshold": roc_thresholds}),
        # precision_recall_curve has one threshold fewer than points (the last point has none).
        "pr_curve": _thin(
            {
                "precision": precision,
                "recall": recall,
                "threshold": np.append(pr_thresholds, np.nan),
            }
        ),
    }


def label_contrasts(labels_path: Path) -> dict[str, str]:
    """The labels file's optional ``contrast`` column: {folder: contrast an anomaly is in}
    (rows without one are left out: the T1w)."""
    table = cohort.read_labels_table(labels_path)
    if "contrast" not in table:
        return {}
    named = table["contrast"].fillna("").astype(str).str.strip()
    return {f: c for f, c in zip(table["folder"], named, strict=True) if c}


def _contrast_curves(
    frame: pd.DataFrame, column: str, y: np.ndarray, labelled: np.ndarray, **bootstrap: int
) -> dict[str, Any]:
    """AUROC/AUPRC (with CIs) of the score ``column`` over the ``labelled`` rows, truth ``y``;
    None when one class is absent. Unscored rows (the model could not train) rank
    lowest: a detector that said nothing."""
    score = frame[column].to_numpy(dtype=float) if column in frame else np.full(len(frame), np.nan)
    finite = np.isfinite(score)
    ranked = np.where(finite, score, float(score[finite].min()) - 1.0 if finite.any() else 0.0)
    out: dict[str, Any] = {"score": column, "n_scored": int((labelled & finite).sum())}
    if y.any() and (y == 0).any():
        curves = _curves(y, ranked[labelled], **bootstrap)
        out.update({k: curves[k] for k in ("auroc", "auroc_ci", "auprc", "auprc_ci")})
    else:
        out.update({"auroc": None, "auroc_ci": None, "auprc": None, "auprc_ci": None})
    return out


def _contrast_metrics(
    frame: pd.DataFrame,
    contrast: str,
    subject_truth: np.ndarray,
    in_contrast: np.ndarray,
    *,
    n_bootstrap: int,
    seed: int,
) -> dict[str, Any]:
    """Detection in one contrast beside the T1w against the anomalies labelled in that
    contrast, over the labelled subjects whose contrast was audited: its audit score
    (``<contrast>_audit_score``), its flags, and its model alone (``model_only``:
    ``<contrast>_anomaly_score``), as the T1w's figures."""
    audited = (frame[contrast_column(contrast, "status")].fillna("").astype(str) == OK).to_numpy()
    labelled = audited & (subject_truth >= 0)
    positive = (subject_truth == 1) & (in_contrast == contrast)
    y = positive[labelled].astype(int)
    flags = frame["flag_reasons"].fillna("").astype(str).str.contains(f"{contrast}: ", regex=False)
    bootstrap = {"n_bootstrap": n_bootstrap, "seed": seed}
    audit = _contrast_curves(
        frame, contrast_column(contrast, "audit_score"), y, labelled, **bootstrap
    )
    model = _contrast_curves(
        frame, contrast_column(contrast, "anomaly_score"), y, labelled, **bootstrap
    )
    return {
        **audit,
        "n_pos": int(y.sum()),
        "n_neg": int((y == 0).sum()),
        "flagged": confusion(y, flags.to_numpy()[labelled]),
        "model_only": model,
    }


def evaluate_cohort(
    scores_tsv: Path,
    labels_path: Path,
    *,
    out_metrics: Path,
    flag: dict[str, Any],
    output_dir: Path,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Compute detection metrics from scores.tsv and the labels TSV; write metrics.json.

    Positive class: truth 1 (anomalous), of the T1w (an anomaly labelled in another
    ``contrast`` counts in ``contrasts``, where that contrast's model and flags are
    judged; ``flagged`` judges the subject's flag on any contrast); score:
    ``audit_score`` (higher = more anomalous), and ``model_only`` for ``anomaly_score``. AUROC/AUPRC are None
    when the scored subjects hold one class only. ``localisation`` (``localisation_summary``, anomaly maps read from
    ``output_dir``) is None when the labels give no lesion. Returns the metrics
    dict that is written.
    """
    frame = read_scores(scores_tsv)
    labels = cohort.read_labels(labels_path)
    folders = frame["folder"].tolist()
    known = set(folders)
    unmatched = sorted(set(labels) - known)
    if unmatched:
        log.warning(
            "%d labelled subjects are not in scores.tsv, e.g. %s", len(unmatched), unmatched[:3]
        )
    subject_truth = np.array([labels.get(f, -1) for f in folders])
    anomaly_in = label_contrasts(labels_path)
    in_contrast = np.array([anomaly_in.get(f, "T1w") for f in folders])
    # The T1w's scores are judged on the T1w: an anomaly planted in another contrast
    # leaves its subject's T1w normal (that contrast's model is judged on it below).
    truth = np.where((subject_truth == 1) & (in_contrast != "T1w"), 0, subject_truth)
    labelled = truth >= 0
    score = frame["audit_score"].to_numpy(dtype=float)
    status = frame["status"].to_numpy(dtype=str)
    scored = labelled & np.isfinite(score)
    y, s = truth[scored], score[scored]

    threshold = table_threshold(frame, flag=flag)
    unscored = [
        {"folder": folders[i], "truth": int(truth[i]), "status": status[i]}
        for i in np.flatnonzero(labelled & ~scored)
    ]
    metrics: dict[str, Any] = {
        "n_subjects": len(frame),
        "n_labelled": int(labelled.sum()),
        "n_labels_not_in_cohort": len(unmatched),
        "n_pos": int((y == 1).sum()),
        "n_neg": int((y == 0).sum()),
        "n_unscored": len(unscored),
        "n_unscored_pos": sum(u["truth"] == 1 for u in unscored),
        "n_unscored_neg": sum(u["truth"] == 0 for u in unscored),
        "unscored": unscored,
        "flag": flag_settings(flag),
        "audit_threshold": threshold,
        "auroc": None,
        "auroc_ci": None,
        "auprc": None,
        "auprc_ci": None,
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "roc_curve": None,
        "pr_curve": None,
    }
    if metrics["n_pos"] and metrics["n_neg"]:
        metrics.update(_curves(y, s, n_bootstrap=n_bootstrap, seed=seed))
    else:
        log.warning(
            "AUROC/AUPRC undefined: %d positive and %d negative scored subjects",
            metrics["n_pos"],
            metrics["n_neg"],
        )
    model = frame["anomaly_score"].to_numpy(dtype=float)
    model_scored = labelled & np.isfinite(model)
    y_model = truth[model_scored]
    metrics["model_only"] = {
        "score": "anomaly_score",
        "n_pos": int((y_model == 1).sum()),
        "n_neg": int((y_model == 0).sum()),
        **(
            _curves(y_model, model[model_scored], n_bootstrap=n_bootstrap, seed=seed)
            if (y_model == 1).any() and (y_model == 0).any()
            else {"auroc": None, "auprc": None, "roc_curve": None, "pr_curve": None}
        ),
    }
    metrics["operating_point"] = {
        "threshold": threshold,
        "n": int(scored.sum()),
        **confusion(y, s >= threshold),
    }
    # A subject that is not ok is flagged by aggregate; enforce it for edited tables too.
    flagged = frame["flagged"].to_numpy(dtype=bool) | (status != OK)
    metrics["flagged"] = {
        "n": int(labelled.sum()),
        **confusion(subject_truth[labelled], flagged[labelled]),
    }
    metrics["contrasts"] = {
        contrast: _contrast_metrics(
            frame, contrast, subject_truth, in_contrast, n_bootstrap=n_bootstrap, seed=seed
        )
        for contrast in paths.EXTRA_CONTRASTS
        if contrast_column(contrast, "status") in frame
    }
    lesions = cohort.read_lesions(labels_path)
    metrics["localisation"] = (
        localisation_summary(Path(output_dir), frame.to_dict("records"), lesions)
        if lesions
        else None
    )
    write_json(out_metrics, metrics)
    if metrics["localisation"]:
        summary = metrics["localisation"]
        log.info(
            "map maximum within %g mm of the lesion in %d of %d lesion cases; voxel AUPRC %s",
            summary["tolerance_mm"],
            summary["n_hit"],
            summary["n"],
            _fmt(summary["voxel_auprc_mean"]),
        )
    log.info(
        "audit score AUROC %s, AUPRC %s (model alone %s, %s) over %d positive / %d negative "
        "subjects (%d unscored)",
        _fmt(metrics["auroc"]),
        _fmt(metrics["auprc"]),
        _fmt(metrics["model_only"]["auroc"]),
        _fmt(metrics["model_only"]["auprc"]),
        metrics["n_pos"],
        metrics["n_neg"],
        metrics["n_unscored"],
    )
    return metrics


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
