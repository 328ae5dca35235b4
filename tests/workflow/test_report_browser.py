"""The report in a real browser: headless Chromium (Debian package `chromium`).

`make test` installs Chromium as root on Debian; elsewhere these tests skip and say why.
"""

from __future__ import annotations

import base64
import html as html_lib
import io
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from mriaudit import cohort, paths
from mriaudit.demo.records import synthetic_report
from mriaudit.report.chromium import Browser, find_chromium

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
    """Load ``page`` and return the seconds until its load event. The events of an earlier
    page are dropped first: ``problems`` then speaks of this load, and the load event
    waited for is this one's."""
    browser.events.clear()
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
    # The page's own script is its only executable one (the other holds the cohort's JSON);
    # the planted one is text in the montage card.
    assert browser.evaluate("document.querySelectorAll('script:not([type])').length") == 1
    assert source.count("<script>") == 1
    card = browser.evaluate(
        f"document.querySelector('.montage[data-subject={json.dumps(planted)}]').textContent"
    )
    assert HOSTILE_DESCRIPTION.strip() in card
    # PatientName is set in every demo file and shown nowhere.
    assert "DEMO^SUBJECT" not in source and "DEMO^SUBJECT" not in html_lib.unescape(source)


#: Where the browser test leaves its screenshots (README shows one): results/screenshots.
SCREENSHOTS = Path(__file__).resolve().parents[2] / "results" / "screenshots"


def bright_air(picture: np.ndarray) -> float:
    """Share of the air in a native picture's axial panel brighter than 30 of 255: the air
    is everything but the head (its largest bright component, holes filled, grown by 3
    pixels). Noise leaves it near 0; a ghost's replicas of the head do not."""
    axial = picture[:, : picture.shape[0]].astype(float)
    head = ndimage.binary_fill_holes(axial > 90)
    labels, n = ndimage.label(head)
    if n:
        sizes = ndimage.sum(head, labels, range(1, n + 1))
        head = labels == int(np.argmax(sizes)) + 1
    return float((axial[~ndimage.binary_dilation(head, iterations=3)] > 30).mean())


def decode(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("L"))


def mouse(browser: Browser, kind: str, x: float, y: float, **extra) -> None:
    browser.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", **extra)


def key(browser: Browser, name: str) -> None:
    for kind in ("keyDown", "keyUp"):
        browser.call("Input.dispatchKeyEvent", type=kind, key=name)


def settle(browser: Browser) -> None:
    browser.evaluate(
        "new Promise(function (r) { requestAnimationFrame(function () { setTimeout(r, 60); }); })"
    )


