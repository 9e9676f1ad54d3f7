// The accelops results page: selectors -> the REST API -> plotly charts and tables.
// The selection lives in the URL's query string, so a link reproduces the view.
"use strict";

const SINGLE = ["family", "op", "shape", "m", "threads", "baseline"];
const MULTI = ["machine", "commit"];
const ALL = "";  // the "all" option of a selector
let MACHINES = {};  // fingerprint -> machine from /api/machines
let OPTIONS = null;
let state = {};

function $(id) { return document.getElementById(id); }

function readUrl() {
  const p = new URLSearchParams(location.search);
  const s = {};
  for (const k of SINGLE) s[k] = p.get(k) || ALL;
  for (const k of MULTI) s[k] = p.getAll(k);
  return s;
}

function writeUrl() {
  const p = new URLSearchParams();
  for (const k of SINGLE) if (state[k]) p.set(k, state[k]);
  for (const k of MULTI) for (const v of state[k]) p.append(k, v);
  const url = location.pathname + (p.toString() ? "?" + p.toString() : "");
  history.replaceState(null, "", url);
  $("permalink").href = url;
}

function query(params) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (Array.isArray(v)) v.forEach(x => p.append(k, x));
    else if (v !== ALL && v !== null && v !== undefined) p.set(k, v);
  }
  return p.toString();
}

async function api(path, params) {
  const r = await fetch("/api/" + path + (params ? "?" + query(params) : ""));
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.status + " " + r.statusText);
  return body;
}

function showError(e) {
  const el = $("error");
  el.hidden = !e;
  el.textContent = e ? String(e.message || e) : "";
}

function fill(select, values, current, allLabel) {
  select.replaceChildren();
  if (allLabel !== null) select.add(new Option(allLabel, ALL));
  for (const v of values) {
    const [value, label] = Array.isArray(v) ? v : [String(v), String(v)];
    select.add(new Option(label, value));
  }
  const ok = [...select.options].some(o => o.value === current);
  select.value = ok ? current : (select.options.length ? select.options[0].value : ALL);
  return select.value;
}

function shortName(fp) { return MACHINES[fp] ? MACHINES[fp].name : fp; }

// ------------------------------------------------------------------ selectors

async function loadOptions() {
  OPTIONS = await api("options", { family: state.family, op: state.op });
  if (!state.family || !OPTIONS.families.includes(state.family)) {
    state.family = OPTIONS.families.includes("matmul") ? "matmul" : (OPTIONS.families[0] || ALL);
    OPTIONS = await api("options", { family: state.family });
  }
  fill($("family"), OPTIONS.families, state.family, null);
  state.op = fill($("op"), OPTIONS.ops, state.op, "all ops");
  // a shape and an M picked by default: all of matmul's cases at once make unreadable charts
  const first = (list, cur) => (cur || !list.length) ? cur : String(list[0]);
  state.shape = fill($("shape"), OPTIONS.shapes, first(OPTIONS.shapes, state.shape), "all shapes");
  state.m = fill($("m"), OPTIONS.m, first(OPTIONS.m, state.m), "all M");
  const maxThreads = OPTIONS.threads.length ? String(Math.max(...OPTIONS.threads)) : ALL;
  state.threads = fill($("threads"), OPTIONS.threads, state.threads || maxThreads, "all threads");
  const baselines = OPTIONS.baselines.map(b => [b.value, b.label]);
  // torchao where the family has it (the question people ask), else the most measured one
  const common = OPTIONS.baselines.slice().sort((a, b) => b.rows - a.rows)[0];
  const preferred = (baselines.find(b => /torchao/.test(b[0])) || (common ? [common.value] : [ALL]))[0];
  state.baseline = fill($("baseline"), baselines, state.baseline || preferred, null);
  const box = $("machines");
  box.replaceChildren(Object.assign(document.createElement("legend"), { textContent: "machines" }));
  const here = OPTIONS.machines;
  state.machine = state.machine.filter(fp => here.includes(fp));
  if (!state.machine.length) state.machine = here.slice();
  for (const fp of here) {
    const label = document.createElement("label");
    const cb = Object.assign(document.createElement("input"), { type: "checkbox", value: fp, checked: state.machine.includes(fp) });
    cb.name = "machine";
    cb.addEventListener("change", () => {
      state.machine = [...box.querySelectorAll("input:checked")].map(x => x.value);
      changed(false);
    });
    label.append(cb, " " + shortName(fp));
    label.title = fp + " · " + (MACHINES[fp] ? MACHINES[fp].cpu_model : "");
    box.append(label);
  }
  const commits = $("commit");
  commits.replaceChildren();
  for (const c of OPTIONS.commits.slice().reverse()) {
    const o = new Option(c.commit.slice(0, 10) + (c.dirty ? "*" : "") + "  " + (c.first_run || "").slice(0, 16).replace("T", " "), c.commit);
    o.selected = state.commit.some(x => c.commit.startsWith(x));
    commits.add(o);
  }
  state.commit = [...commits.selectedOptions].map(o => o.value);
}

