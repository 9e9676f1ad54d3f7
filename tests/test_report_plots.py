"""accelops report's plots are readable at 100% zoom.

Built from this repository's own results (bench/results/*.jsonl imported into a temporary
database, as docs/results.md's "Results database" section says): every benchmark family gets a
plot (bench_generate's, which has no rows there yet, from its quick rows in tests/data);
no PNG is larger than 1600 px a side; no text is smaller than 9 pt, cut short with
'~' or drawn over another label; history plots have a legend. And on synthetic rows: two
machines of the same CPU model get different names, cases that differ only at the end of
a long configuration get different labels, a family with many cases is split into several
figures, and a long history labels its runs without overlap."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("duckdb")
pytest.importorskip("matplotlib")

from matplotlib.container import BarContainer  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from PIL import Image  # noqa: E402

from accelops.results import ResultsDB, fingerprint  # noqa: E402
from accelops.results.regress import series  # noqa: E402
from accelops.results.report import (  # noqa: E402
    DPI,
    MAX_INCHES,
    MIN_FONT_PT,
    case_names,
    history_figure,
    machine_names,
    ratio_figures,
    write_report,
)
from tests import test_results as tr  # noqa: E402  (a module: its tests are not collected again here)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = sorted((ROOT / "bench" / "results").glob("*.jsonl"))
MAX_PX = int(MAX_INCHES * DPI)
# The rows of `bench/bench_generate.py --quick --threads 1,2` as it wrote them (run
# f42c0fd56d3c, a loaded machine: torchao's 2-thread rows timed out and are error rows).
GENERATE_ROWS = ROOT / "tests" / "data" / "generate_quick_rows.jsonl"
# Benchmark families with no rows in bench/results yet -> the test that draws their rows
# instead (bench_generate's full run is left to a quiet machine).
NOT_IN_RESULTS = {"generate": "test_generate_rows_get_a_plot"}


def _texts(fig) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def _overlaps(labels, renderer) -> list[tuple[str, str]]:
    """Pairs of visible, non-empty tick labels whose boxes intersect by more than 1 px."""
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in labels if t.get_visible() and t.get_text()]
    out = []
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1 :]:
            w = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
            h = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
            if w > 1 and h > 1:
                out.append((a, b))
    return out


def assert_readable(fig, what: str) -> None:
    width, height = fig.get_size_inches() * fig.dpi
    assert width <= MAX_PX and height <= MAX_PX, f"{what}: {width:.0f} x {height:.0f} px"
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for t in _texts(fig):
        assert t.get_fontsize() >= MIN_FONT_PT, f"{what}: {t.get_text()!r} at {t.get_fontsize()} pt"
        assert not any(line.endswith("~") for line in t.get_text().splitlines()), f"{what}: cut {t.get_text()!r}"
    for ax in fig.axes:
        for axis in ("x", "y"):
            labels = ax.get_yticklabels() if axis == "y" else ax.get_xticklabels()
            assert not _overlaps(labels, renderer), f"{what}: {axis} labels overlap: {_overlaps(labels, renderer)}"


@pytest.fixture(scope="module")
def real_report(tmp_path_factory):
    """The report of this repository's results: (written dict, page text, families in the files)."""
    if not RESULTS:
        pytest.skip("no bench/results/*.jsonl")
    tmp = tmp_path_factory.mktemp("real")
    db = ResultsDB(tmp / "results.duckdb")
    db.import_jsonl(RESULTS)
    written = write_report(db, tmp / "report")
    families = {
        json.loads(line)["family"] for path in RESULTS for line in path.read_text().splitlines() if line.strip()
    }
    return written, written["html"].read_text(), families


def test_every_family_in_the_results_gets_a_plot(real_report):
    written, page, families = real_report
    assert {"hpo", "lm", "plan", "scaleout", "matmul", "ffn"} <= families
    plotted = {plot.family for plot in written["plots"]}
    assert plotted == families, f"no plot for {sorted(families - plotted)}"
    for png in written["pngs"]:
        assert png.name in page


def test_every_bench_family_gets_a_plot(real_report):
    """Every bench/bench_*.py family is drawn: from its rows in bench/results (the test
    above), or, while it has none there, by the test NOT_IN_RESULTS names."""
    _, _, families = real_report
    bench = {
        m.group(1)
        for path in (ROOT / "bench").glob("bench_*.py")
        if (m := re.search(r'^FAMILY = "(\w+)"', path.read_text(), re.MULTILINE))
    }
    assert "generate" in bench and "matmul" in bench
    missing = bench - families - set(NOT_IN_RESULTS)
    assert not missing, f"bench families with no rows in bench/results and no plot test: {sorted(missing)}"
    for family, test in NOT_IN_RESULTS.items():
        assert callable(globals().get(test)), f"{family}: {test} is not a test of this module"


