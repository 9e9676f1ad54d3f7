"""`accelops report`: an HTML page with PNG plots of the results database.

Per benchmark family and machine:
- timed families (rows with a median): accelops against each baseline over the cases of the
  newest run, as small multiples (a panel per accelops variant, a row per case, a marker
  per baseline with its p20-p80 range, the baseline's own speed at 1.0), split into
  several PNGs where one would be too tall to read;
- the history across runs: per accelops variant the geometric mean over its cases of the
  median relative to the case's first run, one line each, with a legend, runs evenly
  spaced and labelled by commit and date;
- families whose rows carry other measures (hpo, lm, eval, plan, scaleout, generate) get a
  view of the newest run built from what their rows hold (regret, bits per character,
  memory, tokens/s).
Then a compatibility matrix (op x backend x machine: works with its speed, or fails with
the reason) and the regression check of accelops.results.regress.

Every PNG is at most MAX_INCHES x MAX_INCHES at DPI (1600 px a side) with no text below
MIN_FONT_PT, and no label is cut: a case is named by the fields that differ between the
cases beside it (the fields they share go in the panel title), wrapped, never truncated.
"""

from __future__ import annotations

import html
import json
import math
import re
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .regress import check
from .rows import CONFIG_FIELDS

DPI = 100
MAX_INCHES = 16.0  # the largest side of a PNG: 1600 px, readable at 100% zoom
WIDTH = 12.0  # inches: every figure is this wide unless its panels need more
FONT_PT = 10  # every text in a figure; none below MIN_FONT_PT
MIN_FONT_PT = 9
LABEL_CHARS = 44  # y labels wrap at this many characters (they are never cut)
COLORS = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:gray",
    "tab:olive",
    "tab:cyan",
)
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "<", ">", "*")

LATEST_RATIOS_SQL = """
WITH latest AS (
    SELECT r.machine_fingerprint AS machine, m.family, max(r.started) AS started
    FROM measurements m JOIN runs r USING (run_id)
    WHERE NOT coalesce(r.quick, false) AND m.is_accelops AND m.median_us > 0
    GROUP BY 1, 2)
SELECT l.machine, a.family, a.run_id, r.git_commit, r.started, a.op, a.method, coalesce(a.label, a.method),
       a.config_key, a.threads, coalesce(b.label, b.method), b.median_us / a.median_us,
       coalesce(b.p20_us, b.median_us) / coalesce(a.p80_us, a.median_us),
       coalesce(b.p80_us, b.median_us) / coalesce(a.p20_us, a.median_us)
FROM measurements a JOIN runs r USING (run_id)
JOIN latest l ON l.machine = r.machine_fingerprint AND l.family = a.family AND l.started = r.started
JOIN measurements b ON b.run_id = a.run_id AND b.family = a.family AND b.config_key = a.config_key
     AND (b.op IS NOT DISTINCT FROM a.op OR a.op = a.method OR b.op = b.method)
     AND b.threads IS NOT DISTINCT FROM a.threads AND NOT coalesce(b.is_accelops, false)
WHERE a.is_accelops AND a.median_us > 0 AND b.median_us > 0 AND coalesce(a.status, 'ok') = 'ok'
      AND coalesce(b.status, 'ok') = 'ok'
ORDER BY 1, 2, a.seq, b.seq
"""
RATIO_COLUMNS = (
    "machine",
    "family",
    "run_id",
    "commit",
    "started",
    "op",
    "method",
    "label",
    "config",
    "threads",
    "baseline",
    "ratio",
    "low",
    "high",
)

# The newest non-quick run of each family on each machine, every row of it: the families
# whose rows carry no median (hpo, lm, eval, plan, scaleout, generate) are drawn from these.
LATEST_ROWS_SQL = """
WITH latest AS (
    SELECT r.machine_fingerprint AS machine, m.family, max(r.started) AS started
    FROM measurements m JOIN runs r USING (run_id)
    WHERE NOT coalesce(r.quick, false)
    GROUP BY 1, 2)
SELECT l.machine, m.family, m.run_id, r.git_commit, r.started, m.op, m.method, m.label, m.is_accelops, m.status,
       m.threads, m.config, m.extra
FROM measurements m JOIN runs r USING (run_id)
JOIN latest l ON l.machine = r.machine_fingerprint AND l.family = m.family AND l.started = r.started
ORDER BY 1, 2, m.seq
"""

MACHINES_SQL = """
SELECT machine_fingerprint, arg_max(cpu_model, started), arg_max(cpu_count, started), arg_max(cpu_isa, started),
       arg_max(cpu_features, started), arg_max(gpu_name, started), any_value(cpu_model), any_value(cpu_count)
FROM runs GROUP BY 1 ORDER BY 1
"""

MATRIX_SQL = """
SELECT m.family, m.op, coalesce(m.backend, '?'), r.machine_fingerprint, any_value(r.cpu_model),
       arg_max(m.status, r.started), arg_max(m.median_us, r.started),
       arg_max(json_extract_string(m.extra, '$.reason'), r.started), max(r.started)
FROM measurements m JOIN runs r USING (run_id)
WHERE m.is_accelops AND NOT coalesce(r.quick, false)
GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
"""


# --------------------------------------------------------------------------- machines

# The instruction sets accelops' kernels dispatch on, best first (accelops/_machine.py).
ISA_RANK = ("avx512vnni", "avx512bw", "avx512f", "avxvnni", "avx2")


def _cpu_name(model: str | None) -> str:
    if not model:
        return "unknown CPU"
    text = re.sub(r"\((R|TM|tm)\)|\bCPU\b|\bProcessor\b|@.*$", " ", model)
    return " ".join(text.split()) or model


def _isa(machine: dict) -> str | None:
    if machine.get("cpu_isa"):
        return machine["cpu_isa"]
    features = set(machine.get("cpu_features") or ())
    return next((isa for isa in ISA_RANK if isa in features), None)