async function changed(reloadOptions) {
  showError(null);
  try {
    if (reloadOptions) await loadOptions();
    writeUrl();
    await render();
  } catch (e) { showError(e); }
}

function bind() {
  for (const id of SINGLE) {
    $(id).addEventListener("change", () => {
      state[id] = $(id).value;
      if (id === "family") { state.op = state.shape = state.m = state.threads = state.baseline = ALL; state.machine = []; state.commit = []; }
      changed(id === "family" || id === "op");
    });
  }
  $("commit").addEventListener("change", () => {
    state.commit = [...$("commit").selectedOptions].map(o => o.value);
    changed(false);
  });
  $("reset").addEventListener("click", () => {
    state = { family: state.family, op: ALL, shape: ALL, m: ALL, threads: ALL, baseline: ALL, machine: [], commit: [] };
    changed(true);
  });
  $("p-go").addEventListener("click", predict);
}

// ------------------------------------------------------------------ charts

// families whose rows hold other measures than a time (regret, bits per character, memory)
const NO_TIMES = "; hpo, lm, plan and scaleout record other measures than times: `accelops report` draws them";

function empty(div, text) {
  Plotly.purge(div);
  div.style.minHeight = "0";
  div.replaceChildren(Object.assign(document.createElement("p"), { className: "empty", textContent: text }));
}

function plot(div, traces, layout) {
  div.replaceChildren();
  div.style.minHeight = "";
  Plotly.newPlot(div, traces, Object.assign({
    margin: { t: 60, r: 20, b: 90, l: 70 }, legend: { orientation: "h", x: 0, y: 1.02, yanchor: "bottom" },
    hovermode: "closest", xaxis: { tickangle: 0, automargin: true },
    font: { size: 12 },
  }, layout), { responsive: true, displaylogo: false });
}

function selection() {
  return { family: state.family, op: state.op, shape: state.shape, m: state.m, threads: state.threads, commit: state.commit };
}

// a category label in lines of about `width` characters (plotly breaks lines at <br>)
function wrap(text, width) {
  const lines = [];
  let line = "";
  for (const word of String(text).split(" ")) {
    if (line && line.length + word.length + 1 > width) { lines.push(line); line = word; }
    else line = line ? line + " " + word : word;
  }
  if (line) lines.push(line);
  return lines.map(l => l.replace(/&/g, "&amp;").replace(/</g, "&lt;")).join("<br>");
}

function caseName(r) { return wrap(r.label, 26) + (r.case ? "<br>" + wrap(r.case, 26) : ""); }

// log-axis ticks at 1, 2, 5 x 10^k over the data's range, written as plain numbers
function logAxis(values, title, withOne = true) {
  const v = values.filter(x => x > 0 && isFinite(x)).concat(withOne ? [1] : []);
  if (!v.length) v.push(1);
  const lo = Math.min(...v) / 1.3, hi = Math.max(...v) * 1.3;
  const ticks = [];
  for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++)
    for (const d of [1, 2, 5]) { const t = d * Math.pow(10, e); if (t >= lo && t <= hi) ticks.push(t); }
  return { type: "log", title, tickvals: ticks, ticktext: ticks.map(t => String(Number(t.toPrecision(3)))),
    range: [Math.log10(lo), Math.log10(hi)] };
}

function errorBars(rows) {
  return {
    type: "data", symmetric: false,
    array: rows.map(r => r.speedup_high === null ? 0 : r.speedup_high - r.speedup),
    arrayminus: rows.map(r => r.speedup_low === null ? 0 : r.speedup - r.speedup_low),
  };
}

