"""The report in a real browser: headless Chromium (Debian package `chromium`).

`make test` installs Chromium as root on Debian; elsewhere these tests skip and say why.
"""

from __future__ import annotations

import html as html_lib
import json
import time
from pathlib import Path

import pandas as pd
import pytest

from mriaudit import cohort, paths
from mriaudit.aggregate import aggregate_cohort
from mriaudit.demo.records import synthetic_cohort
from mriaudit.report import build_report

from .browser import Browser, find_chromium
from .conftest import HOSTILE_DESCRIPTION, PLANTED_KIND

pytestmark = pytest.mark.workflow


@pytest.fixture
def browser(tmp_path):
    executable = find_chromium()
    if executable is None:
        pytest.skip("chromium is not installed (make test installs it as root on Debian)")
    instance = Browser(executable, tmp_path / "chromium-profile")
    # Nothing in the page may call alert(): a planted <script> that ran would.
    instance.call(
        "Page.addScriptToEvaluateOnNewDocument",
        source="window.__alerts = []; window.alert = function (m) { window.__alerts.push(m); };",
    )
    for domain in ("Page", "Runtime", "Network", "Log"):
        instance.call(f"{domain}.enable")
    yield instance
    instance.close()


def open_page(browser: Browser, page: Path) -> float:
    """Load ``page`` and return the seconds until its load event."""
    started = time.monotonic()
    browser.call("Page.navigate", url=page.resolve().as_uri())
    browser.wait_for("Page.loadEventFired", timeout=60)
    return time.monotonic() - started