def machine_names(machines: dict[str, dict]) -> dict[str, str]:
    """fingerprint -> a name just long enough to tell the machines apart: CPU model and cores
    (and GPU); then also the instruction set accelops' kernels use; then also the first 8
    digits of the fingerprint. Every machine gets the same level of detail, so names line up.

    `machines`: fingerprint -> {"cpu_model", "cpu_count", "cpu_isa", "cpu_features", "gpu_name"}."""

    def name(fp: str, m: dict, level: int) -> str:
        parts = [_cpu_name(m.get("cpu_model"))]
        if level >= 1 and _isa(m):
            parts.append(_isa(m))
        if m.get("cpu_count"):
            parts.append(f"{m['cpu_count']} cores")
        if m.get("gpu_name"):
            parts.append(str(m["gpu_name"]))
        if level >= 2:
            parts.append(fp[:8])
        return " · ".join(parts)

    names: dict[str, str] = {}
    for level in (0, 1, 2):
        names = {fp: name(fp, m, level) for fp, m in machines.items()}
        if len(set(names.values())) == len(names):
            break
    return names


def _machines(db) -> dict[str, dict]:
    _, rows = db.query(MACHINES_SQL)
    out = {}
    for fp, cpu, cores, isa, features, gpu, any_cpu, any_cores in rows:
        # the newest run's description (an older run may predate a field); any run's when it has none
        out[fp] = {
            "cpu_model": cpu or any_cpu,
            "cpu_count": cores or any_cores,
            "cpu_isa": isa,
            "cpu_features": features,
            "gpu_name": gpu,
        }
    return out