// Grouped bars of speed-ups, one trace per group ({name: rows}); with many cases the bars
// lie down (a row per case) so that no label overlaps another.
function speedupChart(div, groups, axisTitle, hoverExtra) {
  const all = Object.values(groups).flat();
  const cases = new Set(all.map(caseName)).size;
  const flat = cases > 6;
  const traces = Object.entries(groups).map(([name, rows]) => {
    const cat = rows.map(r => flat ? caseName(r).replace(/<br>/g, " ") : caseName(r));
    const val = rows.map(r => r.speedup);
    const t = {
      type: "bar", name, orientation: flat ? "h" : "v", customdata: rows.map(hoverExtra.data),
      hovertemplate: "%{" + (flat ? "y" : "x") + "}<br>speed-up %{" + (flat ? "x" : "y") + ":.3g}x<br>" + hoverExtra.text + "<extra>%{fullData.name}</extra>",
    };
    if (flat) Object.assign(t, { y: cat, x: val, error_x: errorBars(rows) });
    else Object.assign(t, { x: cat, y: val, error_y: errorBars(rows) });
    return t;
  });
  const axis = logAxis(all.flatMap(r => [r.speedup_low, r.speedup_high]), axisTitle);
  const one = flat ? { type: "line", yref: "paper", y0: 0, y1: 1, x0: 1, x1: 1 } : { type: "line", xref: "paper", x0: 0, x1: 1, y0: 1, y1: 1 };
  one.line = { color: "black", width: 1.5 };
  const layout = { barmode: "group", shapes: [one], showlegend: true };
  if (flat) {
    Object.assign(layout, {
      xaxis: axis, yaxis: { automargin: true, autorange: "reversed", type: "category" },
      height: Math.max(380, 90 + cases * (10 + 9 * traces.length)), margin: { t: 60, r: 20, b: 50, l: 20 },
    });
  } else layout.yaxis = axis;
  plot(div, traces, layout);
}

async function renderRatios() {
  const div = $("chart-ratios");
  const fp = state.machine[0];
  $("ratios-title").textContent = "accelops vs each baseline" + (fp ? " on " + shortName(fp) : "");
  if (!fp) return empty(div, "no machine selected");
  const page = await api("ratios", Object.assign(selection(), { machine: [fp], limit: 1000 }));
  if (!page.items.length) return empty(div, "no accelops measurement with a baseline in this selection" + NO_TIMES);
  const groups = {};
  for (const r of page.items) (groups["vs " + r.baseline] = groups["vs " + r.baseline] || []).push(r);
  const run = page.items[0];
  $("ratios-title").textContent = "accelops vs each baseline on " + shortName(fp) + ", newest run " + run.run_id
    + " (commit " + (run.commit || "?").slice(0, 10) + ", " + (run.started || "").slice(0, 10) + ")";
  speedupChart(div, groups, "speed-up (log)", {
    data: r => [r.median_us, r.baseline_median_us, (r.commit || "").slice(0, 10), r.run_id],
    text: "accelops %{customdata[0]:.4g} us, baseline %{customdata[1]:.4g} us<br>run %{customdata[3]}, commit %{customdata[2]}",
  });
}

async function renderCross() {
  const div = $("chart-cross");
  const base = OPTIONS.baselines.find(b => b.value === state.baseline);
  $("cross-title").textContent = "across machines, vs " + (base ? base.label : "?");
  if (!state.machine.length) return empty(div, "no machine selected");
  const page = await api("ratios", Object.assign(selection(), { machine: state.machine, baseline: state.baseline, limit: 1000 }));
  if (!page.items.length) return empty(div, "no measurement against this baseline on the selected machines" + (OPTIONS.baselines.length ? "" : NO_TIMES));
  const groups = {};
  for (const r of page.items) (groups[shortName(r.machine)] = groups[shortName(r.machine)] || []).push(r);
  speedupChart(div, groups, "speed-up vs baseline (log)", {
    data: r => [r.median_us, (r.commit || "").slice(0, 10), (r.started || "").slice(0, 10)],
    text: "accelops %{customdata[0]:.4g} us<br>commit %{customdata[1]}, %{customdata[2]}",
  });
}

const MARK = {
  regression: { symbol: "triangle-up", color: "#c00", size: 14 },
  improvement: { symbol: "triangle-down", color: "#080", size: 14 },
  anomaly: { symbol: "x", color: "#e80", size: 13 },
};

