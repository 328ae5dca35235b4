(function () {
  "use strict";
  var table = document.getElementById("subjects");
  if (!table) { return; }
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  // Row text for the filter, without the reviewer's own inputs.
  var texts = rows.map(function (row) {
    var parts = [];
    Array.prototype.forEach.call(row.cells, function (cell) {
      if (!cell.classList.contains("dec")) { parts.push(cell.textContent); }
    });
    return parts.join(" ").toLowerCase();
  });
  var filter = document.getElementById("filter");
  var shown = document.getElementById("shown");
  var timer = null;
  function applyFilter() {
    var query = filter.value.trim().toLowerCase();
    var count = 0;
    rows.forEach(function (row, i) {
      var hit = !query || texts[i].indexOf(query) >= 0;
      row.hidden = !hit;
      if (hit) { count += 1; }
    });
    shown.textContent = count + " of " + rows.length + " subjects shown";
  }
  filter.addEventListener("input", function () {
    clearTimeout(timer);
    timer = setTimeout(applyFilter, 120);
  });
  applyFilter();

  var headers = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(headers, function (th, column) {
    if (!th.dataset.sort) { return; }
    th.addEventListener("click", function () {
      var ascending = th.getAttribute("aria-sort") !== "ascending";
      Array.prototype.forEach.call(headers, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      var numeric = th.dataset.sort === "num";
      var keyed = rows.map(function (row, i) {
        var cell = row.cells[column];
        var value = cell.hasAttribute("data-v") ? cell.getAttribute("data-v") : cell.textContent;
        if (numeric) { value = parseFloat(value); }
        return { row: row, value: value, index: i };
      });
      keyed.sort(function (a, b) {
        var order;
        if (numeric) {
          // Blank (not scored) cells stay last in both directions.
          if (isNaN(a.value) || isNaN(b.value)) { return (isNaN(a.value) - isNaN(b.value)) || (a.index - b.index); }
          order = a.value - b.value;
        } else {
          order = a.value.localeCompare(b.value);
        }
        return (ascending ? order : -order) || (a.index - b.index);
      });
      var fragment = document.createDocumentFragment();
      keyed.forEach(function (item) { fragment.appendChild(item.row); });
      body.appendChild(fragment);
    });
  });

  body.addEventListener("change", function (event) {
    var row = event.target.closest("tr");
    if (row) { row.classList.add("changed"); }
  });

  function clean(text) { return String(text).replace(/[\t\r\n]+/g, " "); }
  document.getElementById("export-decisions").addEventListener("click", function () {
    // folder + truth is what the workflow's `labels` reads: the export is the next run's labels.
    var lines = ["folder\ttruth\tdecision\tnote"];
    rows.forEach(function (row) {
      var decision = row.querySelector("td.dec select");
      var note = row.querySelector("td.dec input");
      var truth = decision.value === "exclude" ? "1" : "0";
      lines.push([row.dataset.subject, truth, decision.value, note.value].map(clean).join("\t"));
    });
    var blob = new Blob([lines.join("\n") + "\n"], { type: "text/tab-separated-values" });
    var link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = "mriaudit-decisions.tsv";
    document.body.appendChild(link);
    link.click();
    setTimeout(function () { URL.revokeObjectURL(link.href); link.remove(); }, 0);
  });
})();