def check_generate_plot(rows: list[dict], out_dir: Path) -> None:
    """bench_generate's rows as stored -> the report's generate figure: a row per engine and
    batch, a bar per thread count in each of the decode, prefill and peak-memory panels at
    the rows' own values, rows that failed or were skipped left out, readable. Quick rows
    are stored as a full run (the report leaves quick runs out)."""
    rows = [dict(r, quick=False) for r in rows]
    db = ResultsDB(out_dir / "generate.duckdb")
    db.write_rows(rows)
    # the case is the engine and its setup; the measured numbers stay out of the case's key
    _, stored = db.query("SELECT DISTINCT method, config FROM measurements WHERE family = 'generate'")
    for method, config in stored:
        assert set(json.loads(config)) <= {"engine", "shape", "batch", "prompt_tokens", "new_tokens"}
        assert json.loads(config)["engine"] == method
    written = write_report(db, out_dir / "report")
    (plot,) = [p for p in written["plots"] if p.family == "generate"]
    assert plot.kind == "measures"
    assert_readable(plot.fig, "generate")
    decode, prefill, memory = plot.fig.axes
    assert [ax.get_title() for ax in plot.fig.axes] == ["decode", "prefill", "peak resident memory"]
    labels = [t.get_text() for t in decode.get_yticklabels()]
    ok = [r for r in rows if r["status"] == "ok"]
    # an engine whose every row failed or was skipped (torchao where it is not installed or
    # timed out) gets no row in the figure
    assert labels == list(dict.fromkeys(f"{r['engine']} · batch {r['batch']}" for r in ok))
    threads = sorted({r["threads"] for r in ok})
    for ax, field, scale in (
        (decode, "decode_tokens_per_s", 1),
        (prefill, "prefill_tokens_per_s", 1),
        (memory, "peak_rss_bytes", 2**-20),
    ):
        widths = sorted(bar.get_width() for c in ax.containers if isinstance(c, BarContainer) for bar in c)
        assert widths == pytest.approx(sorted(r[field] * scale for r in ok)), field
    (legend,) = plot.fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [f"{t} thread{'s' if t != 1 else ''}" for t in threads]
    title = plot.fig.get_suptitle()
    assert f"shape {rows[0]['shape']}" in title and f"prompt {rows[0]['prompt_tokens']}" in title
    assert any(png.name.startswith("generate_") for png in written["pngs"])


def test_generate_rows_get_a_plot(tmp_path):
    rows = [json.loads(line) for line in GENERATE_ROWS.read_text().splitlines() if line.strip()]
    assert {r["family"] for r in rows} == {"generate"}
    assert any(r["status"] != "ok" for r in rows)  # error rows are in the file, and left out
    check_generate_plot(rows, tmp_path)


def test_every_png_is_within_the_size_limit(real_report):
    written, _, _ = real_report
    for png in written["pngs"]:
        with Image.open(png) as image:
            width, height = image.size
        assert 300 <= width <= MAX_PX and 200 <= height <= MAX_PX, f"{png.name}: {width} x {height}"
    # the matmul family (18 cases x 6 baselines x 4 variants on one machine) is split, not squeezed
    assert sum(p.family == "matmul" and p.kind == "ratios" for p in written["plots"]) >= 2


def test_every_plot_is_readable(real_report):
    written, _, _ = real_report
    for plot in written["plots"]:
        assert_readable(plot.fig, f"{plot.family} {plot.kind} {plot.heading}")


def test_history_plots_have_a_legend(real_report):
    written, _, _ = real_report
    histories = [p for p in written["plots"] if p.kind == "history"]
    assert histories
    for plot in histories:
        (legend,) = plot.fig.legends
        assert [t.get_text() for t in legend.get_texts()], plot.heading


def test_ffn_cases_are_told_apart(real_report):
    """The ffn cases differ only in `mode`, at the end of a long configuration: cut to 38
    characters both read `... activation=swigl~`."""
    written, _, _ = real_report
    (plot,) = [p for p in written["plots"] if p.family == "ffn" and p.kind == "ratios"]
    labels = [t.get_text() for t in plot.fig.axes[0].get_yticklabels()]
    assert sorted(labels) == ["mode=forward", "mode=train"]
    assert "activation=swiglu" in plot.fig.axes[0].get_title(loc="left")
    names, shared = case_names(
        [
            (
                None,
                json.dumps(
                    {"T": 4096, "D": 1024, "H": 2816, "activation": "swiglu", "dtype": "float32", "mode": m},
                    sort_keys=True,
                ),
                2,
            )
            for m in ("forward", "train")
        ],
        "ffn",
    )
    assert names == ["mode=forward", "mode=train"]
    assert shared == "T=4096, D=1024, H=2816, activation=swiglu, dtype=float32, threads=2"