async function renderHistory() {
  const div = $("chart-history");
  const flags = $("flags");
  flags.replaceChildren();
  const h = await api("history", Object.assign(selection(), { machine: state.machine }));
  const series = h.series.filter(s => s.points.length);
  if (!series.length) return empty(div, "no accelops series with times in this selection" + NO_TIMES);
  const shown = series.slice(0, 40);
  const traces = [];
  const marks = { regression: [], improvement: [], anomaly: [] };
  const several = new Set(shown.map(s => s.machine)).size > 1;
  // runs evenly spaced in time order, each labelled by its start and commit: days without
  // runs take no room
  const runLabel = p => (p.started || "").slice(5, 16).replace("T", " ") + "<br>" + (p.commit || "?").slice(0, 7) + (p.dirty ? "*" : "");
  const order = [...new Map(shown.flatMap(s => s.points).sort((a, b) => (a.started || "").localeCompare(b.started || ""))
    .map(p => [runLabel(p), 1])).keys()];
  for (const s of shown) {
    const name = (several ? shortName(s.machine) + " · " : "") + s.label + (s.case ? " · " + s.case : "");
    traces.push({
      type: "scatter", mode: "lines+markers", name, x: s.points.map(runLabel), y: s.points.map(p => p.median_us),
      customdata: s.points.map(p => [(p.commit || "?").slice(0, 10) + (p.dirty ? "*" : ""), p.verdict, p.run_id]),
      hovertemplate: "%{y:.4g} us<br>commit %{customdata[0]}, run %{customdata[2]}<br>%{customdata[1]}<extra>" + name.replace(/</g, "&lt;") + "</extra>",
    });
    for (const p of s.points) {
      const kinds = [];
      if (p.verdict === "regression" || p.verdict === "improvement") kinds.push(p.verdict);
      if (p.anomaly_z !== null) kinds.push("anomaly");
      for (const kind of kinds) {
        marks[kind].push({ x: runLabel(p), y: p.median_us, text: name + ": " + kind + " at commit " + (p.commit || "?").slice(0, 10) });
        const li = document.createElement("li");
        li.className = kind;
        const what = kind === "anomaly" ? "outlier (z = " + p.anomaly_z.toFixed(1) + ")" : kind + " (" + (p.change * 100).toFixed(1) + "% vs the previous runs' median)";
        li.textContent = (p.started || "").slice(0, 16).replace("T", " ") + " · commit " + (p.commit || "?").slice(0, 10) + " · " + name + ": " + what + ", " + p.median_us.toPrecision(4) + " us";
        flags.append(li);
      }
    }
  }
  for (const [kind, pts] of Object.entries(marks)) {
    traces.push({
      type: "scatter", mode: "markers", name: kind, x: pts.map(p => p.x), y: pts.map(p => p.y), text: pts.map(p => p.text),
      marker: Object.assign({ line: { width: 1, color: "#000" } }, MARK[kind]), hovertemplate: "%{text}<extra></extra>",
      visible: pts.length ? true : "legendonly",
    });
  }
  plot(div, traces, {
    yaxis: logAxis(shown.flatMap(s => s.points.map(p => p.median_us)), "median (us, log)", false),
    xaxis: { title: "run (UTC start, commit)" + (series.length > shown.length ? "; first " + shown.length + " of " + series.length + " series shown: narrow the selection" : ""),
      type: "category", categoryorder: "array", categoryarray: order, tickangle: 0, automargin: true },
    height: 560, legend: { orientation: "h", x: 0, y: -0.25, yanchor: "top" }, margin: { t: 20, r: 20, b: 40, l: 70 },
  });
  if (!flags.children.length) flags.append(Object.assign(document.createElement("li"), { textContent: "no regression, improvement or outlier in this view" }));
}

function table(el, header, rows) {
  el.replaceChildren();
  const tr = document.createElement("tr");
  for (const h of header) tr.append(Object.assign(document.createElement("th"), { textContent: h }));
  el.append(tr);
  for (const row of rows) {
    const r = document.createElement("tr");
    for (const cell of row) {
      const td = document.createElement("td");
      if (cell && typeof cell === "object") { td.textContent = cell.text; td.className = cell.cls || ""; td.title = cell.title || ""; }
      else td.textContent = cell === null || cell === undefined ? "" : String(cell);
      r.append(td);
    }
    el.append(r);
  }
}

