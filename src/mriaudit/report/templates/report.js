(() => {
  "use strict";
  // The curator's workbench. Data goes in as text or attributes, never as markup.
  const table = document.getElementById("subjects");
  if (!table) { return; }
  const $ = (id) => document.getElementById(id);
  const body = table.tBodies[0];
  const rows = Array.from(body.rows); // table order at load time
  const rowOf = new Map(rows.map((r) => [r.dataset.subject, r]));
  const DECISIONS = ["keep", "exclude", "undecided"];
  const set = (node, attrs) => Object.entries(attrs).forEach(([k, v]) => node.setAttribute(k, v));
  // The SVG namespace of the page's own <svg> elements (no URL written here).
  const SVG_NS = (document.querySelector("svg") || {}).namespaceURI;
  const el = (tag, attrs, text, parent) => {
    const node = tag.startsWith("svg:")
      ? document.createElementNS(SVG_NS, tag.slice(4))
      : document.createElement(tag);
    set(node, attrs || {});
    if (text != null) { node.textContent = text; }
    if (parent) { parent.appendChild(node); }
    return node;
  };
  const num = (v) => (Number.isFinite(v) ? String(Number(v.toPrecision(3))) : "");
  const finite = Number.isFinite;

  let data = {};
  try { data = JSON.parse(($("cohort-data") || {}).textContent || "{}") || {}; } catch (e) { data = {}; }
  const subjects = Array.isArray(data.subjects) ? data.subjects : [];
  const metrics = Array.isArray(data.metrics) ? data.metrics : [];
  const groups = Array.isArray(data.groups) ? data.groups : [];
  const byFolder = new Map(subjects.map((s) => [s.folder, s]));
  const groupName = (g) => (g >= 0 && g < groups.length ? String(groups[g]) : "");
  let selected = null; // folder of the subject in the panel
  const KEY = "mriaudit:" + (data.run_id || document.body.getAttribute("data-run-id") || "");

  // ---- decisions, kept in localStorage
  const controls = new Map(rows.map((r) => [r, { sel: r.querySelector("td.dec select"), note: r.querySelector("td.dec input") }]));
  const store = Object.create(null); // folder -> {decision, note}: only the subjects the reviewer touched
  const storage = () => { try { return window.localStorage; } catch (e) { return null; } };
  try {
    const saved = JSON.parse(storage().getItem(KEY) || "{}") || {};
    Object.keys(saved).forEach((k) => { store[k] = saved[k]; });
  } catch (e) { /* no storage (strict file:// settings): decisions live in the page until exported */ }
  const save = () => { try { storage().setItem(KEY, JSON.stringify(store)); } catch (e) { /* carry on */ } };
  function setDecision(row, decision, note) {
    const c = controls.get(row);
    if (!c || !c.sel) { return false; }
    if (decision === "unsure") { decision = "undecided"; }
    if (DECISIONS.includes(decision)) { c.sel.value = decision; }
    if (typeof note === "string" && c.note) { c.note.value = note; }
    return true;
  }
  function remember(row, quiet) {
    const c = controls.get(row);
    if (!c || !c.sel) { return; }
    store[row.dataset.subject] = { decision: c.sel.value, note: c.note ? c.note.value : "" };
    row.classList.add("changed");
    if (!quiet) { save(); }
    if (row.dataset.subject === selected) { showDecision(row); }
  }
  Object.keys(store).forEach((folder) => {
    const row = rowOf.get(folder), entry = store[folder];
    if (row && entry && setDecision(row, entry.decision, entry.note)) { row.classList.add("changed"); }
  });
  body.addEventListener("change", (e) => { const row = e.target.closest("tr"); if (row) { remember(row); } });
  body.addEventListener("input", (e) => {
    const row = e.target.closest("tr");
    if (row && e.target.tagName === "INPUT") { remember(row); }
  });

  // ---- filter: the text AND every brushed range
  const texts = new Map(rows.map((row) => [row, Array.from(row.cells)
    .filter((cell) => !cell.classList.contains("dec")).map((cell) => cell.textContent).join(" ").toLowerCase()]));
  const filter = $("filter"), shown = $("shown"), brushStatus = $("brush-status");
  const brushes = new Map(); // metric key -> [lo, hi]
  const metricIndex = new Map(metrics.map((m, i) => [m.key, i]));
  const points = new Map(); // folder -> its circles in every view
  const cards = new Map(); // folder -> gallery card
  const dimmed = new Map();
  function inBrush(folder) {
    if (!brushes.size) { return true; }
    const s = byFolder.get(folder);
    if (!s || !Array.isArray(s.values)) { return false; }
    for (const [key, [lo, hi]] of brushes) {
      const v = s.values[metricIndex.get(key)];
      if (!(finite(v) && v >= lo && v <= hi)) { return false; }
    }
    return true;
  }
  function applyFilter() {
    const query = filter ? filter.value.trim().toLowerCase() : "";
    let count = 0, brushed = 0;
    rows.forEach((row) => {
      const folder = row.dataset.subject, inside = inBrush(folder);
      const hit = inside && (!query || texts.get(row).includes(query));
      row.hidden = !hit;
      count += hit;
      brushed += inside;
      const card = cards.get(folder);
      if (card) { card.hidden = !hit; }
      if (dimmed.get(folder) !== !hit) {
        dimmed.set(folder, !hit);
        (points.get(folder) || []).forEach((c) => c.classList.toggle("dim", !hit));
      }
    });
    if (shown) { shown.textContent = `${count} of ${rows.length} subjects shown`; }
    if (brushStatus) {
      brushStatus.textContent = brushes.size
        ? `${brushed} of ${rows.length} subjects in the brushed ranges`
        : "No range brushed: drag along a strip; click it to clear.";
    }
  }
  let pending = false, timer = null;
  const scheduleFilter = () => {
    if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; applyFilter(); }); }
  };
  if (filter) { filter.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(applyFilter, 120); }); }

  // ---- column sorting
  const headers = Array.from(table.tHead.rows[0].cells);
  headers.forEach((th, column) => {
    if (!th.dataset.sort) { return; }
    th.addEventListener("click", () => {
      const ascending = th.getAttribute("aria-sort") !== "ascending";
      headers.forEach((h) => h.removeAttribute("aria-sort"));
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      const numeric = th.dataset.sort === "num";
      const keyed = rows.map((row, index) => {
        const cell = row.cells[column];
        const value = cell.hasAttribute("data-v") ? cell.getAttribute("data-v") : cell.textContent;
        return { row, index, value: numeric ? parseFloat(value) : value };
      });
      keyed.sort((a, b) => {
        // Blank (not scored) cells stay last in both directions.
        if (numeric && (isNaN(a.value) || isNaN(b.value))) { return (isNaN(a.value) - isNaN(b.value)) || (a.index - b.index); }
        const order = numeric ? a.value - b.value : a.value.localeCompare(b.value);
        return (ascending ? order : -order) || (a.index - b.index);
      });
      const fragment = document.createDocumentFragment();
      keyed.forEach((item) => fragment.appendChild(item.row));
      body.appendChild(fragment);
    });
  });

  // ---- strips: one per metric, brushable
  const strips = $("strips");
  const stripInfo = new Map();
  const SW = 760, SH = 30, X0 = 215, X1 = 700;
  const quantile = (sorted, q) => {
    const pos = (sorted.length - 1) * q, i = Math.floor(pos);
    return i + 1 < sorted.length ? sorted[i] + (pos - i) * (sorted[i + 1] - sorted[i]) : sorted[i];
  };
  const addPoint = (folder, circle) => {
    if (!points.has(folder)) { points.set(folder, []); }
    points.get(folder).push(circle);
  };
  if (strips) {
    const height = metrics.length * SH + 4;
    set(strips, { viewBox: `0 0 ${SW} ${height}`, width: SW, height });
    metrics.forEach((m, mi) => {
      const g = el("svg:g", { class: "strip", "data-metric": m.key, transform: `translate(0,${mi * SH + 2})` }, null, strips);
      const label = el("svg:text", { x: 0, y: 17, class: "label" }, m.title || m.key, g);
      if (m.higher_is_worse) { el("svg:title", {}, "higher is worse", label); }
      const values = subjects.map((s) => (Array.isArray(s.values) ? s.values[mi] : null));
      const sorted = values.filter(finite).sort((a, b) => a - b);
      if (!sorted.length) { el("svg:text", { x: X0, y: 17, class: "none" }, "no values", g); return; }
      // Robust extent: 1st to 99th percentile (values beyond sit at the ends), else min-max.
      let lo = quantile(sorted, 0.01), hi = quantile(sorted, 0.99);
      if (!(hi > lo)) { lo = sorted[0]; hi = sorted[sorted.length - 1]; }
      const threshold = m.key === "audit_score" && finite(data.threshold) ? data.threshold : null;
      if (threshold !== null) { lo = Math.min(lo, threshold); hi = Math.max(hi, threshold); }
      if (!(hi > lo)) { lo -= 0.5; hi += 0.5; }
      const sx = (v) => X0 + (Math.min(Math.max(v, lo), hi) - lo) / (hi - lo) * (X1 - X0);
      el("svg:line", { x1: X0, x2: X1, y1: SH - 5, y2: SH - 5, class: "axis" }, null, g);
      el("svg:text", { x: X0 - 6, y: 17, class: "tick", "text-anchor": "end" }, num(lo), g);
      el("svg:text", { x: X1 + 6, y: 17, class: "tick" }, num(hi), g);
      if (threshold !== null) {
        el("svg:line", { x1: sx(threshold), x2: sx(threshold), y1: 0, y2: SH - 3, class: "threshold" }, null, g);
      }
      const brush = el("svg:rect", { class: "brush", x: X0, y: 1, width: 0, height: SH - 5, visibility: "hidden" }, null, g);
      values.forEach((v, i) => {
        if (!finite(v)) { return; }
        const s = subjects[i];
        const c = el("svg:circle", { cx: sx(v).toFixed(1), cy: (4 + ((i * 0.618034) % 1) * (SH - 12)).toFixed(1), r: 2.5, "data-subject": s.folder }, null, g);
        if (s.flagged) { c.setAttribute("class", "flagged"); }
        addPoint(s.folder, c);
      });
      // On top of the dots: it takes the mouse.
      el("svg:rect", { class: "brush-area", x: X0, y: 0, width: X1 - X0, height: SH - 2, "data-min": lo, "data-max": hi }, null, g);
      stripInfo.set(m.key, { sx, lo, hi, brush });
    });
  }
  function drawBrush(key) {
    const info = stripInfo.get(key), range = brushes.get(key);
    if (!info) { return; }
    if (!range) { info.brush.setAttribute("visibility", "hidden"); return; }
    const a = info.sx(range[0]), b = info.sx(range[1]);
    set(info.brush, { x: a.toFixed(1), width: Math.max(b - a, 1).toFixed(1), "data-lo": range[0], "data-hi": range[1], visibility: "visible" });
  }
  function brushRange(key, lo, hi) {
    if (!metricIndex.has(key)) { return false; }
    if (lo == null || hi == null || isNaN(lo) || isNaN(hi)) { brushes.delete(key); } else {
      brushes.set(key, [Math.min(lo, hi), Math.max(lo, hi)]);
    }
    drawBrush(key);
    scheduleFilter();
    return true;
  }
  function clearBrush(key) {
    (key == null ? Array.from(brushes.keys()) : [key]).forEach((k) => { brushes.delete(k); drawBrush(k); });
    scheduleFilter();
  }
  let drag = null;
  const pxValue = (x) => {
    const rect = drag.rect, px = Math.min(Math.max(x - rect.left, 0), rect.width);
    if (px <= 0.5) { return -Infinity; } // a brush to an end takes the outliers beyond it too
    if (px >= rect.width - 0.5) { return Infinity; }
    return drag.info.lo + px / rect.width * (drag.info.hi - drag.info.lo);
  };
  const dragTo = (x) => brushRange(drag.key, pxValue(drag.x0), pxValue(x));
  if (strips) {
    strips.addEventListener("mousedown", (e) => {
      const area = e.target.closest("rect.brush-area");
      if (!area || e.button !== 0) { return; }
      e.preventDefault();
      const key = area.parentNode.getAttribute("data-metric");
      drag = { key, info: stripInfo.get(key), rect: area.getBoundingClientRect(), x0: e.clientX, moved: false };
    });
    window.addEventListener("mousemove", (e) => {
      if (!drag) { return; }
      drag.moved = drag.moved || Math.abs(e.clientX - drag.x0) >= 3;
      if (drag.moved) { dragTo(e.clientX); }
    });
    window.addEventListener("mouseup", (e) => {
      if (!drag) { return; }
      if (drag.moved || Math.abs(e.clientX - drag.x0) >= 3) { dragTo(e.clientX); } else { clearBrush(drag.key); }
      drag = null;
    });
  }
  if ($("clear-brush")) { $("clear-brush").addEventListener("click", () => clearBrush()); }

  // ---- embedding: PCA scatter coloured by scanner group
  const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#9c755f", "#17becf", "#bcbd22", "#7f7f7f"];
  const colour = (g) => (g >= 0 ? PALETTE[g % PALETTE.length] : "#c7c7c7");
  const embedding = $("embedding");
  if (embedding) {
    const EW = 420, EH = 320, L = 40, R = 10, T = 10, B = 38, PW = EW - L - R, PH = EH - T - B;
    embedding.setAttribute("viewBox", `0 0 ${EW} ${EH}`);
    const placed = subjects.filter((s) => Array.isArray(s.xy) && s.xy.length === 2 && s.xy.every(finite));
    if (!data.pca || !placed.length) {
      el("svg:text", { x: EW / 2, y: EH / 2, "text-anchor": "middle", class: "none" }, "No embedding: too few subjects with image-quality metrics.", embedding);
    } else {
      const ext = [0, 1].map((d) => {
        const v = placed.map((s) => s.xy[d]), a = Math.min(...v), b = Math.max(...v), pad = (b - a) * 0.05 || 1;
        return [a - pad, b + pad];
      });
      const px = (v) => L + (v - ext[0][0]) / (ext[0][1] - ext[0][0]) * PW;
      const py = (v) => T + PH - (v - ext[1][0]) / (ext[1][1] - ext[1][0]) * PH;
      el("svg:rect", { x: L, y: T, width: PW, height: PH, class: "frame" }, null, embedding);
      const explained = Array.isArray(data.pca.explained) ? data.pca.explained : [];
      const axis = (i) => {
        const e = explained[i];
        return `PC${i + 1}` + (finite(e) ? ` (${(e <= 1 ? e * 100 : e).toFixed(0)} %)` : "");
      };
      el("svg:text", { x: L + PW / 2, y: EH - 10, "text-anchor": "middle", class: "axis-title" }, axis(0), embedding);
      el("svg:text", { x: 14, y: T + PH / 2, "text-anchor": "middle", class: "axis-title", transform: `rotate(-90 14 ${T + PH / 2})` }, axis(1), embedding);
      const used = new Set();
      placed.forEach((s) => {
        const g = Number.isInteger(s.group) && s.group < groups.length ? s.group : -1;
        used.add(g);
        const c = el("svg:circle", { cx: px(s.xy[0]).toFixed(1), cy: py(s.xy[1]).toFixed(1), r: 4, fill: colour(g), "data-subject": s.folder }, null, embedding);
        if (s.flagged) { c.setAttribute("class", "flagged"); }
        el("svg:title", {}, s.folder + (s.flagged ? " (flagged)" : ""), c);
        addPoint(s.folder, c);
      });
      const legend = $("embedding-legend");
      if (legend) {
        const item = (swatch, text) => {
          const span = el("span", { class: "item" }, null, legend);
          el("span", { class: "swatch" + (swatch ? "" : " ring") }, null, span).style.background = swatch || "none";
          span.appendChild(document.createTextNode(text));
        };
        Array.from(used).sort((a, b) => a - b).forEach((g) => item(colour(g), g >= 0 ? groupName(g) : "no scanner group"));
        item("", "flagged");
      }
    }
    embedding.addEventListener("click", (e) => {
      const c = e.target.closest("circle[data-subject]");
      if (c) { select(c.getAttribute("data-subject")); }
    });
  }

  // ---- selection and the subject panel
  const panel = $("subject-view");
  const part = (selector) => (panel ? panel.querySelector(selector) : null);
  function showImage(kind, uri) {
    const img = part("img." + kind), none = part(".noimg." + kind);
    if (!img) { return; }
    if (uri) { img.src = uri; } else { img.removeAttribute("src"); }
    img.hidden = !uri;
    if (none) { none.hidden = !!uri; }
  }
  // Each contrast beside the T1w: its native picture and its template-space one (the
  // T1w's planes), built as elements so no folder or reason text is read as HTML.
  function showContrasts(views) {
    const box = part(".contrast-views");
    if (!box) { return; }
    box.replaceChildren();
    views.forEach((v) => {
      [["native", "native, whole field of view"], ["registered", "template space, through the T1w"]].forEach(([key, words]) => {
        const fig = document.createElement("figure");
        fig.dataset.contrast = v.contrast;
        if (v[key]) {
          const img = document.createElement("img");
          img.src = v[key];
          img.alt = v.contrast + ", " + words;
          fig.appendChild(img);
        } else {
          const none = document.createElement("p");
          none.className = "noimg";
          none.textContent = "no image (" + v.status + ")";
          fig.appendChild(none);
        }
        const cap = document.createElement("figcaption");
        cap.textContent = v.contrast + ": " + words;
        fig.appendChild(cap);
        box.appendChild(fig);
      });
    });
  }
  function showDecision(row) {
    const out = part(".decision"), c = controls.get(row);
    if (out && c && c.sel) { out.textContent = "decision: " + c.sel.value + (c.note && c.note.value ? " \u00b7 note: " + c.note.value : ""); }
  }
  function unselect() {
    if (selected === null) { return; }
    const row = rowOf.get(selected);
    if (row) { row.classList.remove("selected"); }
    (points.get(selected) || []).forEach((c) => c.classList.remove("sel"));
    selected = null;
  }
  function select(folder, options) {
    const row = rowOf.get(folder);
    const s = byFolder.get(folder) || {};
    if (!row && !byFolder.has(folder)) { return false; }
    unselect();
    selected = folder;
    (points.get(folder) || []).forEach((c) => {
      c.classList.add("sel");
      c.parentNode.insertBefore(c, c.parentNode.querySelector(".brush-area")); // drawn on top
    });
    if (row) {
      row.classList.add("selected");
      if (!options || options.scroll !== false) { row.scrollIntoView({ block: "nearest" }); }
    }
    if (panel) {
      panel.setAttribute("data-subject", folder);
      part(".folder").textContent = folder;
      const facts = ["status " + (s.status || (row ? row.cells[1].textContent : "")), s.flagged ? "flagged" : "not flagged",
        "scanner group " + (groupName(s.group) || "none")];
      if (finite(s.score)) { facts.push("audit score " + num(s.score)); }
      part(".facts").textContent = facts.join(" \u00b7 ");
      part(".reasons").textContent = s.reasons || "no flag reason";
      if (row) { showDecision(row); }
      showImage("native", s.native || "");
      showImage("registered", s.registered || "");
      showContrasts(s.contrasts || []);
      panel.hidden = false;
      document.body.classList.add("panel-open");
    }
    return true;
  }
  if (part(".close")) {
    part(".close").addEventListener("click", () => {
      panel.hidden = true;
      document.body.classList.remove("panel-open");
      unselect();
    });
  }
  body.addEventListener("click", (e) => {
    const cell = e.target.closest("td");
    if (cell && cell.cellIndex === 0) { select(cell.parentNode.dataset.subject); }
  });

  // ---- gallery: every subject, pictures loaded near the viewport
  const thumbs = $("thumbs");
  const load = (scope) => scope.querySelectorAll("img[data-src]").forEach((img) => {
    if (!img.getAttribute("src")) { img.src = img.getAttribute("data-src"); }
  });
  const observer = "IntersectionObserver" in window ? new IntersectionObserver((entries) => entries.forEach((entry) => {
    if (entry.isIntersecting) { load(entry.target); observer.unobserve(entry.target); }
  }), { rootMargin: "400px" }) : null;
  if (thumbs) {
    const fragment = document.createDocumentFragment();
    subjects.forEach((s) => {
      const card = el("div", { class: "thumb" + (s.flagged ? " flag" : ""), "data-subject": s.folder, tabindex: "0" }, null, fragment);
      el("div", { class: "name" }, s.folder, card);
      ["native", "registered"].forEach((kind) => {
        if (s[kind]) {
          el("img", { class: kind, "data-src": s[kind], loading: "lazy", width: 384, height: 128, alt: `${kind} image of ${s.folder}` }, null, card);
        } else {
          el("div", { class: "noimg " + kind }, `no ${kind} image`, card);
        }
      });
      cards.set(s.folder, card);
    });
    thumbs.appendChild(fragment);
    cards.forEach((card) => (observer ? observer.observe(card) : load(card)));
    const pick = (e) => {
      const card = e.target.closest(".thumb");
      if (card && (e.type === "click" || e.key === "Enter")) { select(card.getAttribute("data-subject")); }
    };
    thumbs.addEventListener("click", pick);
    thumbs.addEventListener("keydown", pick);
  }
  window.addEventListener("beforeprint", () => {
    document.querySelectorAll("img[data-src]").forEach((img) => { img.loading = "eager"; });
    load(document);
  });

  // ---- review mode
  const reviewButton = $("start-review"), help = $("review-help"), reviewStatus = $("review-status");
  let queue = [], pos = -1;
  const reviewing = () => document.body.classList.contains("reviewing");
  function go(i) {
    if (!queue.length) { return; }
    if (queue[pos]) { queue[pos].classList.remove("current"); }
    pos = Math.min(Math.max(i, 0), queue.length - 1);
    const row = queue[pos];
    row.classList.add("current");
    select(row.dataset.subject);
    if (reviewStatus) { reviewStatus.textContent = `subject ${pos + 1} of ${queue.length}` + (i >= queue.length ? " (end of the queue)" : ""); }
  }
  function setReviewing(on) {
    document.body.classList.toggle("reviewing", on);
    if (help) { help.hidden = !on; }
    if (reviewButton) { reviewButton.textContent = on ? "Stop review" : "Start review"; reviewButton.setAttribute("aria-pressed", on); }
  }
  function startReview() {
    // Flagged subjects not decided yet, then everyone else; table order; the rows shown, if any.
    const order = Array.from(body.rows);
    const pool = order.some((r) => !r.hidden) ? order.filter((r) => !r.hidden) : order;
    const first = pool.filter((r) => {
      const s = byFolder.get(r.dataset.subject);
      return (s ? s.flagged : r.classList.contains("flag")) && !(store[r.dataset.subject] || {}).decision;
    });
    const seen = new Set(first);
    queue = first.concat(pool.filter((r) => !seen.has(r)));
    pos = -1;
    setReviewing(true);
    if (document.activeElement && document.activeElement.blur) { document.activeElement.blur(); }
    go(0);
  }
  function stopReview() {
    if (queue[pos]) { queue[pos].classList.remove("current"); }
    queue = [];
    pos = -1;
    setReviewing(false);
  }
  function decide(decision) {
    const row = queue[pos];
    if (row && setDecision(row, decision)) { remember(row); go(pos + 1); }
  }
  if (reviewButton) { reviewButton.addEventListener("click", () => (reviewing() ? stopReview() : startReview())); }
  const KEYS = {
    j: () => go(pos + 1), ArrowDown: () => go(pos + 1), k: () => go(pos - 1), ArrowUp: () => go(pos - 1),
    x: () => decide("exclude"), a: () => decide("keep"), u: () => decide("undecided"), Escape: stopReview,
    n: () => { const c = controls.get(queue[pos]); if (c && c.note) { c.note.focus(); } },
  };
  document.addEventListener("keydown", (e) => {
    if (!reviewing() || e.ctrlKey || e.metaKey || e.altKey) { return; }
    const target = e.target, tag = target && target.tagName;
    if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA" || (target && target.isContentEditable)) {
      // Typing: only Enter or Escape, which hand the keys back to the review.
      if ((e.key === "Enter" || e.key === "Escape") && tag !== "SELECT") { e.preventDefault(); target.blur(); }
      return;
    }
    const key = e.key && e.key.length === 1 ? e.key.toLowerCase() : e.key;
    if (Object.hasOwn(KEYS, key)) { e.preventDefault(); KEYS[key](); }
  });

  // ---- export and import
  const clean = (text) => String(text).replace(/[\t\r\n]+/g, " ");
  const exporter = $("export-decisions");
  if (exporter) {
    exporter.addEventListener("click", () => {
      // folder + truth is what the workflow's `labels` reads: the export is the next run's labels.
      const lines = ["folder\ttruth\tdecision\tnote"];
      rows.forEach((row) => {
        const c = controls.get(row), decision = c.sel ? c.sel.value : "undecided";
        const truth = decision === "exclude" ? "1" : decision === "keep" ? "0" : "";
        lines.push([row.dataset.subject, truth, decision, c.note ? c.note.value : ""].map(clean).join("\t"));
      });
      const link = document.createElement("a");
      link.href = URL.createObjectURL(new Blob([lines.join("\n") + "\n"], { type: "text/tab-separated-values" }));
      link.download = "mriaudit-decisions.tsv";
      document.body.appendChild(link);
      link.click();
      setTimeout(() => { URL.revokeObjectURL(link.href); link.remove(); }, 0);
    });
  }
  const field = (text) => {
    text = (text || "").trim();
    return text.length > 1 && text[0] === "\"" && text.endsWith("\"") ? text.slice(1, -1).replace(/""/g, "\"") : text;
  };
  const importStatus = $("import-status");
  const say = (text) => { if (importStatus) { importStatus.textContent = text; } };
  function importText(text) {
    const lines = String(text).replace(/^\ufeff/, "").split(/\r?\n/).filter((l) => l.trim());
    const header = (lines.shift() || "").split("\t").map((h) => field(h).toLowerCase());
    const [iF, iD, iT, iN] = ["folder", "decision", "truth", "note"].map((name) => header.indexOf(name));
    if (iF < 0 || (iD < 0 && iT < 0)) {
      say("Not imported: no folder column, or neither decision nor truth.");
      return -1;
    }
    let count = 0, unknown = 0;
    lines.forEach((line) => {
      const cells = line.split("\t").map(field), row = rowOf.get(cells[iF]);
      if (!row) { unknown += 1; return; }
      // The decision wins; else truth 1 = exclude, 0 = keep, empty = undecided.
      let decision = iD >= 0 ? (cells[iD] || "").toLowerCase() : "";
      if (decision === "unsure") { decision = "undecided"; }
      if (!DECISIONS.includes(decision)) {
        const truth = iT >= 0 ? cells[iT] || "" : "";
        decision = truth === "" ? "undecided" : Number(truth) === 1 ? "exclude" : Number(truth) === 0 ? "keep" : "";
      }
      if (decision && setDecision(row, decision, iN >= 0 ? cells[iN] || "" : undefined)) {
        remember(row, true);
        count += 1;
      }
    });
    save();
    say(`${count} decisions imported` + (unknown ? `; ${unknown} rows name no subject of this report` : ""));
    return count;
  }
  const importer = $("import-decisions");
  if (importer) {
    importer.addEventListener("change", () => {
      const file = importer.files && importer.files[0];
      if (!file) { return; }
      const reader = new FileReader();
      reader.onload = () => { importText(reader.result); importer.value = ""; };
      reader.onerror = () => say("Could not read " + file.name);
      reader.readAsText(file);
    });
  }

  applyFilter();
  const visibleFolders = () => Array.from(body.rows).filter((r) => !r.hidden).map((r) => r.dataset.subject);
  const brushed = () => Object.fromEntries(brushes);
  window.mriaudit = { brush: brushRange, clearBrush, brushes: brushed, select, visibleFolders, importText, startReview, stopReview, storageKey: KEY };
})();