AVX2 = dict(tr.MACHINE, cpu_features=["avx2", "fma", "f16c"], accelops_cpu_isa="avx2")
VNNI = dict(
    tr.MACHINE, cpu_features=["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vnni"], accelops_cpu_isa="avx512vnni"
)


def test_two_machines_of_one_cpu_model_are_named_apart(tmp_path):
    def machine(m):
        return {
            "cpu_model": m["cpu_model"],
            "cpu_count": m["cpu_count"],
            "cpu_isa": m["accelops_cpu_isa"],
            "cpu_features": m["cpu_features"],
            "gpu_name": None,
        }

    # one machine: the CPU and its cores say enough
    assert machine_names({"fp1": machine(AVX2)}) == {"fp1": "AMD EPYC · 2 cores"}
    # two AMD EPYC with 2 cores: the instruction set tells them apart
    assert machine_names({"fp1": machine(AVX2), "fp2": machine(VNNI)}) == {
        "fp1": "AMD EPYC · avx2 · 2 cores",
        "fp2": "AMD EPYC · avx512vnni · 2 cores",
    }
    # the same instruction set, other features: then the fingerprint
    other = dict(machine(VNNI), cpu_features=VNNI["cpu_features"] + ["avxvnni"])
    names = machine_names({"0123456789abcdef": machine(VNNI), "fedcba9876543210": other})
    assert names == {
        "0123456789abcdef": "AMD EPYC · avx512vnni · 2 cores · 01234567",
        "fedcba9876543210": "AMD EPYC · avx512vnni · 2 cores · fedcba98",
    }
    # trademarks and "Processor" are left out; a GPU is named
    assert machine_names(
        {"a": {"cpu_model": "Intel(R) Xeon(R) Processor", "cpu_count": 16, "gpu_name": "NVIDIA H100"}}
    ) == {"a": "Intel Xeon · 16 cores · NVIDIA H100"}

    # in the report: each machine's plots and the page carry its own name
    db = ResultsDB(tmp_path / "two.duckdb")
    rows = []
    for tag, m in (("a", AVX2), ("b", VNNI)):
        for r in tr.matmul_run(f"run-{tag}"):
            rows.append(dict(r, machine=dict(m)))
    db.write_rows(rows)
    written = write_report(db, tmp_path / "report")
    page = written["html"].read_text()
    assert "AMD EPYC · avx2 · 2 cores" in page and "AMD EPYC · avx512vnni · 2 cores" in page
    titles = {p.machine: p.fig.get_suptitle() for p in written["plots"] if p.kind == "ratios"}
    assert "avx2 · 2 cores" in titles[fingerprint(AVX2)] and "avx512vnni" in titles[fingerprint(VNNI)]


def test_a_family_with_many_cases_is_split_into_readable_figures():
    rows = []
    baselines = [f"baseline number {i} with a fairly long descriptive label" for i in range(6)]
    for variant in ("accelops ternary_matmul", "accelops int8_linear"):
        for m in range(60):
            for b in baselines:
                rows.append(
                    {
                        "op": None,
                        "method": variant,
                        "label": variant,
                        "threads": 2,
                        "baseline": b,
                        "config": json.dumps({"K": 4096, "M": m + 1, "N": 4096, "x_dtype": "float32"}),
                        "ratio": 2.0 + m / 10,
                        "low": 1.5,
                        "high": 3.0,
                    }
                )
    figures = ratio_figures(rows, "matmul on a machine", "matmul")
    assert len(figures) >= 4  # 120 case rows x 6 baselines do not fit 1600 px
    drawn = []
    for i, fig in enumerate(figures):
        assert_readable(fig, f"figure {i}")
        for ax in fig.axes:
            drawn += [t.get_text() for t in ax.get_yticklabels()]
            assert ax.get_yticklabels()[0].get_text().startswith("M=")  # M N K, the family's own order
    assert len(drawn) == 120  # every case drawn once


def test_a_long_history_labels_its_runs_without_overlap(tmp_path):
    db = ResultsDB(tmp_path / "long.duckdb")
    rows = []
    for day in range(40):
        for r in tr.matmul_run(
            f"run{day:02d}", speed=1 + day / 40, date=f"2026-11-{1 + day // 2:02d}T{10 + day % 2}:00:00+00:00"
        ):
            rows.append(dict(r, git_commit=f"{day:02d}abcdef0123"))
    db.write_rows(rows)
    items = [
        (label or method, threads, points)
        for (fp, family, op, method, label, config, threads), points in series(db).items()
        if method == "ternary"
    ]
    fig = history_figure(items, "matmul: accelops across runs")
    assert_readable(fig, "history")
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["label ternary (2 cases)"]
    shown = [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()]
    assert 5 <= len(shown) < 40 and shown[-1].startswith("39abcde")  # thinned; the newest run labelled
