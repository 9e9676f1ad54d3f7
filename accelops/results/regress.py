"""Regression detection over the results database, in the manner of airspeed velocity:
each benchmark's newest run on a machine is judged against that machine's recent
history of the same benchmark.

A benchmark is one (machine fingerprint, family, op, method, label, case, thread count) of
non-quick, successful rows with a median time. The rule, on medians and spreads:

- history: the `window` runs before the newest (default 5), at least `min_history` (2);
- the newest run is a REGRESSION when its median is above the highest p80 of the history
  by more than `threshold` (10%) *and* its own p20 is above the history's median of
  medians: a slow outlier in a noisy run (low p20) is not enough, nor is a drift that stays
  inside the band the history itself spread over;
- symmetrically an IMPROVEMENT when its median is below the lowest p20 of the history by
  more than `threshold` and its p80 below the history's median of medians.

The commit range of a regression runs from the newest history run's commit (the last
good one) to the new run's commit.

Non-finite times (NaN or an infinity, which JSON lines written with json.dumps could hold)
would make every comparison false and so pass any slow-down. A history point with one is
left out of the history, with a note naming its run (the window then reaches one run
further back); a new run with one is INVALID, which fails the check like a regression.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field


@dataclass
class Point:
    run_id: str
    started: object
    commit: str | None
    dirty: bool | None
    median_us: float
    p20_us: float
    p80_us: float

    def non_finite(self) -> list[str]:
        """The names of this point's times that are NaN or infinite."""
        return [name for name in ("median_us", "p20_us", "p80_us") if not math.isfinite(getattr(self, name))]


@dataclass
class Verdict:
    machine: str
    family: str
    op: str | None
    method: str | None
    label: str | None
    config: str | None
    threads: int | None
    kind: str  # "regression" | "improvement" | "ok" | "too little history" | "invalid"
    new: Point
    history: list[Point] = field(default_factory=list)
    band_low_us: float | None = None
    band_high_us: float | None = None
    change: float | None = None  # new median / history median of medians - 1
    notes: list[str] = field(default_factory=list)  # e.g. history points left out, and why

    @property
    def commit_range(self) -> str:
        good = self.history[-1].commit if self.history else None
        return f"{(good or '?')[:10]}..{(self.new.commit or '?')[:10]}{' (dirty)' if self.new.dirty else ''}"

    @property
    def case(self) -> str:
        op = f" {self.op}" if self.op and self.op != self.method else ""
        return f"{self.family}{op} {self.label or self.method} [{self.config}] threads={self.threads}"

    def describe(self) -> str:
        case = self.case
        if self.kind == "invalid":
            bad = ", ".join(f"{name} = {getattr(self.new, name)}" for name in self.new.non_finite())
            return (
                f"invalid: {case}: the newest run {self.new.run_id} (commit {(self.new.commit or '?')[:10]}) "
                f"has {bad}: it cannot be judged (a broken measurement)"
            )
        if self.change is None:
            return f"{self.kind}: {case}"
        return (
            f"{self.kind}: {case}: median {self.new.median_us:.4g} us vs history band "
            f"{self.band_low_us:.4g}-{self.band_high_us:.4g} us ({self.change:+.1%} vs its median), "
            f"commits {self.commit_range}"
        )


def judge(history: list[Point], new: Point, threshold: float = 0.10) -> tuple[str, float, float, float]:
    """-> (kind, band_low, band_high, change) for one benchmark (history oldest first)."""
    band_high = max(p.p80_us for p in history)
    band_low = min(p.p20_us for p in history)
    centre = statistics.median(p.median_us for p in history)
    change = new.median_us / centre - 1.0
    if new.median_us > band_high * (1 + threshold) and new.p20_us > centre:
        return "regression", band_low, band_high, change
    if new.median_us < band_low * (1 - threshold) and new.p80_us < centre:
        return "improvement", band_low, band_high, change
    return "ok", band_low, band_high, change


# Non-finite medians are selected too (-inf would fail `> 0`), so that check() sees them.
SERIES_SQL = """
SELECT r.machine_fingerprint, m.family, m.op, m.method, m.label, m.config_key, m.threads,
       m.run_id, r.started, r.git_commit, r.git_dirty, m.median_us,
       coalesce(m.p20_us, m.median_us), coalesce(m.p80_us, m.median_us)
FROM measurements m JOIN runs r USING (run_id)
WHERE NOT coalesce(r.quick, false) AND coalesce(m.status, 'ok') = 'ok'
      AND (m.median_us > 0 OR NOT isfinite(m.median_us))
ORDER BY 1, 2, 3, 4, 5, 6, 7, r.started, m.run_id
"""


def series(db) -> dict[tuple, list[Point]]:
    """benchmark key -> its points, oldest first (one per run: a run measuring the same
    case twice keeps its last row)."""
    _, rows = db.query(SERIES_SQL)
    out: dict[tuple, list[Point]] = {}
    for fp, family, op, method, label, config, threads, run_id, started, commit, dirty, med, p20, p80 in rows:
        points = out.setdefault((fp, family, op, method, label, config, threads), [])
        point = Point(run_id, started, commit, dirty, med, p20, p80)
        if points and points[-1].run_id == run_id:
            points[-1] = point
        else:
            points.append(point)
    return out


def judge_newest(
    key: tuple, points: list[Point], window: int = 5, min_history: int = 2, threshold: float = 0.10
) -> Verdict:
    """The verdict on the newest of `points` (one benchmark, oldest first; key as in
    series()) against the `window` finite runs before it. A newest run with a non-finite
    time is "invalid"; history points with one are left out, each with a note."""
    fp, family, op, method, label, config, threads = key
    # the `window` newest finite runs before the newest; the non-finite ones met on the
    # way back are noted (older ones would not have counted anyway)
    new, notes, history = points[-1], [], []
    for p in reversed(points[:-1]):
        if len(history) == window:
            break
        bad = p.non_finite()
        if bad:
            notes.append(
                f"history run {p.run_id} (commit {(p.commit or '?')[:10]}) left out: "
                + ", ".join(f"{name} = {getattr(p, name)}" for name in bad)
            )
        else:
            history.append(p)
    history.reverse()
    notes.reverse()
    verdict = Verdict(fp, family, op, method, label, config, threads, "too little history", new, history, notes=notes)
    if new.non_finite():
        verdict.kind = "invalid"
    elif len(history) >= min_history:
        verdict.kind, verdict.band_low_us, verdict.band_high_us, verdict.change = judge(history, new, threshold)
    return verdict


def check(
    db, window: int = 5, min_history: int = 2, threshold: float = 0.10, machine: str | None = None
) -> list[Verdict]:
    """Judge the newest run of every benchmark (on `machine` only, when given); see judge_newest."""
    return [
        judge_newest(key, points, window, min_history, threshold)
        for key, points in series(db).items()
        if machine is None or key[0] == machine
    ]