def test_the_workbench_reviews_links_views_and_shows_every_scan(browser, workflow_run, tmp_path):
    page = paths.report(workflow_run.output_dir)
    out = workflow_run.output_dir
    open_page(browser, page)
    data = browser.evaluate("JSON.parse(document.getElementById('cohort-data').textContent)")
    scores = pd.read_csv(paths.scores_table(out), sep="\t", dtype=str, keep_default_na=False)
    assert [s["folder"] for s in data["subjects"]] == scores["folder"].tolist()

    # Every subject whose convert stage made a picture has its native view, in the gallery.
    pictured = {
        row["folder"]
        for row in scores.to_dict("records")
        if row["bids_id"] and paths.native_thumbnail(out, row["bids_id"]).is_file()
    }
    assert pictured and pictured == {s["folder"] for s in data["subjects"] if s["native"]}
    cards = browser.evaluate(
        "Array.from(document.querySelectorAll('.thumb[data-subject]')).filter(function (c) {"
        " var i = c.querySelector('img.native'); return i && i.dataset.src; })"
        ".map(function (c) { return c.dataset.subject; })"
    )
    assert set(cards) == pictured

    # A ghost in the air shows in its native picture: bright air where clean scans have none.
    labels = pd.read_csv(workflow_run.labels, sep="\t", dtype=str)
    kinds = dict(zip(labels["folder"], labels["kind"], strict=True))
    air = {s["folder"]: bright_air(decode(s["native"])) for s in data["subjects"] if s["native"]}
    ghosts = [f for f in air if kinds.get(f) == "ghosting"]
    clean = [f for f in air if kinds.get(f) == "normal"]
    assert ghosts and clean
    assert min(air[f] for f in ghosts) > max(0.05, 5 * max(air[f] for f in clean)), air

    # A brush on one strip (real mouse drag) filters the table to the subjects in its range.
    area = browser.evaluate(
        "(function () { var a = document.querySelector("
        "'g.strip[data-metric=audit_score] rect.brush-area'); a.scrollIntoView({block: 'center'});"
        " var r = a.getBoundingClientRect(); return {l: r.left, t: r.top, w: r.width, h: r.height}; })()"
    )
    y = area["t"] + area["h"] / 2
    start, end = area["l"] + 0.05 * area["w"], area["l"] + 0.5 * area["w"]
    mouse(browser, "mousePressed", start, y, clickCount=1)
    mouse(browser, "mouseMoved", (start + end) / 2, y, buttons=1)
    mouse(browser, "mouseMoved", end, y, buttons=1)
    mouse(browser, "mouseReleased", end, y, clickCount=1)
    settle(browser)
    low, high = browser.evaluate("window.mriaudit.brushes()")["audit_score"]
    index = [m["key"] for m in data["metrics"]].index("audit_score")
    inside = sorted(
        s["folder"]
        for s in data["subjects"]
        if s["values"][index] is not None and low <= s["values"][index] <= high
    )
    assert 0 < len(inside) < len(scores)
    assert sorted(browser.evaluate("window.mriaudit.visibleFolders()")) == inside
    assert visible_rows(browser) == len(inside)
    browser.screenshot(tmp_path / "linked-views.png", selector="#linked-views")
    browser.evaluate("document.getElementById('clear-brush').click()")
    settle(browser)
    assert visible_rows(browser) == len(scores)

    # Clicking a point of the embedding selects that subject's row and shows its view.
    point = browser.evaluate(
        "(function () { var c = document.querySelector('#embedding circle[data-subject]');"
        " c.scrollIntoView({block: 'center'}); var r = c.getBoundingClientRect();"
        " var x = r.left + r.width / 2, y = r.top + r.height / 2;"
        " var hit = document.elementFromPoint(x, y);"
        " return {x: x, y: y, folder: hit.getAttribute('data-subject')}; })()"
    )
    mouse(browser, "mousePressed", point["x"], point["y"], clickCount=1)
    mouse(browser, "mouseReleased", point["x"], point["y"], clickCount=1)
    settle(browser)
    selected = browser.evaluate(
        "Array.from(document.querySelectorAll('tr.selected')).map(function (r) {"
        " return r.dataset.subject; })"
    )
    assert selected == [point["folder"]]
    view = browser.evaluate(
        "(function () { var v = document.getElementById('subject-view');"
        " return [v.hidden, v.dataset.subject]; })()"
    )
    assert view == [False, point["folder"]]
    browser.screenshot(tmp_path / "subject-view.png", selector="#subject-view")

    # Keyboard review: the queue starts with the flagged subjects; exclude, keep, undecided.
    flagged = [s["folder"] for s in data["subjects"] if s["flagged"]]
    assert len(flagged) >= 3
    browser.evaluate("document.getElementById('start-review').click()")
    reviewed = []
    for name in ("x", "a", "u"):
        reviewed.append(browser.evaluate("document.querySelector('tr.current').dataset.subject"))
        key(browser, name)
    assert reviewed == flagged[:3]
    key(browser, "Escape")
    decided = dict(zip(reviewed, ("exclude", "keep", "undecided"), strict=True))

    def decisions_in_page() -> dict[str, str]:
        return browser.evaluate(
            "Object.fromEntries(Array.from(document.querySelectorAll('tr[data-subject]'))"
            ".map(function (r) { return [r.dataset.subject, r.querySelector('select').value]; }))"
        )

    assert {f: decisions_in_page()[f] for f in reviewed} == decided
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.call("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads))
    browser.evaluate("document.getElementById('export-decisions').click()")
    deadline = time.monotonic() + 20
    while not list(downloads.glob("*.tsv")) and time.monotonic() < deadline:
        time.sleep(0.2)
    exported = pd.read_csv(
        next(downloads.glob("*.tsv")), sep="\t", dtype=str, keep_default_na=False
    ).set_index("folder")
    assert {f: exported.at[f, "decision"] for f in reviewed} == decided
    assert [exported.at[f, "truth"] for f in reviewed] == ["1", "0", ""]

    assert problems(browser, page) == {"errors": [], "requests": []}

    # A reload of the same report keeps the decisions (localStorage, keyed by the run).
    open_page(browser, page)
    assert {f: decisions_in_page()[f] for f in reviewed} == decided
    assert problems(browser, page) == {"errors": [], "requests": []}

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.screenshot(SCREENSHOTS / "summary.png", selector="#summary")
    for name in ("linked-views.png", "subject-view.png"):
        (SCREENSHOTS / name).write_bytes((tmp_path / name).read_bytes())
    for name in ("summary.png", "linked-views.png", "subject-view.png"):
        assert (SCREENSHOTS / name).stat().st_size > 20_000, name


def test_report_of_1000_subjects_is_small_and_renders(browser, tmp_path):
    cap = 25
    built = synthetic_report(tmp_path / "cohort", 1000, report={"max_montages": cap})
    page, frame = built["page"], built["frame"]
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
