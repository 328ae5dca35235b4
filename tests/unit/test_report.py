"""The HTML report: hooks, escaping, no external reference, montages, scale."""

from __future__ import annotations

import io
import os
import re
from html.parser import HTMLParser

import matplotlib.image
import pytest

from mriaudit import paths
from mriaudit.demo.records import synthetic_cohort
from mriaudit.evaluate import evaluate_cohort
from mriaudit.report import MAX_MONTAGES, build_report, make_subject_montage, sites
from tests.unit.test_aggregate import (  # the shared fake cohort
    BLOB_MM,
    HTML_FOLDER,
    HTML_STRING,
    _anomaly_map,
    built_cohort,  # noqa: F401  (fixture)
    copy_cohort,
    grid,  # noqa: F401  (fixture)
    run_aggregate,
)

#: Subjects of the large-cohort test (the benchmark times 10,000: `make bench`).
SCALE_SUBJECTS = int(os.environ.get("MRIAUDIT_SCALE_SUBJECTS", "1000"))


class Hooks(HTMLParser):
    """Collects ids, the subject rows and the montages (with whether they hold an image)."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.table_rows: list[str] = []
        self.montages: dict[str, bool] = {}
        self.external: list[str] = []
        self.in_subjects = False
        self.montage: str | None = None
        self.depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if attributes.get("id"):
            self.ids.add(attributes["id"])
        for name in ("src", "href"):
            value = attributes.get(name) or ""
            if value and not value.startswith(("#", "data:")):
                self.external.append(value)
        if tag == "table" and attributes.get("id") == "subjects":
            self.in_subjects = True
        if tag == "tr" and self.in_subjects and "data-subject" in attributes:
            self.table_rows.append(attributes["data-subject"])
        if tag == "div":
            if self.montage is not None:
                self.depth += 1
            elif "montage" in (attributes.get("class") or "").split():
                self.montage, self.depth = attributes["data-subject"], 0
                self.montages[self.montage] = False
        if tag == "img" and self.montage is not None:
            self.montages[self.montage] = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.in_subjects = False
        if tag == "div" and self.montage is not None:
            if self.depth == 0:
                self.montage = None
            else:
                self.depth -= 1


def parse(html: str) -> Hooks:
    hooks = Hooks()
    hooks.feed(html)
    return hooks


def render(cohort: dict, *, with_metrics: bool) -> str:
    cohort_dir = paths.cohort_dir(cohort["out"])
    metrics = None
    if with_metrics:
        metrics = cohort_dir / "metrics.json"
        evaluate_cohort(
            cohort_dir / "scores.tsv",
            cohort["labels"],
            out_metrics=metrics,
            flag={},
            output_dir=cohort["out"],
            n_bootstrap=50,
        )
    html_path = cohort_dir / "report.html"
    build_report(
        cohort["out"],
        scores_tsv=cohort_dir / "scores.tsv",
        exclusions_tsv=cohort_dir / "exclusions.tsv",
        metrics_json=metrics,
        config={"flag": {}, "labels": str(cohort["labels"]), "input_dir": str(cohort["input"])},
        out_html=html_path,
    )
    return html_path.read_text(encoding="utf-8")


def assert_self_contained(html: str, hooks: Hooks) -> None:
    assert hooks.external == []
    for pattern in ("http://", "https://", 'src="//', 'href="//', "url("):
        assert pattern not in html, pattern


def test_report_hooks_escaping_and_montages(built_cohort, tmp_path):  # noqa: F811
    cohort = copy_cohort(built_cohort, tmp_path)
    frame = run_aggregate(cohort)
    # A known lesion where sub-11's map peaks, so the report states its localisation.
    lines = cohort["labels"].read_text().splitlines()
    lesion = "\t".join(map(str, (*BLOB_MM, 8.0)))
    lines = [lines[0] + "\tlesion_x_mm\tlesion_y_mm\tlesion_z_mm\tlesion_radius_mm"] + [
        line + ("\t" + lesion if line.startswith("sub-11\t") else "\t\t\t\t") for line in lines[1:]
    ]
    cohort["labels"].write_text("\n".join(lines) + "\n")
    html = render(cohort, with_metrics=True)
    hooks = parse(html)
    assert {"subjects", "filter", "export-decisions", "roc", "pr", "localisation"} <= hooks.ids
    # The scanner view: one row per scanner group of scores.tsv.
    groups = frame["scanner_group"].fillna("").astype(str).replace("", sites.NO_HEADERS)
    assert "scanner-groups" in hooks.ids
    assert html.count("<tr data-group=") == groups.nunique()
    assert "within 5 mm of it in 1 of 1 labelled lesion cases" in html
    assert sorted(hooks.table_rows) == sorted(cohort["folders"])
    # Flagged first: the table keeps the scores.tsv order.
    assert hooks.table_rows == frame["folder"].tolist()
    flagged = set(frame.loc[frame["flagged"], "folder"])
    assert set(hooks.montages) == flagged
    # Ok subjects with images get a picture; the failed one (no images) and
    # folders that were never processed show their reasons only.
    assert hooks.montages["sub-11"] and hooks.montages["sub-12"]
    assert not hooks.montages["sub-bad"] and not hooks.montages["a-b"]
    assert "dcm2niix produced no image" in html
    assert "IQM robust z (bad side): iqm_snr_wm z=-" in html  # exclusions.tsv evidence on the card
    assert_self_contained(html, hooks)
    # Header strings and folder names are text, never markup.
    assert HTML_STRING not in html and "&lt;b&gt;x&lt;/b&gt;" in html
    assert HTML_FOLDER not in html and HTML_FOLDER in hooks.table_rows
    assert "AUROC" in html and "95 % CI" in html
    assert "sha256" in html and "snakemake" in html


def test_report_without_labels_or_model(built_cohort, tmp_path):  # noqa: F811
    cohort = copy_cohort(built_cohort, tmp_path)
    run_aggregate(cohort, labels=False)
    html = render(cohort, with_metrics=False)
    hooks = parse(html)
    assert "roc" not in hooks.ids and "subjects" in hooks.ids
    assert "no checkpoint found" in html
    assert_self_contained(html, hooks)


def test_montage_shows_the_region(grid):  # noqa: F811
    png = make_subject_montage(grid, _anomaly_map(grid, BLOB_MM), centre_mm=BLOB_MM)
    assert png.startswith(b"\x89PNG")
    image = matplotlib.image.imread(io.BytesIO(png))
    assert image.shape[0] == 150 and image.shape[1] > 3 * 100
    red = (image[..., 0] > 0.6) & (image[..., 2] < 0.3)
    assert red.sum() > 50  # the blob is overlaid in warm colours
    plain = matplotlib.image.imread(io.BytesIO(make_subject_montage(grid, None, centre_mm=None)))
    assert plain.shape == image.shape
    assert not ((plain[..., 0] > 0.6) & (plain[..., 2] < 0.3)).any()


def test_montage_rejects_a_missing_or_empty_image(tmp_path):
    with pytest.raises(ValueError, match="no image"):
        make_subject_montage(tmp_path / "missing.nii.gz", None, centre_mm=None)
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="no image"):
        make_subject_montage(empty, None, centre_mm=None)


def test_aggregate_and_report_of_a_large_cohort(tmp_path):
    # Timing belongs to `make bench` (mriaudit.bench); this checks what a large cohort renders.
    cohort = synthetic_cohort(tmp_path, SCALE_SUBJECTS)
    frame = run_aggregate(cohort)
    n_flagged = int(frame["flagged"].sum())
    html = render(cohort, with_metrics=False)
    hooks = parse(html)
    assert len(hooks.table_rows) == SCALE_SUBJECTS
    assert 0 < n_flagged < SCALE_SUBJECTS
    assert len(hooks.montages) == min(n_flagged, MAX_MONTAGES)
    assert re.search(r"\d+ subjects are flagged", html)


def test_report_of_an_empty_cohort(tmp_path):
    (tmp_path / "input").mkdir()
    cohort = {"input": tmp_path / "input", "out": tmp_path / "out", "labels": None}
    frame = run_aggregate(cohort, labels=False)
    assert frame.empty
    hooks = parse(render(cohort, with_metrics=False))
    assert "subjects" in hooks.ids and hooks.table_rows == [] and hooks.montages == {}
