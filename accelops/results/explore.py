"""What `accelops results serve` shows, computed from the results database opened read-only:
machines, runs, measurements (filtered, paginated), accelops against its baselines, the
history of a benchmark with the regression rule applied at every run, single outlier
measurements (anomalies), the compatibility matrix and the tuned dispatch's prediction for a
shape. No web framework here: accelops/results/serve.py puts these behind HTTP.

Read-only for real: every query opens the file with DuckDB's read_only flag, and a database
of an older schema version is refused (ResultsDB would migrate it, which writes). Filters
are values bound to `?` parameters of fixed SQL: a filter's name picks a column from a
fixed table (FILTER_COLUMNS), its value never becomes SQL text.

Anomalies (single outlier measurements), beside the regression rule of regress.py, which
judges where a benchmark *stays*: a measurement is an outlier of its benchmark's series
(the same machine, family, op, method, label, case and thread count; non-quick runs) when
its median is far from its neighbours: the same number j of runs before and after it in
time, j = min(`k` (3), finite runs before, finite runs after), itself left out, at least
`min_neighbours` (4) of them. Robust z-score
z = 0.6745 (median - m) / MAD over the neighbours' medians (m their median, MAD their
median absolute deviation, floored at `floor` (5%) of m, so that neighbours that agree to
1% do not make a 5% wobble an outlier); |z| > `z_max` (3.5, Iglewicz and Hoaglin's cut)
flags it: with the floor, at least 26% away from m. A step (a regression or an improvement
that stays) is no outlier: the window is centred, so at least half of the neighbours sit on
the point's own level (m is that level, or midway to the other at the step itself, where
the MAD is half the step). The first two and the last two runs of a series are not judged:
with neighbours on one side only an outlier and a change of level look alike (the newest
run is the regression rule's, whose p20 condition already discounts a noisy run). Two
unusual runs within k of each other sway each other's judgement (an outlier next to a
step can make the step's last run look like one). Grouping by
commit alone (the repeats of one commit) was tried first: the repository's history has at
most 2 runs of a benchmark at one commit, too few for any spread.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import threading
from collections import defaultdict
from pathlib import Path

from . import db as _db
from .regress import Point, judge_newest
from .report import MACHINES_SQL, MATRIX_SQL, _isa, case_names, machine_names


class NotFound(LookupError):
    """A filter names something the database does not hold (an unknown machine, run, op)."""


class Unavailable(RuntimeError):
    """The database cannot be read now: missing, locked, of another schema version."""


# The filters a measurements/ratios/history query takes: name -> SQL column (of
# `measurements m JOIN runs r`). Only these names reach the SQL, as column names chosen here.
FILTER_COLUMNS = {
    "family": "m.family",
    "op": "m.op",
    "method": "m.method",
    "label": "m.label",
    "run_id": "m.run_id",
    "threads": "m.threads",
    "m": "m.m",
    "n": "m.n",
    "k": "m.k",
    "status": "m.status",
    "is_accelops": "m.is_accelops",
    "dtype": "m.dtype",
}
# A case's shape as one text: N x K where the rows have them (matmul, dispatch, layers),
# else the `shape` column (fake_quant).
SHAPE_SQL = "CASE WHEN m.n IS NOT NULL AND m.k IS NOT NULL THEN m.n::VARCHAR || 'x' || m.k::VARCHAR ELSE m.shape END"


def _finite(x):
    """JSON has no NaN or infinity: None in their place (the regression rule reports them)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _iso(t):
    return None if t is None else t.isoformat()