# --------------------------------------------------------------------------- drawing helpers


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(min(width, MAX_INCHES), min(height, MAX_INCHES)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # a canvas of its own: no pyplot state, and text extents can be measured
    return fig


def _wrap(text: str, width: int = LABEL_CHARS) -> str:
    return "\n".join(textwrap.wrap(str(text), width, break_long_words=True)) or str(text)


def _lines(text: str) -> int:
    return text.count("\n") + 1


def _chars(width_in: float, pt: float = FONT_PT + 1.5) -> int:
    """How many characters of text at `pt` fit in width_in inches (DejaVu Sans averages
    about 0.55 em a character)."""
    return int(width_in * 72 / (0.55 * pt))


def _log_axis(axis, values, length_in: float) -> None:
    """A log axis labelled 0.5, 1, 2, 5, 10 ... (not 10^0): ratios read as plain numbers; as
    many labels as fit along length_in inches (about half an inch each)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    finite = [v for v in values if v and v > 0 and math.isfinite(v)] or [1.0]
    low, high = min(finite) / 1.3, max(finite) * 1.3
    if axis.axis_name == "x":
        axis.axes.set_xscale("log")
        axis.axes.set_xlim(low, high)
    else:
        axis.axes.set_yscale("log")
        axis.axes.set_ylim(low, high)
    fit = max(2, int(length_in / 0.5))
    decades = math.log10(high / low)
    if 9 * decades <= fit:  # less than a decade: 0.3 0.4 0.5 ... rather than one lone label
        locator = LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0))
    elif 3 * decades <= fit:
        locator = LogLocator(base=10, subs=(1.0, 2.0, 5.0))
    else:
        locator = LogLocator(base=10, subs=(1.0,), numticks=fit)
    axis.set_major_locator(locator)
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


ROW_MARKER_IN = 0.1  # inches between two dodged markers of a row


def _row_heights(labels: list[str], groups: int) -> list[float]:
    """Inches per row: room for the wrapped label and for one dodged marker per group."""
    return [max(0.32, 0.19 * _lines(label) + 0.1, ROW_MARKER_IN * groups + 0.1) for label in labels]


def _rows_axis(ax, labels: list[str], heights: list[float], block: int = 1) -> list[float]:
    """Rows top to bottom, each as tall (in y units = inches) as its label needs, every other
    block of `block` rows shaded so a marker's row is plain -> the rows' centres."""
    edges = [0.0]
    for h in heights:
        edges.append(edges[-1] + h)
    centres = [(edges[i] + edges[i + 1]) / 2 for i in range(len(heights))]
    for i in range(len(heights)):
        if (i // block) % 2:
            ax.axhspan(edges[i], edges[i + 1], color="0.93", zorder=0, linewidth=0)
    ax.set_yticks(centres, labels)
    ax.set_ylim(edges[-1], 0.0)
    ax.tick_params(labelsize=FONT_PT)
    return centres


def _draw_groups(ax, centres: list[float], groups: list[tuple], bars: bool = False, dodge: bool = True) -> list[float]:
    """groups: (name, color, marker, {row: x or (x, low, high)}): one marker (or bar) per group
    in each row, side by side (dodge) -> every x drawn, for the axis limits."""
    step = ROW_MARKER_IN if dodge else 0.0
    xs_all = []
    for j, (name, color, marker, values) in enumerate(groups):
        ys, xs, lo, hi = [], [], [], []
        for row, v in sorted(values.items()):
            x, low, high = (v, v, v) if not isinstance(v, tuple) else v
            if x is None:
                continue
            ys.append(centres[row] + (j - (len(groups) - 1) / 2) * step)
            xs.append(x)
            lo.append(max(0.0, x - min(low, x)))
            hi.append(max(0.0, max(high, x) - x))
            xs_all += [x, low, high]
        if not xs:
            continue
        err = [lo, hi] if any(lo) or any(hi) else None
        if bars:
            # whiskers (a spread) in black over the bar's colour
            ax.barh(
                ys,
                xs,
                (step or 0.25) * 0.9,
                color=color,
                label=name,
                xerr=err,
                error_kw={"ecolor": "black", "elinewidth": 1.0, "capsize": 2.0},
            )
        else:
            ax.errorbar(
                xs,
                ys,
                xerr=err,
                fmt=marker,
                color=color,
                markersize=6,
                capsize=2.5,
                elinewidth=1.2,
                linestyle="none",
                label=name,
            )
    return xs_all


def _title(fig, text: str, width_in: float) -> None:
    fig.suptitle(_wrap(text, _chars(width_in - 0.3)), fontsize=FONT_PT + 1.5)


# --------------------------------------------------------------------------- cases


def _value_text(value) -> str | None:
    if isinstance(value, dict):
        return None  # a nested setup (a model's dims) names no case apart; the summary has it
    if isinstance(value, (list, tuple)):
        return "x".join(map(str, value))
    return str(value)


def _case_fields(op: str | None, config: str | None, threads) -> dict[str, str]:
    fields = {"op": op} if op else {}
    try:
        parsed = json.loads(config) if config else {}
    except ValueError:
        parsed = {"config": config}
    if not isinstance(parsed, dict):
        parsed = {"config": parsed}
    for key, value in parsed.items():
        text = _value_text(value)
        if text is not None:
            fields[key] = text
    if threads is not None:
        fields["threads"] = str(threads)
    return fields


def _field_text(key: str, value: str) -> str:
    return value if key in ("op", "case") else f"{key}={value}"


def case_names(cases: list[tuple], family: str | None = None) -> tuple[list[str], str]:
    """cases: (op or None, config JSON, threads) -> (a label per case, what they all share).

    A label names only the fields that differ between the cases it sits beside: a shared
    tail (`activation=swiglu dtype=float32`) cut to a fixed length made the ffn cases
    `forward` and `train` read the same. The shared fields become one line of the title."""
    fields = [_case_fields(*case) for case in cases]
    # the family's own order of its case fields (M N K, not the stored JSON's K M N)
    order = ("op",) + CONFIG_FIELDS.get(family, ()) + ("M", "N", "K")
    keys = list(dict.fromkeys(k for f in fields for k in f))
    keys.sort(key=lambda k: (order.index(k) if k in order else len(order), k == "threads"))
    if len(cases) == 1:
        varying, shared = keys, []
    else:
        varying = [k for k in keys if len({f.get(k) for f in fields}) > 1]
        shared = [k for k in keys if k not in varying]
    labels = []
    for i, f in enumerate(fields):
        text = " ".join(_field_text(k, f[k]) for k in varying if k in f)
        labels.append(_wrap(text) if text else f"case {i + 1}")
    common = ", ".join(_field_text(k, fields[0][k]) for k in shared)
    return labels, common


# --------------------------------------------------------------------------- ratio plots

SMALL_PANEL = 3  # accelops variants with at most this many cases, all on the same cases, share a panel


def _ratio_panels(rows: list[dict], family: str | None) -> list[dict]:
    """-> panels {"title", "keys" (one per row), "labels", "baselines", "values" {(key, baseline): (x, lo, hi)}}:
    one per accelops variant (label); variants with only a few cases, all the same ones
    against the same baselines (comm: 7 DDP hooks x 2 links), are rows of one panel."""
    panels: dict[str, dict] = {}
    for r in rows:
        panel = panels.setdefault(r["label"], {"cases": {}, "values": {}})
        # the op names the case where the rows name one apart from their method (dispatch:
        # ternary_matmul and int8_linear on the same shapes; comm: one kernel per op)
        case = (r["op"] if r["op"] and r["op"] != r["method"] else None, r["config"], r["threads"])
        panel["cases"].setdefault(case, None)
        panel["values"][(case, r["baseline"])] = (r["ratio"], r["low"], r["high"])
    baselines = list(dict.fromkeys(r["baseline"] for r in rows))
    alike = defaultdict(list)
    for label, panel in panels.items():
        panel["baselines"] = [b for b in baselines if any((c, b) in panel["values"] for c in panel["cases"])]
        alike[(tuple(panel["cases"]), tuple(panel["baselines"]))].append(label)

    out = []
    for (cases, used), labels in alike.items():
        names, common = case_names(list(cases), family)
        if len(labels) > 1 and len(cases) == 1:
            common = names[0].replace("\n", " ")  # the one case is named in the title, not on every row
        shared = f"  [{common}]" if common else ""
        if len(labels) > 1 and len(cases) <= SMALL_PANEL:
            keys = [(label, case) for label in labels for case in cases]
            values = {((label, case), b): v for label in labels for (case, b), v in panels[label]["values"].items()}
            row_labels = [_wrap(f"{label}: {name}" if len(cases) > 1 else label) for label in labels for name in names]
            out.append(
                {
                    "title": f"{len(labels)} accelops variants{shared}",
                    "keys": keys,
                    "labels": row_labels,
                    "baselines": list(used),
                    "values": values,
                    "block": len(cases),
                }
            )
        else:
            for label in labels:
                out.append(
                    {
                        "title": f"{label}{shared}",
                        "keys": list(cases),
                        "labels": names,
                        "baselines": list(used),
                        "values": panels[label]["values"],
                    }
                )
    return out


def ratio_figures(rows: list[dict], title: str, family: str | None = None) -> list:
    """Small multiples of accelops vs its baselines in one run: a panel per accelops variant,
    a row per case, a marker per baseline at baseline median / accelops median with the
    p20-p80 range, a line at 1.0 (as fast as the baseline). Panels are stacked and split
    into several figures so none is taller than MAX_INCHES (matmul: 18 cases x 6 baselines
    x 4 variants was one 900 x 4000 px strip)."""
    baselines = list(dict.fromkeys(r["baseline"] for r in rows))
    style = {b: (COLORS[i % len(COLORS)], MARKERS[i % len(MARKERS)]) for i, b in enumerate(baselines)}
    legend_rows = math.ceil(len(baselines) / 2) if max(map(len, baselines)) < 60 else len(baselines)
    header = 1.0 + 0.22 * legend_rows  # inches: the figure title and the legend of baselines
    room = MAX_INCHES - header

    # a panel with too many rows for one figure is split into parts
    chunks = []
    for panel in _ratio_panels(rows, family):
        heights = _row_heights(panel["labels"], len(panel["baselines"]))
        panel_title = _wrap(panel["title"], _chars(WIDTH - 1))
        extra = 0.75 + 0.2 * _lines(panel_title)  # the panel title, x ticks and x label
        start = 0
        while start < len(panel["keys"]):
            end, height = start, extra
            while end < len(panel["keys"]) and (end == start or height + heights[end] <= room):
                height += heights[end]
                end += 1
            chunks.append(
                dict(
                    panel,
                    title=panel_title,
                    keys=panel["keys"][start:end],
                    labels=panel["labels"][start:end],
                    heights=heights[start:end],
                    height=height,
                )
            )
            start = end

    figures, group = [], []
    for chunk in chunks:
        if group and sum(c["height"] for c in group) + chunk["height"] > room:
            figures.append(group)
            group = []
        group.append(chunk)
    if group:
        figures.append(group)

    out = []
    for n, group in enumerate(figures, 1):
        fig = _new_figure(WIDTH, header + sum(c["height"] for c in group))
        axes = fig.subplots(len(group), 1, squeeze=False, height_ratios=[c["height"] for c in group])[:, 0]
        drawn = set()
        for ax, chunk in zip(axes, group):
            groups = [
                (
                    b,
                    *style[b],
                    {i: chunk["values"][(k, b)] for i, k in enumerate(chunk["keys"]) if (k, b) in chunk["values"]},
                )
                for b in chunk["baselines"]
            ]
            centres = _rows_axis(ax, chunk["labels"], chunk["heights"], chunk.get("block", 1))
            xs = _draw_groups(ax, centres, groups)
            drawn.update(chunk["baselines"])
            ax.axvline(1.0, color="black", linewidth=1.2, zorder=1)
            _log_axis(ax.xaxis, xs + [1.0], WIDTH - 4)
            ax.grid(axis="x", alpha=0.3)
            ax.set_title(chunk["title"], fontsize=FONT_PT + 0.5, loc="left")
            ax.set_xlabel(
                "speed-up = baseline median / accelops median (> 1: accelops faster; whiskers p20-p80)",
                fontsize=FONT_PT,
            )
        shown = [b for b in baselines if b in drawn]
        handles = [axes[0].errorbar([], [], fmt=style[b][1], color=style[b][0], linestyle="none") for b in shown]
        fig.legend(
            handles,
            [f"vs {b}" for b in shown],
            loc="outside lower center",
            fontsize=FONT_PT,
            ncols=2 if max(map(len, shown)) < 60 else 1,
        )
        _title(fig, title + (f" (part {n} of {len(figures)})" if len(figures) > 1 else ""), WIDTH)
        out.append(fig)
    return out


# --------------------------------------------------------------------------- history

RUN_LABEL_IN = 0.95  # inches along the x axis for one run's label ("abc1234*" over "12-03 14:05")


def history_figure(items: list[tuple], title: str):
    """items: (accelops variant name, threads, points of one benchmark oldest first) -> a
    figure with one line per variant and thread count (the geometric mean over its cases of
    median / the case's first median, log scale) across the runs, evenly spaced and labelled
    by commit and time (every k-th run where they would not fit), with a legend; None when no
    variant has two runs."""
    threads_of = defaultdict(set)
    for name, threads, _ in items:
        threads_of[name].add(threads)
    runs: dict[str, tuple] = {}
    per_line: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    cases: dict[str, int] = defaultdict(int)
    for name, threads, points in items:
        # a variant timed at several thread counts gets a line per count: a run that timed
        # only the new 1-thread cases would otherwise read as "no change" for the variant
        line = name if len(threads_of[name]) == 1 else f"{name}, {threads} thread{'s' if threads != 1 else ''}"
        base = points[0].median_us
        cases[line] += 1
        for p in points:
            runs[p.run_id] = (p.started, p.commit, p.dirty)
            per_line[line][p.run_id].append(p.median_us / base)
    lines = [(name, values) for name, values in per_line.items() if len(values) >= 2]
    if not lines:
        return None
    order = sorted(runs, key=lambda r: (str(runs[r][0]), r))
    x_of = {r: i for i, r in enumerate(order)}
    legend_rows = math.ceil(len(lines) / 2)
    fig = _new_figure(WIDTH, 5.2 + 0.25 * legend_rows)
    ax = fig.add_subplot()
    ys_all = []
    for j, (name, values) in enumerate(lines):
        run_ids = sorted(values, key=x_of.get)
        ys = [math.exp(sum(map(math.log, values[r])) / len(values[r])) for r in run_ids]
        ys_all += ys
        ax.plot(
            [x_of[r] for r in run_ids],
            ys,
            marker=MARKERS[j % len(MARKERS)],
            markersize=6,
            linewidth=1.5,
            color=COLORS[j % len(COLORS)],
            label=f"{name} ({cases[name]} case{'s' if cases[name] > 1 else ''})",
        )
    ax.axhline(1.0, color="black", linewidth=1)
    _log_axis(ax.yaxis, ys_all + [1.0], 4.2)

    # every run has a tick; as many as fit get a label, the newest run always
    every = math.ceil(len(order) * RUN_LABEL_IN / (WIDTH - 1.8))
    shown = list(range(len(order) - 1, -1, -every))[::-1]

    def run_label(run_id: str) -> str:
        started, commit, dirty = runs[run_id]
        when = started.strftime("%m-%d %H:%M") if hasattr(started, "strftime") else str(started or "?")[:16]
        return f"{(commit or '?')[:7]}{'*' if dirty else ''}\n{when}"

    ax.set_xticks(range(len(order)), minor=True)
    ax.set_xticks(shown, [run_label(order[i]) for i in shown])
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.tick_params(labelsize=FONT_PT)
    ax.grid(axis="y", alpha=0.3)
    ax.set_xlabel(
        f"{len(order)} runs, oldest first, evenly spaced (commit, * = uncommitted changes; "
        f"UTC month-day time){'' if every == 1 else f'; every {every}th labelled'}",
        fontsize=FONT_PT,
    )
    ax.set_ylabel("median / the case's first median\n(geometric mean over cases; < 1: faster)", fontsize=FONT_PT)
    fig.legend(
        loc="outside lower center", ncols=2, fontsize=FONT_PT, title="accelops variant (cases)", title_fontsize=FONT_PT
    )
    _title(fig, title, WIDTH)
    return fig


# --------------------------------------------------------------------------- other measures


def _shared_rows_figure(labels: list[str], panels: list[dict], title: str, label_chars: int = LABEL_CHARS):
    """Panels side by side over the same rows (one per label), each panel:
    {"title", "xlabel", "groups": [(name, color, marker, {row: value})], "bars", "log", "dodge",
     "line" (an x to mark), "band" ((low, high) to shade), "legend" (its groups go in the figure's legend)}."""
    labels = [_wrap(label, label_chars) for label in labels]
    groups_max = max(len(p["groups"]) for p in panels)
    panel_in = 3.0
    width = min(MAX_INCHES, 0.08 * label_chars + 0.6 + panel_in * len(panels))
    titles = max(_lines(_wrap(p["title"], _chars(panel_in, FONT_PT + 0.5))) for p in panels)
    xlabels = max(_lines(_wrap(p["xlabel"], _chars(panel_in, FONT_PT))) for p in panels)
    header = 1.0 + 0.2 * (titles + xlabels) + (0.3 if _lines(_wrap(title, _chars(width - 0.3))) > 1 else 0)
    legend = {}  # group name -> (marker, colour): a bar's group shows as a square
    for panel in panels:
        for name, color, marker, values in panel["groups"] if panel.get("legend") else ():
            if values:
                legend.setdefault(name, ("s" if panel.get("bars") else marker, color))
    header += 0.3 * math.ceil(len(legend) / 4)
    heights = _row_heights(labels, groups_max)
    fig = _new_figure(width, header + sum(heights))
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        if panel.get("band"):
            ax.axvspan(*panel["band"], color="tab:green", alpha=0.12, linewidth=0)
        centres = _rows_axis(ax, labels, heights)
        xs = _draw_groups(ax, centres, panel["groups"], bars=panel.get("bars", False), dodge=panel.get("dodge", True))
        if panel.get("line") is not None:
            ax.axvline(panel["line"], color="black", linewidth=1.2)
        if panel.get("log"):
            _log_axis(ax.xaxis, xs + ([panel["line"]] if panel.get("line") else []), panel_in)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(_wrap(panel["title"], _chars(panel_in, FONT_PT + 0.5)), fontsize=FONT_PT + 0.5)
        ax.set_xlabel(_wrap(panel["xlabel"], _chars(panel_in, FONT_PT)), fontsize=FONT_PT)
    for ax in axes[1:]:
        ax.tick_params(labelleft=False)
    if legend:
        # one legend under the panels: inside a panel it would cover markers
        handles = [
            axes[0].errorbar([], [], fmt=marker, color=color, linestyle="none") for marker, color in legend.values()
        ]
        fig.legend(handles, list(legend), loc="outside lower center", ncols=min(4, len(legend)), fontsize=FONT_PT)
    _title(fig, title, width)
    return fig


def _mib(value) -> float | None:
    return None if value is None else value / 2**20


def _hpo_figures(rows: list[dict], title: str) -> list:
    """Final regret (p50, p20-p80 over seeds, log) per problem and optimiser, and the time
    to choose a configuration: the two things bench/results/hpo_summary.md compares."""
    regret = [r for r in rows if r.get("kind") == "regret" and r.get("final_regret_p50") is not None]
    ask = [r for r in rows if r.get("kind") == "ask_time" and r.get("median_ms") is not None]
    if not regret and not ask:
        return []
    labels = list(dict.fromkeys(r["label"] or r["method"] for r in regret + ask))
    row = {label: i for i, label in enumerate(labels)}
    accel = {r["label"] or r["method"]: bool(r["accelops"]) for r in regret + ask}
    panels = []
    for problem in dict.fromkeys(r["problem"] for r in regret):
        mine = [r for r in regret if r["problem"] == problem]
        groups = []
        for name, color, marker, is_ours in (
            ("accelops", "tab:blue", "o", True),
            ("other library", "tab:orange", "s", False),
        ):
            values = {
                row[r["label"] or r["method"]]: (
                    r["final_regret_p50"],
                    r.get("final_regret_p20"),
                    r.get("final_regret_p80"),
                )
                for r in mine
                if accel[r["label"] or r["method"]] == is_ours
            }
            groups.append((name, color, marker, values))
        # an optimiser is accelops or not: the two groups never share a row, so no dodging
        panels.append(
            {
                "title": f"{problem}: final regret",
                "xlabel": "median over seeds, p20-p80 (lower is better)",
                "groups": groups,
                "log": True,
                "dodge": False,
                "legend": len(panels) == 0,
            }
        )
    if ask:
        problems = list(dict.fromkeys(r["problem"] for r in ask))
        obs = sorted({r.get("observations") for r in ask if r.get("observations")})
        groups = [
            (
                f"time to choose, {p}",
                COLORS[2 + i % 8],
                MARKERS[2 + i % 8],
                {
                    row[r["label"] or r["method"]]: (
                        r["median_ms"],
                        r.get("p20_ms") or r["median_ms"],
                        r.get("p80_ms") or r["median_ms"],
                    )
                    for r in ask
                    if r["problem"] == p
                },
            )
            for i, p in enumerate(problems)
        ]
        panels.append(
            {
                "title": "time to choose a configuration" + (f" after {obs[-1]} observations" if obs else ""),
                "xlabel": "ms, median, p20-p80",
                "groups": groups,
                "log": True,
                "legend": True,
            }
        )
    return [_shared_rows_figure(labels, panels, title, label_chars=36)]


def _lm_figures(rows: list[dict], title: str) -> list:
    """Per model variant: validation bits per character relative to fp32 (with the target
    where the bench set one), the deployed size and the evaluation speed."""
    rows = [r for r in rows if r.get("val_bpc") is not None]
    if not rows:
        return []
    labels = [r["label"] or r["method"] for r in rows]
    panels = [
        {
            "title": "validation bits/char vs fp32",
            "xlabel": "bits/char / fp32's (lower is better)",
            "groups": [
                ("bits/char vs fp32", "tab:blue", "o", {i: r.get("bpc_vs_fp32") for i, r in enumerate(rows)}),
                (
                    "the bench's target (at most)",
                    "tab:red",
                    "x",
                    {i: r.get("target_bpc_vs_fp32") for i, r in enumerate(rows) if r.get("target_bpc_vs_fp32")},
                ),
            ],
            "line": 1.0,
            "legend": True,
            "dodge": False,
        },
        {
            "title": "deployed size",
            "xlabel": "MiB (weights as deployed)",
            "bars": True,
            "groups": [("deployed", "tab:green", "s", {i: _mib(r.get("deployed_bytes")) for i, r in enumerate(rows)})],
        },
        {
            "title": "evaluation speed",
            "xlabel": "tokens/s (validation pass)",
            "bars": True,
            "groups": [("eval", "tab:purple", "s", {i: r.get("eval_tokens_per_s") for i, r in enumerate(rows)})],
        },
    ]
    return [_shared_rows_figure(labels, panels, title)]


def _eval_figures(rows: list[dict], title: str) -> list:
    """Per task and variant of accelops eval / bench_eval: the difference from the baseline
    on the task's primary metric (points; a ratio for perplexity) with the issue's target,
    and the deployed size."""
    rows = [r for r in rows if r.get("delta") is not None and r.get("task")]
    if not rows:
        return []
    labels = [r["label"] or r["method"] for r in rows]
    points = {i: r for i, r in enumerate(rows) if r.get("delta_unit") == "points"}
    ratios = {i: r for i, r in enumerate(rows) if r.get("delta_unit") == "ratio"}
    panels = []
    for part, unit, line in ((points, "points", 0.0), (ratios, "ratio", 1.0)):
        if part:
            panels.append(
                {
                    "title": f"primary metric vs the baseline ({unit})",
                    "xlabel": "candidate - baseline, points (higher is better)"
                    if unit == "points"
                    else "perplexity / baseline's (lower is better)",
                    "groups": [
                        ("delta", "tab:blue", "o", {i: r["delta"] for i, r in part.items()}),
                        (
                            "the issue's target (at least / at most)",
                            "tab:red",
                            "x",
                            {
                                i: (-r["target"] if unit == "points" else r["target"])
                                for i, r in part.items()
                                if r.get("target") is not None
                            },
                        ),
                    ],
                    "line": line,
                    "legend": True,
                    "dodge": False,
                }
            )
    panels.append(
        {
            "title": "deployed size",
            "xlabel": "MiB (weights as deployed)",
            "bars": True,
            "groups": [("deployed", "tab:green", "s", {i: _mib(r.get("deployed_bytes")) for i, r in enumerate(rows)})],
        }
    )
    return [_shared_rows_figure(labels, panels, title)]


def _by_rank(rows: list[dict], key_of, field, scale=None) -> list[tuple]:
    """One group per rank: {row of the key: the rank's value}."""
    keys = list(dict.fromkeys(key_of(r) for r in rows))
    ranks = sorted({r.get("rank") for r in rows if r.get("rank") is not None}) or [None]
    groups = []
    for i, rank in enumerate(ranks):
        values = {}
        for r in rows:
            if r.get("rank") == rank and r.get(field) is not None:
                values[keys.index(key_of(r))] = scale(r[field]) if scale else r[field]
        # squares for every rank, told apart by colour: the legend's square stands for the
        # rank's bars and its markers alike
        groups.append((f"rank {rank}" if rank is not None else field, COLORS[i % len(COLORS)], "s", values))
    return groups


def _plan_figures(rows: list[dict], title: str) -> list:
    """The memory planner's estimate against the measured peak, per strategy, quantization,
    optimizer and rank, with the tolerance band the bench accepts."""
    rows = [r for r in rows if r.get("estimate_bytes") and r.get("measured_bytes")]
    if not rows:
        return []
    several_cases = len({r.get("case") for r in rows}) > 1

    def key(r):
        text = f"{r['method']} · {r.get('quant') or 'fp32'} · {r.get('optimizer')}"
        return f"{r.get('case')}: {text}" if several_cases else text

    for r in rows:
        r["estimate_vs_measured"] = r["estimate_bytes"] / r["measured_bytes"]
    tolerance = max((r.get("tolerance") or 0) for r in rows)
    labels = list(dict.fromkeys(key(r) for r in rows))
    panels = [
        {
            "title": "planner estimate / measured peak",
            "xlabel": "ratio (1 = exact; green: within the tolerance)",
            "groups": _by_rank(rows, key, "estimate_vs_measured"),
            "line": 1.0,
            "legend": True,
            "band": (1 - tolerance, 1 + tolerance) if tolerance else None,
        },
        {
            "title": "measured peak RSS growth per rank",
            "xlabel": "MiB",
            "bars": True,
            "legend": True,
            "groups": _by_rank(rows, key, "measured_bytes", _mib),
        },
    ]
    case = "" if several_cases else f" ({rows[0].get('case')})"
    return [_shared_rows_figure(labels, panels, title + case)]


def _scaleout_figures(rows: list[dict], title: str) -> list:
    """Per parallelism strategy: throughput, peak memory and state per rank, and what each
    rank sends a step (bench/results/scaleout_summary.md's columns)."""
    rows = [r for r in rows if r.get("tokens_per_s") is not None]
    if not rows:
        return []
    several = len({r.get("optimizer") for r in rows}) > 1

    def key(r):
        return f"{r['method']} · {r.get('optimizer')}" if several else str(r["method"])

    labels = list(dict.fromkeys(key(r) for r in rows))
    panels = [
        {
            "title": "throughput",
            "xlabel": "tokens/s",
            "bars": True,
            "legend": True,
            "groups": _by_rank(rows, key, "tokens_per_s"),
        },
        {
            "title": "peak RSS growth per rank",
            "xlabel": "MiB",
            "bars": True,
            "groups": _by_rank(rows, key, "peak_rss_delta_bytes", _mib),
        },
        {
            "title": "params + grads + optimizer state per rank",
            "xlabel": "MiB",
            "bars": True,
            "groups": _by_rank(rows, key, "state_bytes", _mib),
        },
        {
            "title": "collective payload per rank per step",
            "xlabel": "MiB (log)",
            "log": True,
            "groups": _by_rank(rows, key, "payload_bytes_per_step", _mib),
        },
    ]
    optimizer = "" if several else f", optimizer {rows[0].get('optimizer')}"
    return [_shared_rows_figure(labels, panels, f"{title} ({rows[0].get('case')}{optimizer})")]


def _generate_figures(rows: list[dict], title: str) -> list:
    """bench_generate's rows (one per engine, batch and thread count): decode and prefill
    tokens/s and the peak resident memory, a row per engine and batch, a bar per thread
    count (bench/results/generate_summary.md's columns). Rows that were skipped or failed
    are not drawn; the summary gives their reason."""
    rows = [r for r in rows if r.get("decode_tokens_per_s") is not None and r.get("engine")]
    if not rows:
        return []

    def key(r):
        return f"{r['engine']} · batch {r.get('batch')}"

    labels = list(dict.fromkeys(key(r) for r in rows))
    threads = sorted({r.get("threads") for r in rows}, key=lambda t: (t is None, t))

    def groups(value):
        out = []
        for i, t in enumerate(threads):
            values = {labels.index(key(r)): value(r) for r in rows if r.get("threads") == t and value(r) is not None}
            name = f"{t} thread{'s' if t != 1 else ''}" if t is not None else "threads not recorded"
            out.append((name, COLORS[i % len(COLORS)], "s", values))
        return out

    def decode(r):
        # tokens/s at the median step, whiskers at the p80 (slower) and p20 (faster) steps
        tps, batch = r["decode_tokens_per_s"], r.get("batch") or 1
        p20, p80 = r.get("decode_step_p20_s"), r.get("decode_step_p80_s")
        return (tps, batch / p80, batch / p20) if p20 and p80 else tps

    panels = [
        {
            "title": "decode",
            "xlabel": "tokens/s: batch / median step (whiskers: p80 and p20 step)",
            "bars": True,
            "legend": True,
            "groups": groups(decode),
        },
        {
            "title": "prefill",
            "xlabel": "tokens/s: batch x prompt / time to first token",
            "bars": True,
            "groups": groups(lambda r: r.get("prefill_tokens_per_s")),
        },
        {
            "title": "peak resident memory",
            "xlabel": "MiB: the process's high-water mark while generating (model included)",
            "bars": True,
            "groups": groups(lambda r: _mib(r.get("peak_rss_bytes"))),
        },
    ]
    r0 = rows[0]
    shape = r0.get("shape")
    dims = (
        f"dim {r0['model_dim']}, {r0['model_n_layers']} layers, vocab {r0['model_vocab_size']}"
        if all(r0.get(k) is not None for k in ("model_dim", "model_n_layers", "model_vocab_size"))
        else None
    )
    loads = [r["loadavg_1m"] for r in rows if r.get("loadavg_1m") is not None]
    setup = ", ".join(
        part
        for part in (
            f"shape {shape}" if shape else None,
            dims,
            f"prompt {r0.get('prompt_tokens')}, {r0.get('new_tokens')} new tokens, greedy"
            if r0.get("prompt_tokens") is not None
            else None,
            f"load {min(loads):.1f}-{max(loads):.1f}" if loads else None,
        )
        if part
    )
    return [_shared_rows_figure(labels, panels, f"{title} ({setup})" if setup else title)]


# Families whose rows carry no median time: a view of what they do carry.
METRIC_FIGURES = {
    "generate": _generate_figures,
    "hpo": _hpo_figures,
    "lm": _lm_figures,
    "eval": _eval_figures,
    "plan": _plan_figures,
    "scaleout": _scaleout_figures,
}


# --------------------------------------------------------------------------- the page


@dataclass
class Plot:
    family: str
    machine: str  # fingerprint
    kind: str  # "ratios" | "history" | "measures"
    heading: str
    fig: object


def build_plots(db) -> tuple[dict[str, str], list[Plot]]:
    """-> (fingerprint -> machine name, every plot of the report, in page order)."""
    from .regress import series as all_series

    machines = machine_names(_machines(db))
    _, ratio_rows = db.query(LATEST_RATIOS_SQL)
    ratios = defaultdict(list)
    for row in ratio_rows:
        r = dict(zip(RATIO_COLUMNS, row))
        ratios[(r["family"], r["machine"])].append(r)

    _, accel_keys = db.query("SELECT DISTINCT family, coalesce(label, method) FROM measurements WHERE is_accelops")
    accel_labels = set(accel_keys)
    history = defaultdict(list)
    for (fp, family, op, method, label, config, threads), points in all_series(db).items():
        if (family, label or method) in accel_labels:
            history[(family, fp)].append((label or method, threads, points))

    latest = defaultdict(list)
    _, latest_rows = db.query(LATEST_ROWS_SQL)
    for fp, family, run_id, commit, started, op, method, label, accel, status, threads, config, extra in latest_rows:
        if family not in METRIC_FIGURES or status not in (None, "ok"):
            continue
        row = {}
        for blob in (config, extra):
            try:
                parsed = json.loads(blob) if blob else {}
            except ValueError:
                parsed = {}
            row.update(parsed if isinstance(parsed, dict) else {})
        row.update(
            run_id=run_id,
            commit=commit,
            started=started,
            op=op,
            method=method,
            label=label,
            accelops=accel,
            threads=threads,
        )
        latest[(family, fp)].append(row)

    plots = []
    families = sorted({f for f, _ in ratios} | {f for f, _ in history} | {f for f, _ in latest})
    for family in families:
        for fp in sorted(machines):
            name = machines[fp]
            rows = ratios.get((family, fp))
            if rows:
                run = f"run {rows[0]['run_id']}, commit {(rows[0]['commit'] or '?')[:10]}"
                figures = ratio_figures(rows, f"{family} on {name}: accelops vs baselines, newest {run}", family)
                for n, fig in enumerate(figures, 1):
                    part = f" (part {n} of {len(figures)})" if len(figures) > 1 else ""
                    plots.append(Plot(family, fp, "ratios", f"accelops vs baselines, {name}{part}", fig))
            if (family, fp) in latest:
                rows = latest[(family, fp)]
                run = f"newest run {rows[0]['run_id']}, commit {(rows[0]['commit'] or '?')[:10]}"
                for fig in METRIC_FIGURES[family](rows, f"{family} on {name}, {run}"):
                    plots.append(Plot(family, fp, "measures", f"newest run, {name}", fig))
            if (family, fp) in history:
                fig = history_figure(history[(family, fp)], f"{family} on {name}: accelops across runs")
                if fig is not None:
                    plots.append(Plot(family, fp, "history", f"history, {name}", fig))
    return machines, plots


def write_report(db, out_dir, window: int = 5, threshold: float = 0.10) -> dict:
    """Write <out_dir>/index.html and its PNGs -> {"html", "pngs", "verdicts", "plots" (their
    Plot records, each with its matplotlib figure)}."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError("accelops report draws its plots with matplotlib: pip install matplotlib") from exc

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    machines, plots = build_plots(db)
    body, pngs = [], []

    verdicts = check(db, window=window, threshold=threshold)
    flagged = [v for v in verdicts if v.kind in ("regression", "invalid", "improvement")]
    body.append("<h2>Regression check</h2>")
    body.append(
        f"<p>Rule: the newest run of a benchmark is a regression when its median is more than "
        f"{threshold:.0%} above the highest p80 of the previous {window} runs on the same machine and its "
        f"p20 is above their median (accelops.results.regress). {len(verdicts)} benchmarks: "
        f"{sum(v.kind == 'regression' for v in verdicts)} regressions, "
        f"{sum(v.kind == 'invalid' for v in verdicts)} invalid (a non-finite newest measurement), "
        f"{sum(v.kind == 'improvement' for v in verdicts)} improvements, "
        f"{sum(v.kind == 'too little history' for v in verdicts)} with too little history.</p>"
    )
    if flagged:
        body.append(
            "<ul>" + "".join(f"<li><b>{v.kind}</b>: {html.escape(v.describe())}</li>" for v in flagged) + "</ul>"
        )
    notes = [(v, n) for v in verdicts for n in getattr(v, "notes", ())]
    if notes:  # history points left out (non-finite), so a reader sees what the check did not use
        body.append(
            "<ul>"
            + "".join(f"<li>note: {html.escape(v.describe())}: {html.escape(n)}</li>" for v, n in notes)
            + "</ul>"
        )

    family = None
    count = defaultdict(int)
    for plot in plots:
        if plot.family != family:
            family = plot.family
            body.append(f"<h2>{html.escape(family)}</h2>")
        count[(plot.family, plot.machine, plot.kind)] += 1
        n = count[(plot.family, plot.machine, plot.kind)]
        name = f"{plot.family}_{plot.machine}_{plot.kind}{'' if n == 1 else f'_{n}'}.png"
        plot.fig.savefig(out / name, dpi=DPI)
        pngs.append(out / name)
        body.append(f"<h3>{html.escape(plot.heading)}</h3><img src='{name}' alt='{html.escape(plot.heading)}'>")

    _, matrix = db.query(MATRIX_SQL)
    body.append(
        "<h2>Compatibility matrix (op x backend x machine, newest run)</h2><table border=1 cellpadding=3>"
        "<tr><th>family</th><th>op</th><th>backend</th><th>machine</th><th>result</th></tr>"
    )
    for family, op, backend, fp, cpu, status, median, reason, started in matrix:
        if status in (None, "ok"):
            cell = "works" + (f", {median:.4g} us" if median else "")
        else:
            cell = f"<b>{html.escape(str(status))}</b>" + (f": {html.escape(reason[:200])}" if reason else "")
        body.append(
            f"<tr><td>{html.escape(str(family))}</td><td>{html.escape(str(op))}</td>"
            f"<td>{html.escape(backend)}</td><td>{html.escape(machines.get(fp, fp))}</td><td>{cell}</td></tr>"
        )
    body.append("</table>")

    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>accelops benchmark report</title></head><body>"
        f"<h1>accelops benchmark report</h1><p>database {html.escape(str(db.path))}; machines: "
        + ", ".join(f"{html.escape(name)} [{fp}]" for fp, name in machines.items())
        + "</p>"
        + "\n".join(body)
        + "</body></html>"
    )
    index = out / "index.html"
    tmp = index.with_suffix(".html.tmp")
    tmp.write_text(page)
    tmp.replace(index)
    return {"html": index, "pngs": pngs, "verdicts": verdicts, "plots": plots}
