"""`accelops report`: an HTML page with PNG plots of the results database.

Per op family: accelops against each baseline across the cases of the newest run on each
machine (speed-up bars with the p20-p80 range), the history across commits on each
machine (each accelops benchmark's median relative to its first run, p20-p80 shaded);
a compatibility matrix (op x backend x machine: works with its speed, or fails with the
reason); and the regression check of accelops.results.regress.
"""
from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path

from .regress import check

LATEST_RATIOS_SQL = """
WITH latest AS (
    SELECT r.machine_fingerprint AS machine, m.family, max(r.started) AS started
    FROM measurements m JOIN runs r USING (run_id)
    WHERE NOT coalesce(r.quick, false) AND m.is_accelops AND m.median_us > 0
    GROUP BY 1, 2)
SELECT l.machine, a.family, a.run_id, r.git_commit, a.label, a.config_key, a.threads,
       b.label, b.median_us / a.median_us,
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

MATRIX_SQL = """
SELECT m.family, m.op, coalesce(m.backend, '?'), r.machine_fingerprint, any_value(r.cpu_model),
       arg_max(m.status, r.started), arg_max(m.median_us, r.started),
       arg_max(json_extract_string(m.extra, '$.reason'), r.started), max(r.started)
FROM measurements m JOIN runs r USING (run_id)
WHERE m.is_accelops AND NOT coalesce(r.quick, false)
GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
"""


def _short_config(config: str | None, limit: int = 38) -> str:
    if not config:
        return ""
    try:
        parsed = json.loads(config)
    except ValueError:
        return config[:limit]
    text = " ".join(f"{k}={v}" for k, v in parsed.items() if not isinstance(v, (dict, list)))
    return text if len(text) <= limit else text[: limit - 1] + "~"


def _plot_ratios(plt, rows, path: Path, title: str) -> None:
    """Horizontal bars, one group per case, one bar per baseline: families with many cases
    and baselines (matmul: 18 x 7) grow downwards instead of into an unreadable strip."""
    cases = list(dict.fromkeys((r[4], r[5], r[6]) for r in rows))
    baselines = list(dict.fromkeys(r[7] for r in rows))
    values = {(r[4], r[5], r[6], r[7]): r[8:11] for r in rows}
    height = 0.8 / max(1, len(baselines))
    fig, ax = plt.subplots(figsize=(9, min(40, 1.5 + 0.16 * len(cases) * max(1, len(baselines)) + 0.2 * len(cases))))
    for j, base in enumerate(baselines):
        ys, xs, lo, hi = [], [], [], []
        for i, case in enumerate(cases):
            v = values.get((*case, base))
            if v is None:
                continue
            ys.append(i + (j - (len(baselines) - 1) / 2) * height)
            xs.append(v[0])
            lo.append(max(0.0, v[0] - min(v[1], v[0])))
            hi.append(max(0.0, max(v[2], v[0]) - v[0]))
        ax.barh(ys, xs, height, xerr=[lo, hi], capsize=1.5, label=f"vs {base}")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up of accelops: baseline median / accelops median (bars: p20-p80 range)", fontsize=8)
    ax.set_yticks(range(len(cases)))
    ax.set_yticklabels([f"{c[0]}  {_short_config(c[1])}  t{c[2]}" for c in cases], fontsize=6)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_history(plt, series, path: Path, title: str) -> int:
    """-> number of benchmarks drawn (series with 2 or more runs)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn, commits = 0, {}
    for (label, config, threads), points in series:
        if len(points) < 2:
            continue
        base = points[0].median_us
        xs = [p.started for p in points]
        ax.plot(xs, [p.median_us / base for p in points], marker="o", markersize=3, linewidth=1,
                label=f"{label} {_short_config(config, 24)} t{threads}")
        ax.fill_between(xs, [p.p20_us / base for p in points], [p.p80_us / base for p in points], alpha=0.15)
        for p in points:
            commits[p.started] = (p.commit or "?")[:7]
        drawn += 1
    if drawn:
        ax.set_ylabel("median time relative to the first run (p20-p80 shaded)")
        ticks = sorted(commits)
        ax.set_xticks(ticks)
        ax.set_xticklabels([commits[t] for t in ticks], rotation=60, ha="right", fontsize=6)
        ax.set_title(title, fontsize=9)
        if drawn <= 12:
            ax.legend(fontsize=5)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def write_report(db, out_dir, window: int = 5, threshold: float = 0.10) -> dict:
    """Write <out_dir>/index.html and its PNGs -> {"html", "pngs", "verdicts"}."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("accelops report draws its plots with matplotlib: pip install matplotlib") from exc
    from .regress import series as all_series

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, machine_rows = db.query("SELECT machine_fingerprint, any_value(cpu_model), any_value(cpu_count), "
                               "any_value(gpu_name), count(*) FROM runs GROUP BY 1 ORDER BY 1")
    machines = {fp: f"{cpu} ({cores} cores{', ' + gpu if gpu else ''})" for fp, cpu, cores, gpu, _ in machine_rows}
    body, pngs = [], []

    verdicts = check(db, window=window, threshold=threshold)
    flagged = [v for v in verdicts if v.kind in ("regression", "improvement")]
    body.append("<h2>Regression check</h2>")
    body.append(f"<p>Rule: the newest run of a benchmark is a regression when its median is more than "
                f"{threshold:.0%} above the highest p80 of the previous {window} runs on the same machine and its "
                f"p20 is above their median (accelops.results.regress). {len(verdicts)} benchmarks: "
                f"{sum(v.kind == 'regression' for v in verdicts)} regressions, "
                f"{sum(v.kind == 'improvement' for v in verdicts)} improvements, "
                f"{sum(v.kind == 'too little history' for v in verdicts)} with too little history.</p>")
    if flagged:
        body.append("<ul>" + "".join(f"<li><b>{v.kind}</b>: {html.escape(v.describe())}</li>" for v in flagged)
                    + "</ul>")

    _, ratio_rows = db.query(LATEST_RATIOS_SQL)
    by_family = defaultdict(list)
    for row in ratio_rows:
        by_family[(row[1], row[0])].append(row)
    _, accel_keys = db.query("SELECT DISTINCT family, label FROM measurements WHERE is_accelops")
    accel_labels = {(f, lab) for f, lab in accel_keys}
    accelops_series = defaultdict(list)
    for (fp, family, op, method, label, config, threads), points in all_series(db).items():
        if (family, label or method) not in accel_labels:
            continue
        name = label or method
        if op and op != method:   # e.g. the dispatch family: two ops on the same shapes
            name = f"{op} {name}"
        accelops_series[(family, fp)].append(((name, config, threads), points))

    families = sorted({f for f, _ in by_family} | {f for f, _ in accelops_series})
    for family in families:
        body.append(f"<h2>{html.escape(family)}</h2>")
        for fp in sorted(machines):
            rows = by_family.get((family, fp))
            if rows:
                name = f"{family}_{fp}_ratios.png"
                _plot_ratios(plt, rows, out / name, f"{family}: newest run {rows[0][2]} (commit "
                                                    f"{(rows[0][3] or '?')[:10]}) on {machines[fp]}")
                pngs.append(out / name)
                body.append(f"<h3>accelops vs baselines, {html.escape(machines[fp])}</h3><img src='{name}'>")
            items = accelops_series.get((family, fp))
            if items:
                name = f"{family}_{fp}_history.png"
                if _plot_history(plt, items, out / name, f"{family}: accelops across commits on {machines[fp]}"):
                    pngs.append(out / name)
                    body.append(f"<h3>history, {html.escape(machines[fp])}</h3><img src='{name}'>")

    _, matrix = db.query(MATRIX_SQL)
    body.append("<h2>Compatibility matrix (op x backend x machine, newest run)</h2><table border=1 cellpadding=3>"
                "<tr><th>family</th><th>op</th><th>backend</th><th>machine</th><th>result</th></tr>")
    for family, op, backend, fp, cpu, status, median, reason, started in matrix:
        if status in (None, "ok"):
            cell = "works" + (f", {median:.4g} us" if median else "")
        else:
            cell = f"<b>{html.escape(str(status))}</b>" + (f": {html.escape(reason[:200])}" if reason else "")
        body.append(f"<tr><td>{html.escape(str(family))}</td><td>{html.escape(str(op))}</td>"
                    f"<td>{html.escape(backend)}</td><td>{html.escape(machines.get(fp, fp))}</td><td>{cell}</td></tr>")
    body.append("</table>")

    page = ("<!doctype html><html><head><meta charset='utf-8'><title>accelops benchmark report</title></head><body>"
            f"<h1>accelops benchmark report</h1><p>database {html.escape(str(db.path))}; machines: "
            + ", ".join(f"{html.escape(name)} [{fp}]" for fp, name in machines.items()) + "</p>"
            + "\n".join(body) + "</body></html>")
    index = out / "index.html"
    tmp = index.with_suffix(".html.tmp")
    tmp.write_text(page)
    tmp.replace(index)
    return {"html": index, "pngs": pngs, "verdicts": verdicts}