async function renderAnomalies() {
  const list = await api("anomalies", { family: state.family, machine: state.machine });
  table($("anomalies"), ["machine", "benchmark", "case", "commit", "run", "median (us)", "neighbours' median (us)", "x neighbours", "z"],
    list.slice(0, 50).map(a => [shortName(a.machine), a.label, JSON.stringify(a.config), (a.commit || "").slice(0, 10), a.run_id,
      a.median_us.toPrecision(4), a.neighbours_median_us.toPrecision(4), a.ratio_to_neighbours === null ? "" : a.ratio_to_neighbours.toFixed(2), a.z.toFixed(1)]));
  if (!list.length) table($("anomalies"), ["no outlier measurement in " + state.family + " on the selected machines"], []);
}

async function renderMatrix() {
  const cells = await api("matrix", { family: state.family });
  const machines = [...new Set(cells.map(c => c.machine))];
  const rows = {};
  for (const c of cells) {
    const key = c.op + " | " + c.backend;
    (rows[key] = rows[key] || {})[c.machine] = c;
  }
  table($("matrix"), ["op", "backend", ...machines.map(shortName)], Object.entries(rows).map(([key, byM]) => {
    const [op, backend] = key.split(" | ");
    return [op, backend, ...machines.map(fp => {
      const c = byM[fp];
      if (!c) return "";
      return c.works ? { text: "works" + (c.median_us ? ", " + c.median_us.toPrecision(3) + " us" : ""), cls: "works" }
        : { text: c.status + (c.reason ? ": " + c.reason.slice(0, 120) : ""), cls: "fails", title: c.reason || "" };
    })];
  }));
}

function renderMachines() {
  table($("machine-table"), ["name", "fingerprint", "CPU model", "cores", "kernel ISA", "instruction sets", "GPU", "runs", "first run", "last run"],
    Object.values(MACHINES).map(m => [m.name, m.fingerprint, m.cpu_model, m.cpu_count, m.cpu_isa, (m.cpu_features || []).join(" "),
      m.gpu_name || "none", m.runs, (m.first_run || "").slice(0, 10), (m.last_run || "").slice(0, 10)]));
}

async function predict() {
  const out = $("prediction");
  out.textContent = "…";
  try {
    const p = await api("predict", { op: $("p-op").value, m: $("p-m").value, n: $("p-n").value, k: $("p-k").value, machine: state.machine[0] });
    const e = p.error_estimate;
    const choice = p.backend + " x" + p.threads + (p.tiles ? " tiles " + p.tiles.n_block + "/" + p.tiles.k_chunk : "");
    out.textContent = "On " + shortName(p.machine) + ": " + choice + (p.predicted
      ? " (predicted from the nearest measured shape M=" + p.source_shape.M + " N=" + p.source_shape.N + " K=" + p.source_shape.K + ")"
      : " (measured: " + (p.measured ? p.measured.median_us.toPrecision(4) + " us" : "?") + ")")
      + (e ? ". Error estimate (leave-one-out over " + e.shapes + " measured shapes): picks the measured winner " + (100 * e.loo_winner_agreement).toFixed(0)
        + "% of the time, slowdown vs the best candidate " + (100 * e.loo_mean_slowdown).toFixed(1) + "% on average, " + (100 * e.loo_worst_slowdown).toFixed(1) + "% at worst." : "");
  } catch (e) { out.textContent = String(e.message || e); }
}

async function render() {
  document.body.dataset.rendering = "1";
  try {
    await Promise.all([renderRatios(), renderCross(), renderHistory(), renderAnomalies(), renderMatrix()]);
  } finally {
    // tests wait for this: every chart of the current selection is drawn
    document.body.dataset.rendering = "0";
    document.body.dataset.renders = String(Number(document.body.dataset.renders || 0) + 1);
  }
}

async function main() {
  state = readUrl();
  bind();
  try {
    const info = await api("info");
    const machines = await api("machines");
    MACHINES = Object.fromEntries(machines.map(m => [m.fingerprint, m]));
    $("summary").textContent = info.database + " · " + info.runs + " runs · " + info.measurements + " measurements · "
      + info.machines + " machines: " + machines.map(m => m.name).join("; ");
    renderMachines();
    if (!info.runs) { showError("the database holds no runs yet: run a benchmark or `accelops results import`"); return; }
    await loadOptions();
    writeUrl();
    await render();
  } catch (e) {
    showError(e);
    document.body.dataset.renders = "error";
  }
}

main();