class ReadOnlyResults:
    """The results database at `path`, only ever opened read-only."""

    def __init__(self, path, lock_timeout: float = 5.0):
        self.path = Path(path)
        self.lock_timeout = lock_timeout
        self._cache: dict = {}
        self._lock = threading.Lock()

    def _connect(self):
        if not self.path.exists():
            raise Unavailable(
                f"results database {self.path} does not exist (run a benchmark or `accelops results import`)"
            )
        try:
            con = _db.connect(self.path, read_only=True, lock_timeout=self.lock_timeout)
        except (_db.DatabaseLocked, _db.SchemaError, FileNotFoundError) as exc:
            raise Unavailable(str(exc)) from exc
        try:
            version = _db.schema_version(con)
        except _db.SchemaError as exc:
            con.close()
            raise Unavailable(f"results database {self.path}: {exc}") from exc
        if version != _db.SCHEMA_VERSION:
            con.close()
            if version == 0:
                raise Unavailable(
                    f"results database {self.path} is empty (no accelops tables): run `accelops results import` "
                    f"or a benchmark first"
                )
            raise Unavailable(
                f"results database {self.path} has schema version {version}, this accelops reads "
                f"{_db.SCHEMA_VERSION}; the server never writes, so it does not migrate: run `accelops results "
                f"import` once (it migrates), or upgrade accelops"
            )
        return con

    def query(self, sql: str, params=None) -> tuple[list[str], list[tuple]]:
        import duckdb

        con = self._connect()
        try:
            cur = con.execute(sql, params or [])
            return [d[0] for d in cur.description], cur.fetchall()
        except duckdb.Error as exc:
            raise Unavailable(f"results database {self.path}: the query failed: {exc}") from exc
        finally:
            con.close()

    def query_many(self, statements) -> list[list[tuple]]:
        """Several (sql, params) over one connection (opening one costs more than a query)."""
        import duckdb

        con = self._connect()
        try:
            return [con.execute(sql, params or []).fetchall() for sql, params in statements]
        except duckdb.Error as exc:
            raise Unavailable(f"results database {self.path}: the query failed: {exc}") from exc
        finally:
            con.close()

    def cached(self, name: str, compute):
        """compute() once per version of the file (its inode, size and modification time,
        and its write-ahead log's): the series and verdicts are recomputed only after a
        bench wrote."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._connect()  # says it is missing, and what to do
            raise
        except OSError as exc:
            raise Unavailable(f"results database {self.path} cannot be read: {exc}") from exc
        try:  # a write DuckDB has not checkpointed into the file yet sits in its .wal
            wal = os.stat(str(self.path) + ".wal")
            wal_key = (wal.st_size, wal.st_mtime_ns)
        except OSError:
            wal_key = None
        key = (name, st.st_ino, st.st_size, st.st_mtime_ns, wal_key)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        value = compute()
        with self._lock:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = value
        return value


# --------------------------------------------------------------------------- machines and runs


def machines(db: ReadOnlyResults) -> list[dict]:
    """Every machine: fingerprint, a name that tells it from the others (CPU model, cores,
    ISA where needed), CPU model, cores, the ISA accelops' kernels use, instruction sets,
    GPU, and its runs."""

    def compute():
        _, rows = db.query(MACHINES_SQL)
        described = {}
        for fp, cpu, cores, isa, features, gpu, any_cpu, any_cores in rows:
            described[fp] = {
                "cpu_model": cpu or any_cpu,
                "cpu_count": cores or any_cores,
                "cpu_isa": isa,
                "cpu_features": list(features or []),
                "gpu_name": gpu,
            }
        names = machine_names(described)
        _, stats = db.query(
            "SELECT machine_fingerprint, count(*), min(started), max(started), count(DISTINCT git_commit), "
            "any_value(platform), max(memory_bytes) FROM runs GROUP BY 1"
        )
        by_fp = {r[0]: r[1:] for r in stats}
        out = []
        for fp, m in described.items():
            runs, first, last, commits, platform, memory = by_fp.get(fp, (0, None, None, 0, None, None))
            out.append(
                {
                    "fingerprint": fp,
                    "name": names[fp],
                    **m,
                    "cpu_isa": _isa(m),
                    "platform": platform,
                    "memory_bytes": memory,
                    "runs": runs,
                    "commits": commits,
                    "first_run": _iso(first),
                    "last_run": _iso(last),
                }
            )
        return out

    return db.cached("machines", compute)


def machine_index(db) -> dict[str, dict]:
    return {m["fingerprint"]: m for m in machines(db)}


def check_machines(db, fingerprints) -> None:
    known = machine_index(db)
    unknown = [fp for fp in fingerprints if fp not in known]
    if unknown:
        raise NotFound(
            f"unknown machine {', '.join(map(repr, unknown))}; the database holds "
            + (", ".join(f"{fp} ({m['name']})" for fp, m in known.items()) or "no machines (no runs yet)")
        )


def _where(filters: dict, machines_: list[str] | None = None, commits: list[str] | None = None, quick=False):
    clauses, params = [], []
    for name, value in filters.items():
        if value is None:
            continue
        clauses.append(f"{FILTER_COLUMNS[name]} = ?")
        params.append(value)
    if machines_:
        clauses.append(f"r.machine_fingerprint IN ({', '.join('?' for _ in machines_)})")
        params += machines_
    if commits:
        # a commit is given by a prefix of its hash, as people paste them
        clauses.append("(" + " OR ".join("starts_with(r.git_commit, ?)" for _ in commits) + ")")
        params += commits
    if quick is not None and not quick:
        clauses.append("NOT coalesce(r.quick, false)")
    return (" AND ".join(clauses) or "true"), params


def runs(db, machines_=None, family=None, commits=None, limit=100, offset=0) -> dict:
    check_machines(db, machines_ or [])
    where, params = _where({}, machines_, commits, quick=None)
    if family is not None:
        where += " AND run_id IN (SELECT run_id FROM measurements WHERE family = ?)"
        params.append(family)
    sql = f"""
        SELECT r.run_id, r.started, r.git_commit, r.git_dirty, r.machine_fingerprint, r.quick,
               r.accelops_version, r.torch_version, r.device,
               (SELECT list(DISTINCT family ORDER BY family) FROM measurements x WHERE x.run_id = r.run_id),
               (SELECT count(*) FROM measurements x WHERE x.run_id = r.run_id),
               count(*) OVER ()
        FROM runs r WHERE {where}
        ORDER BY r.started DESC, r.run_id LIMIT ? OFFSET ?"""
    _, rows = db.query(sql, params + [limit, offset])
    names = {fp: m["name"] for fp, m in machine_index(db).items()}
    items = [
        {
            "run_id": r[0],
            "started": _iso(r[1]),
            "commit": r[2],
            "dirty": r[3],
            "machine": r[4],
            "machine_name": names.get(r[4]),
            "quick": r[5],
            "accelops_version": r[6],
            "torch_version": r[7],
            "device": r[8],
            "families": list(r[9] or []),
            "measurements": r[10],
        }
        for r in rows
    ]
    total = rows[0][11] if rows else _count(db, f"SELECT count(*) FROM runs r WHERE {where}", params)
    return _page(items, total, limit, offset)


def _count(db, sql, params) -> int:
    return db.query(sql, params)[1][0][0]


def _page(items, total, limit, offset) -> dict:
    nxt = offset + len(items)
    return {
        "total": total,
        "limit": limit,
        "offset": offset,
        "next_offset": nxt if nxt < total else None,
        "items": items,
    }


MEASUREMENT_FIELDS = (
    "run_id",
    "started",
    "commit",
    "machine",
    "family",
    "seq",
    "op",
    "method",
    "label",
    "backend",
    "is_accelops",
    "status",
    "threads",
    "dtype",
    "m",
    "n",
    "k",
    "shape",
    "config",
    "median_us",
    "p20_us",
    "p80_us",
    "min_us",
    "repeats",
    "baseline_label",
    "ratio",
    "loadavg_1m",
)


def measurements(db, filters: dict, machines_=None, commits=None, shape=None, quick=False, limit=100, offset=0):
    check_machines(db, machines_ or [])
    where, params = _where(filters, machines_, commits, quick)
    if shape is not None:
        where += f" AND {SHAPE_SQL} = ?"
        params.append(shape)
    sql = f"""
        SELECT m.run_id, r.started, r.git_commit, r.machine_fingerprint, m.family, m.seq, m.op, m.method, m.label,
               m.backend, m.is_accelops, m.status, m.threads, m.dtype, m.m, m.n, m.k, {SHAPE_SQL}, m.config,
               m.median_us, m.p20_us, m.p80_us, m.min_us, m.repeats, m.baseline_label, m.ratio, m.loadavg_1m,
               count(*) OVER ()
        FROM measurements m JOIN runs r USING (run_id) WHERE {where}
        ORDER BY r.started DESC, m.run_id, m.family, m.seq LIMIT ? OFFSET ?"""
    _, rows = db.query(sql, params + [limit, offset])
    items = []
    for r in rows:
        item = dict(zip(MEASUREMENT_FIELDS, r))
        item["started"] = _iso(item["started"])
        item["config"] = _json_obj(item["config"])
        for f in ("median_us", "p20_us", "p80_us", "min_us", "ratio", "loadavg_1m"):
            item[f] = _finite(item[f])
        items.append(item)
    if rows:
        total = rows[0][-1]
    else:
        total = _count(db, f"SELECT count(*) FROM measurements m JOIN runs r USING (run_id) WHERE {where}", params)
    return _page(items, total, limit, offset)


def _json_obj(text) -> dict:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {"config": text}
    return value if isinstance(value, dict) else {"config": value}


# --------------------------------------------------------------------------- selectors


def options(db, family=None, op=None) -> dict:
    """The values each selector of the page can take (narrowed by family and op)."""
    where, params = ("true", [])
    if family is not None:
        where, params = "m.family = ?", [family]
    op_where, op_params = where, list(params)
    if op is not None:
        where += " AND m.op = ?"
        params.append(op)
    q = f"FROM measurements m JOIN runs r USING (run_id) WHERE {where}"
    fams, ops, shapes, ms, threads, baselines, variants, commits, mach = db.query_many(
        [
            ("SELECT DISTINCT family FROM measurements ORDER BY 1", None),
            (f"SELECT DISTINCT m.op FROM measurements m WHERE {op_where} AND m.op IS NOT NULL ORDER BY 1", op_params),
            (f"SELECT DISTINCT {SHAPE_SQL} AS s {q} AND s IS NOT NULL ORDER BY 1", params),
            (f"SELECT DISTINCT m.m {q} AND m.m IS NOT NULL ORDER BY 1", params),
            (f"SELECT DISTINCT m.threads {q} AND m.threads IS NOT NULL ORDER BY 1", params),
            (
                f"SELECT coalesce(m.label, m.method), m.method, count(*) {q} AND NOT coalesce(m.is_accelops, false) "
                "AND m.median_us > 0 GROUP BY 1, 2 ORDER BY 1",
                params,
            ),
            (
                f"SELECT DISTINCT coalesce(m.label, m.method) {q} AND m.is_accelops AND m.median_us > 0 ORDER BY 1",
                params,
            ),
            (
                "SELECT r.git_commit, min(r.started), list(DISTINCT r.machine_fingerprint ORDER BY "
                f"r.machine_fingerprint), bool_or(r.git_dirty) {q} AND r.git_commit IS NOT NULL GROUP BY 1 ORDER BY 2",
                params,
            ),
            (f"SELECT DISTINCT r.machine_fingerprint {q} ORDER BY 1", params),
        ]
    )
    return {
        "families": [f for (f,) in fams],
        "ops": [o for (o,) in ops],
        "shapes": [s for (s,) in shapes],
        "m": [v for (v,) in ms],
        "threads": [v for (v,) in threads],
        "baselines": _baselines(baselines),
        "variants": [v for (v,) in variants],
        "machines": [fp for (fp,) in mach],
        "commits": [
            {"commit": c, "first_run": _iso(t), "machines": list(fps), "dirty": bool(d)} for c, t, fps, d in commits
        ],
    }


def _baselines(rows) -> list[dict]:
    """One choice per baseline label; its value is the method where the label names one
    method (short in a URL), else the label (comm's "pure-PyTorch reference" of each op):
    the ratios' `baseline` filter takes either."""
    methods, counts = defaultdict(list), defaultdict(int)
    for label, method, n in rows:
        methods[label].append(method)
        counts[label] += n
    return [
        {"label": label, "value": ms[0] if len(ms) == 1 and ms[0] else label, "methods": ms, "rows": counts[label]}
        for label, ms in methods.items()
    ]


# --------------------------------------------------------------------------- ratios


def ratios(
    db, filters: dict, machines_=None, commits=None, shape=None, baseline=None, latest=True, limit=500, offset=0
):
    """Each accelops measurement against each baseline of the same run, case and thread
    count: speed-up = baseline median / accelops median (> 1: accelops faster), with the
    spread low = baseline p20 / accelops p80, high = baseline p80 / accelops p20 (as
    `accelops report`). latest: only each machine's newest run of the family among those
    selected."""
    check_machines(db, machines_ or [])
    where, params = _where(filters, machines_, commits, quick=False)
    if shape is not None:
        where += f" AND {SHAPE_SQL} = ?"
        params.append(shape)
    base_clause, bparams = "", []
    if baseline is not None:
        base_clause, bparams = "AND (b.method = ? OR b.label = ?)", [baseline, baseline]
    sql = f"""
        WITH a AS (SELECT m.*, r.started, r.git_commit, r.machine_fingerprint, {SHAPE_SQL} AS shape_text
                   FROM measurements m JOIN runs r USING (run_id) WHERE {where} AND m.is_accelops AND m.median_us > 0
                   AND coalesce(m.status, 'ok') = 'ok')
        SELECT a.machine_fingerprint, a.family, a.run_id, a.git_commit, a.started, a.op, a.method,
               coalesce(a.label, a.method), a.config_key, a.threads, a.m, a.shape_text, a.median_us,
               b.method, coalesce(b.label, b.method), b.median_us,
               b.median_us / a.median_us,
               coalesce(b.p20_us, b.median_us) / coalesce(a.p80_us, a.median_us),
               coalesce(b.p80_us, b.median_us) / coalesce(a.p20_us, a.median_us)
        FROM a JOIN measurements b ON b.run_id = a.run_id AND b.family = a.family AND b.config_key = a.config_key
             AND (b.op IS NOT DISTINCT FROM a.op OR a.op = a.method OR b.op = b.method)
             AND b.threads IS NOT DISTINCT FROM a.threads AND NOT coalesce(b.is_accelops, false)
             AND b.median_us > 0 AND coalesce(b.status, 'ok') = 'ok' {base_clause}
        ORDER BY a.machine_fingerprint, a.family, a.started DESC, a.seq, b.seq"""
    _, rows = db.query(sql, params + bparams)
    if latest:
        # each machine's newest run of each family among the runs selected
        newest = {}
        for r in rows:
            if r[4] is not None and ((r[0], r[1]) not in newest or r[4] > newest[(r[0], r[1])][0]):
                newest[(r[0], r[1])] = (r[4], r[2])
        rows = [r for r in rows if newest.get((r[0], r[1]), (None, r[2]))[1] == r[2]]
    total = len(rows)
    items = []
    for r in rows[offset : offset + limit]:
        items.append(
            {
                "machine": r[0],
                "family": r[1],
                "run_id": r[2],
                "commit": r[3],
                "started": _iso(r[4]),
                "op": r[5],
                "method": r[6],
                "label": r[7],
                "config": _json_obj(r[8]),
                "threads": r[9],
                "m": r[10],
                "shape": r[11],
                "median_us": _finite(r[12]),
                "baseline_method": r[13],
                "baseline": r[14],
                "baseline_median_us": _finite(r[15]),
                "speedup": _finite(r[16]),
                "speedup_low": _finite(r[17]),
                "speedup_high": _finite(r[18]),
            }
        )
    _label_cases(items)
    return _page(items, total, limit, offset)


def _label_cases(items: list[dict]) -> None:
    """A short name per case: the fields that differ between the cases listed (report's rule)."""
    by_family = defaultdict(list)
    for it in items:
        by_family[it["family"]].append(it)
    for family, group in by_family.items():
        cases = list(
            dict.fromkeys(
                (
                    it["op"] if it["op"] and it["op"] != it["method"] else None,
                    json.dumps(it["config"], sort_keys=True),
                    it["threads"],
                )
                for it in group
            )
        )
        # one case: nothing to tell apart (the selection names it)
        labels = case_names(cases, family)[0] if len(cases) > 1 else [""]
        index = {c: label.replace("\n", " ") for c, label in zip(cases, labels)}
        for it in group:
            key = (
                it["op"] if it["op"] and it["op"] != it["method"] else None,
                json.dumps(it["config"], sort_keys=True),
                it["threads"],
            )
            it["case"] = index[key]


# --------------------------------------------------------------------------- history, regressions, anomalies


def _series(db) -> dict[tuple, list[Point]]:
    from .regress import series

    return db.cached("series", lambda: series(db))


def robust_outliers(values: list[float], k: int = 3, min_neighbours: int = 4, floor: float = 0.05, z_max: float = 3.5):
    """-> per value (oldest first) None, or (z, neighbours' median) when it is an outlier
    of its neighbours (the module's rule). Non-finite values are neither judged nor used."""
    out = []
    for i, x in enumerate(values):
        if not math.isfinite(x):
            out.append(None)
            continue
        # as many neighbours on each side: a step then puts at least half of them on the
        # point's own level, so a level change never reads as an outlier
        before = [v for v in values[:i] if math.isfinite(v)]
        after = [v for v in values[i + 1 :] if math.isfinite(v)]
        j = min(k, len(before), len(after))
        nb = before[len(before) - j :] + after[:j]
        if len(nb) < min_neighbours:
            out.append(None)
            continue
        centre = statistics.median(nb)
        mad = statistics.median(abs(v - centre) for v in nb)
        scale = max(mad, floor * abs(centre))
        if scale <= 0:
            out.append(None)
            continue
        z = 0.6745 * (x - centre) / scale
        out.append((z, centre) if abs(z) > z_max else None)
    return out


def _key_matches(key, family, op, machines_, threads, configs) -> bool:
    fp, fam, kop, method, label, config, kthreads = key
    if family is not None and fam != family:
        return False
    if op is not None and kop != op:
        return False
    if machines_ and fp not in machines_:
        return False
    if threads is not None and kthreads != threads:
        return False
    return configs is None or (fam, config) in configs


def _configs(db, family, shape, m) -> set | None:
    """The (family, config_key) of the cases of this shape and M (None: no such filter)."""
    if shape is None and m is None:
        return None
    clauses, params = [], []
    if family is not None:
        clauses.append("m.family = ?")
        params.append(family)
    if shape is not None:
        clauses.append(f"{SHAPE_SQL} = ?")
        params.append(shape)
    if m is not None:
        clauses.append("m.m = ?")
        params.append(m)
    _, rows = db.query(
        f"SELECT DISTINCT m.family, m.config_key FROM measurements m WHERE {' AND '.join(clauses)}", params
    )
    return set(rows)


def history(
    db,
    family=None,
    op=None,
    machines_=None,
    threads=None,
    shape=None,
    m=None,
    commits=None,
    accelops_only=True,
    window=5,
    threshold=0.10,
    max_series=200,
) -> dict:
    """Per benchmark (machine, family, op, method, label, case, threads) its runs oldest
    first, each judged by the regression rule against the runs before it (regress.judge_newest)
    and by the outlier rule against its neighbours."""
    check_machines(db, machines_ or [])
    configs = _configs(db, family, shape, m)
    accel = None
    if accelops_only:
        _, rows = db.query("SELECT DISTINCT family, coalesce(label, method) FROM measurements WHERE is_accelops")
        accel = set(rows)
    names = {fp: mm["name"] for fp, mm in machine_index(db).items()}
    out, truncated = [], False
    for key, points in _series(db).items():
        if not _key_matches(key, family, op, machines_, threads, configs):
            continue
        fp, fam, kop, method, label, config, kthreads = key
        if accel is not None and (fam, label or method) not in accel:
            continue
        if len(out) == max_series:
            truncated = True
            break
        outliers = robust_outliers([p.median_us for p in points])
        pts = []
        for i, p in enumerate(points):
            if commits and not any((p.commit or "").startswith(c) for c in commits):
                continue
            v = judge_newest(key, points[: i + 1], window, 2, threshold)
            pts.append(
                {
                    "run_id": p.run_id,
                    "started": _iso(p.started),
                    "commit": p.commit,
                    "dirty": p.dirty,
                    "median_us": _finite(p.median_us),
                    "p20_us": _finite(p.p20_us),
                    "p80_us": _finite(p.p80_us),
                    "verdict": v.kind,
                    "change": _finite(v.change),
                    "anomaly_z": None if outliers[i] is None else outliers[i][0],
                }
            )
        if pts:
            out.append(
                {
                    "machine": fp,
                    "machine_name": names.get(fp),
                    "family": fam,
                    "op": kop,
                    "method": method,
                    "label": label or method,
                    "config": _json_obj(config),
                    "threads": kthreads,
                    "points": pts,
                }
            )
    cases = list(
        dict.fromkeys(
            (
                s["op"] if s["op"] and s["op"] != s["method"] else None,
                json.dumps(s["config"], sort_keys=True),
                s["threads"],
            )
            for s in out
        )
    )
    labels = case_names(cases, family)[0] if len(cases) > 1 else [""] * len(cases)
    index = {c: label.replace("\n", " ") for c, label in zip(cases, labels)}
    for s in out:
        s["case"] = index[
            (
                s["op"] if s["op"] and s["op"] != s["method"] else None,
                json.dumps(s["config"], sort_keys=True),
                s["threads"],
            )
        ]
    return {"window": window, "threshold": threshold, "truncated": truncated, "series": out}


def regressions(db, machines_=None, family=None, kinds=None, window=5, threshold=0.10) -> list[dict]:
    """The regression check (regress.check's verdicts on each benchmark's newest run)."""
    check_machines(db, machines_ or [])
    names = {fp: mm["name"] for fp, mm in machine_index(db).items()}
    out = []
    for key, points in _series(db).items():
        if machines_ and key[0] not in machines_:
            continue
        if family is not None and key[1] != family:
            continue
        v = judge_newest(key, points, window, 2, threshold)
        if kinds and v.kind not in kinds:
            continue
        good = v.history[-1].commit if v.history else None
        out.append(
            {
                "kind": v.kind,
                "machine": v.machine,
                "machine_name": names.get(v.machine),
                "family": v.family,
                "op": v.op,
                "method": v.method,
                "label": v.label or v.method,
                "config": _json_obj(v.config),
                "threads": v.threads,
                "case": v.case,
                "run_id": v.new.run_id,
                "commit": v.new.commit,
                "last_good_commit": good,
                "median_us": _finite(v.new.median_us),
                "band_low_us": _finite(v.band_low_us),
                "band_high_us": _finite(v.band_high_us),
                "change": _finite(v.change),
                "history_runs": len(v.history),
                "description": v.describe(),
                "notes": list(v.notes),
            }
        )
    return out


def anomalies(db, machines_=None, family=None, k=3, z_max=3.5, floor=0.05) -> list[dict]:
    """Single outlier measurements by the module's rule, the strongest first."""
    check_machines(db, machines_ or [])
    names = {fp: mm["name"] for fp, mm in machine_index(db).items()}
    out = []
    for key, points in _series(db).items():
        fp, fam, op, method, label, config, threads = key
        if machines_ and fp not in machines_:
            continue
        if family is not None and fam != family:
            continue
        for p, flag in zip(points, robust_outliers([p.median_us for p in points], k, 4, floor, z_max)):
            if flag is None:
                continue
            z, centre = flag
            out.append(
                {
                    "machine": fp,
                    "machine_name": names.get(fp),
                    "family": fam,
                    "op": op,
                    "method": method,
                    "label": label or method,
                    "config": _json_obj(config),
                    "threads": threads,
                    "run_id": p.run_id,
                    "started": _iso(p.started),
                    "commit": p.commit,
                    "median_us": p.median_us,
                    "neighbours_median_us": centre,
                    "z": z,
                    "ratio_to_neighbours": p.median_us / centre if centre else None,
                }
            )
    out.sort(key=lambda a: -abs(a["z"]))
    return out


# --------------------------------------------------------------------------- matrix


def matrix(db, family=None, machines_=None) -> list[dict]:
    check_machines(db, machines_ or [])
    names = {fp: mm["name"] for fp, mm in machine_index(db).items()}
    _, rows = db.query(MATRIX_SQL)
    out = []
    for fam, op, backend, fp, cpu, status, median, reason, started in rows:
        if family is not None and fam != family:
            continue
        if machines_ and fp not in machines_:
            continue
        out.append(
            {
                "family": fam,
                "op": op,
                "backend": backend,
                "machine": fp,
                "machine_name": names.get(fp),
                "works": status in (None, "ok"),
                "status": status or "ok",
                "median_us": _finite(median),
                "reason": reason,
                "last_run": _iso(started),
            }
        )
    return out


# --------------------------------------------------------------------------- tuned dispatch prediction

TUNED_DIMS = ("M", "N", "K")


def dispatch_entries(db, machine: str) -> tuple[dict | None, list[dict]]:
    """The table entries of the newest dispatch run on `machine`, rebuilt from its rows
    (bench_dispatch stores each shape's winner and every candidate's times) -> (run, entries)."""
    _, rows = db.query(
        """SELECT m.run_id, r.started, r.git_commit, m.op, m.m, m.n, m.k, m.extra
           FROM measurements m JOIN runs r USING (run_id)
           WHERE m.family = 'dispatch' AND r.machine_fingerprint = ? AND NOT coalesce(r.quick, false)
             AND m.method = 'tuned' AND m.m IS NOT NULL
             AND r.started = (SELECT max(r2.started) FROM measurements m2 JOIN runs r2 USING (run_id)
                              WHERE m2.family = 'dispatch' AND r2.machine_fingerprint = ? AND m2.method = 'tuned'
                              AND NOT coalesce(r2.quick, false))
           ORDER BY m.seq""",
        [machine, machine],
    )
    entries = []
    for run_id, started, commit, op, mm, n, k, extra in rows:
        data = _json_obj(extra)
        if not isinstance(data.get("winner"), dict) or not isinstance(data.get("candidates"), list):
            continue
        entries.append(
            {"op": op, "shape": {"M": mm, "N": n, "K": k}, "winner": data["winner"], "candidates": data["candidates"]}
        )
    run = None if not rows else {"run_id": rows[0][0], "started": _iso(rows[0][1]), "commit": rows[0][2]}
    return run, entries


def predict(db, machine: str | None, op: str, m: int, n: int, k: int) -> dict:
    """The tuned dispatch's choice for (op, M, N, K) on `machine` (default: the machine with
    the newest dispatch run) from the table its newest dispatch run measured: the measured
    winner for a measured shape, else the nearest measured shape's (log2 space,
    accelops.ops._tuning.DispatchTable.predict), with the model's leave-one-out error over
    that table (accelops.tune.explain) as its error estimate."""
    if machine is None:
        _, rows = db.query(
            "SELECT r.machine_fingerprint FROM measurements m JOIN runs r USING (run_id) "
            "WHERE m.family = 'dispatch' AND m.method = 'tuned' ORDER BY r.started DESC LIMIT 1"
        )
        if not rows:
            raise NotFound("no dispatch runs in the database (bench/bench_dispatch.py measures the tuned dispatch)")
        machine = rows[0][0]
    check_machines(db, [machine])
    run, entries = db.cached(f"dispatch:{machine}", lambda: dispatch_entries(db, machine))
    mine = [e for e in entries if e["op"] == op]
    if not mine:
        ops = sorted({e["op"] for e in entries})
        raise NotFound(
            f"no tuned dispatch entries for op {op!r} on machine {machine}"
            + (f" (it has {', '.join(ops)})" if ops else " (no dispatch run there)")
        )
    # torch (through accelops.ops) is imported here, on the first prediction, not at start
    from ..ops._tuning import DispatchTable
    from ..tune import explain

    table = DispatchTable.from_json({"entries": mine}, machine)
    choice = table.predict(op, (m, n, k))

    def error():
        try:
            return explain(mine).get(op)
        except StopIteration:  # a neighbour's choice that this shape never measured
            return None

    estimate = db.cached(f"explain:{machine}:{op}", error)
    measured = None
    if not choice.predicted:
        entry = next(e for e in mine if (e["shape"]["M"], e["shape"]["N"], e["shape"]["K"]) == (m, n, k))
        win = entry["winner"]
        for c in entry["candidates"]:
            if all(c.get(f) == win.get(f) for f in ("backend", "threads", "tiles", "config")):
                measured = {
                    "median_us": _finite(c.get("median_us")),
                    "p20_us": _finite(c.get("p20_us")),
                    "p80_us": _finite(c.get("p80_us")),
                }
    return {
        "machine": machine,
        "run": run,
        "op": op,
        "shape": {"M": m, "N": n, "K": k},
        "backend": choice.backend,
        "threads": choice.threads,
        "tiles": None if choice.tiles is None else {"n_block": choice.tiles[0], "k_chunk": choice.tiles[1]},
        "config": None if choice.config is None else dict(choice.config[1]),
        "predicted": choice.predicted,
        "source_shape": dict(zip(TUNED_DIMS, choice.source)) if choice.source else None,
        "measured_shapes": len(mine),
        "measured": measured,
        "error_estimate": None
        if estimate is None
        else {
            "model": estimate["model"],
            "shapes": estimate["shapes"],
            "loo_winner_agreement": _finite(estimate["loo_winner_agreement"]),
            "loo_mean_slowdown": _finite(estimate["loo_mean_slowdown"]),
            "loo_worst_slowdown": _finite(estimate["loo_worst_slowdown"]),
        },
    }