def problems(browser: Browser, page: Path) -> dict[str, list]:
    """Console errors, uncaught exceptions and requests for anything but the page and data: URIs."""
    errors, requests = [], []
    for event in browser.events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.exceptionThrown":
            errors.append(params["exceptionDetails"].get("text"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(params.get("args"))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            errors.append(params["entry"].get("text"))
        elif method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if url != page.resolve().as_uri() and not url.startswith("data:"):
                requests.append(url)
    return {"errors": errors, "requests": requests}


def visible_rows(browser: Browser) -> int:
    return browser.evaluate(
        "Array.from(document.querySelectorAll('table#subjects tr[data-subject]'))"
        ".filter(function (row) { return !row.hidden; }).length"
    )


def test_demo_report_works_in_chromium(browser, workflow_run, tmp_path):
    assert workflow_run.result.returncode == 0, workflow_run.result.stderr[-3000:]
    page = paths.report(workflow_run.output_dir)
    open_page(browser, page)
    found = problems(browser, page)
    assert found["errors"] == [], found["errors"]
    assert found["requests"] == [], "the report must load nothing"

    scores = pd.read_csv(paths.scores_table(workflow_run.output_dir), sep="\t", dtype=str)
    flagged = sorted(scores.loc[scores["flagged"] == "true", "folder"])
    assert flagged
    # The ROC figure and every flagged subject's montage are there and decoded.
    assert browser.evaluate(
        "Array.from(document.querySelectorAll('#roc img'))"
        ".some(function (img) { return img.complete && img.naturalWidth > 100; })"
    )
    montages = browser.evaluate(
        "Object.fromEntries(Array.from(document.querySelectorAll('.montage[data-subject]'))"
        ".map(function (m) { var img = m.querySelector('img');"
        " return [m.dataset.subject, !!img && img.complete && img.naturalWidth > 100]; }))"
    )
    assert sorted(montages) == flagged
    # Flagged subjects that were audited show their slices; broken inputs say why there are none.
    audited = set(scores.loc[scores["status"] == "ok", "folder"])
    assert {s for s, drawn in montages.items() if drawn} == audited & set(flagged), montages

    # The filter: one subject by its folder name, then everyone again.
    everyone = len(scores)
    assert visible_rows(browser) == everyone
    target = flagged[0]
    browser.evaluate(
        f"(function () {{ var box = document.getElementById('filter'); box.value = {json.dumps(target)};"
        " box.dispatchEvent(new Event('input')); return new Promise(function (done) {"
        " setTimeout(done, 400); }); })()"
    )
    assert visible_rows(browser) == 1
    browser.evaluate(
        "(function () { var box = document.getElementById('filter'); box.value = '';"
        " box.dispatchEvent(new Event('input')); return new Promise(function (done) {"
        " setTimeout(done, 400); }); })()"
    )
    assert visible_rows(browser) == everyone

    # The reviewer export downloads a TSV with one decision per subject.
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.call(
        "Browser.setDownloadBehavior",
        behavior="allow",
        downloadPath=str(downloads),
        eventsEnabled=True,
    )
    browser.evaluate("document.getElementById('export-decisions').click()")
    deadline = time.monotonic() + 20
    while not list(downloads.glob("*.tsv")) and time.monotonic() < deadline:
        time.sleep(0.2)
    exported = list(downloads.glob("*.tsv"))
    assert exported, "the export button downloaded nothing"
    decisions = pd.read_csv(exported[0], sep="\t", dtype=str, keep_default_na=False)
    assert list(decisions.columns) == ["folder", "truth", "decision", "note"]
    assert sorted(decisions["folder"]) == sorted(scores["folder"])
    suggested = dict(zip(decisions["folder"], decisions["decision"], strict=True))
    assert {suggested[s] for s in flagged} == {"exclude"}
    # The export is a labels file the next run accepts: exclude = 1, keep = 0.
    next_labels = cohort.read_labels(exported[0])
    assert next_labels == {s: int(suggested[s] == "exclude") for s in suggested}

    shot = browser.screenshot(tmp_path / "report.png")
    assert shot.stat().st_size > 20_000, "the screenshot looks blank"


def test_a_script_in_a_header_is_shown_as_text(browser, workflow_run):
    labels = pd.read_csv(workflow_run.labels, sep="\t", dtype=str)
    planted = labels.loc[labels["kind"] == PLANTED_KIND, "folder"].iloc[0]
    scores = pd.read_csv(paths.scores_table(workflow_run.output_dir), sep="\t", dtype=str)
    row = scores.set_index("folder").loc[planted]
    assert row["hdr_series_description"].startswith(HOSTILE_DESCRIPTION.strip())
    assert row["flagged"] == "true", "the planted subject must have a montage for this test"
    page = paths.report(workflow_run.output_dir)
    source = page.read_text(encoding="utf-8")
    assert HOSTILE_DESCRIPTION.strip() not in source
    open_page(browser, page)
    assert browser.evaluate("window.__alerts.length") == 0
    # The page's own script is its only one; the planted one is text in the montage card.
    assert browser.evaluate("document.scripts.length") == source.count("<script>")
    card = browser.evaluate(
        f"document.querySelector('.montage[data-subject={json.dumps(planted)}]').textContent"
    )
    assert HOSTILE_DESCRIPTION.strip() in card
    # PatientName is set in every demo file and shown nowhere.
    assert "DEMO^SUBJECT" not in source and "DEMO^SUBJECT" not in html_lib.unescape(source)


def test_report_of_1000_subjects_is_small_and_renders(browser, tmp_path):
    cohort = synthetic_cohort(tmp_path / "cohort", 1000)
    out = cohort["out"]
    frame = aggregate_cohort(
        cohort["input"],
        out,
        labels_path=str(cohort["labels"]),
        flag={},
        out_scores=paths.scores_table(out),
        out_exclusions=paths.exclusions_table(out),
        out_subjects=paths.cohort_table(out),
    )
    cap = 25
    build_report(
        out,
        scores_tsv=paths.scores_table(out),
        exclusions_tsv=paths.exclusions_table(out),
        metrics_json=None,
        config={"flag": {}, "report": {"max_montages": cap}},
        out_html=paths.report(out),
    )
    page = paths.report(out)
    size_mb = page.stat().st_size / 1e6
    assert size_mb < 25, size_mb
    seconds = open_page(browser, page)
    print(f"\n1,000-subject report: {size_mb:.1f} MB, load event after {seconds:.2f} s")
    assert problems(browser, page) == {"errors": [], "requests": []}
    assert visible_rows(browser) == 1000
    n_flagged = int(frame["flagged"].sum())
    assert n_flagged > cap
    montages = browser.evaluate("document.querySelectorAll('.montage[data-subject]').length")
    assert montages == cap
