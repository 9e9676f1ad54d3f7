"""`accelops results serve`: the results database as a local web page and REST API.

FastAPI app over accelops.results.explore (which opens the database read-only for each
request): the page at `/` (static/dashboard.html, charts by the plotly.js that the
`plotly` Python package ships, served from here: it works offline), the API under `/api`
with its OpenAPI schema at `/openapi.json` and browsable at `/docs`.

Errors are JSON, never a traceback: {"error": message, "status": code}; 404 for a filter
naming what the database does not hold (an unknown machine), 422 for a malformed
parameter (FastAPI's validation: `detail` lists each, `error` says it in a line), 503 when
the database cannot be read now (missing, locked by a writer past the lock timeout, empty,
another schema version), 500 for a bug (its type and message only).

fastapi, uvicorn and plotly are optional: `import accelops` never imports this module.
"""

import math
import socket
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar

from fastapi import FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, Field, StringConstraints

from . import explore
from .db import SCHEMA_VERSION

T = TypeVar("T")
STATIC = Path(__file__).resolve().parent / "static"
MAX_PAGE = 1000  # rows a page of measurements or ratios holds at most

# Parameter types: every value is bound to a `?` of fixed SQL (explore.FILTER_COLUMNS); the
# patterns keep out what no database value looks like, so a typo gets a 422 naming it.
Text = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
Fingerprint = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
CommitPrefix = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{4,40}$")]
Shape = Annotated[str, StringConstraints(max_length=100, pattern=r"^[0-9]+(x[0-9]+)*$")]
Dim = Annotated[int, Query(ge=1, le=1 << 40)]


class ErrorBody(BaseModel):
    error: str
    status: int


class Page(BaseModel, Generic[T]):
    total: int
    limit: int
    offset: int
    next_offset: int | None
    items: list[T]


class RunItem(BaseModel):
    run_id: str
    started: str | None
    commit: str | None
    dirty: bool | None
    machine: str | None
    machine_name: str | None
    quick: bool | None
    accelops_version: str | None
    torch_version: str | None
    device: str | None
    families: list[str]
    measurements: int


class MeasurementItem(BaseModel):
    run_id: str
    started: str | None
    commit: str | None
    machine: str | None
    family: str
    seq: int
    op: str | None
    method: str | None
    label: str | None
    backend: str | None
    is_accelops: bool | None
    status: str | None
    threads: int | None
    dtype: str | None
    m: int | None
    n: int | None
    k: int | None
    shape: str | None
    config: dict[str, Any]
    median_us: float | None
    p20_us: float | None
    p80_us: float | None
    min_us: float | None
    repeats: int | None
    baseline_label: str | None
    ratio: float | None
    loadavg_1m: float | None


class RatioItem(BaseModel):
    machine: str
    family: str
    run_id: str
    commit: str | None
    started: str | None
    op: str | None
    method: str | None
    label: str | None
    config: dict[str, Any]
    threads: int | None
    m: int | None
    shape: str | None
    case: str
    median_us: float | None
    baseline_method: str | None
    baseline: str | None
    baseline_median_us: float | None
    speedup: float | None = Field(description="baseline median / accelops median (> 1: accelops faster)")
    speedup_low: float | None = Field(description="baseline p20 / accelops p80")
    speedup_high: float | None = Field(description="baseline p80 / accelops p20")


class Machine(BaseModel):
    fingerprint: str
    name: str
    cpu_model: str | None
    cpu_count: int | None
    cpu_isa: str | None
    cpu_features: list[str]
    gpu_name: str | None
    platform: str | None
    memory_bytes: int | None
    runs: int
    commits: int
    first_run: str | None
    last_run: str | None


class Info(BaseModel):
    database: str
    schema_version: int
    runs: int
    measurements: int
    machines: int
    families: list[str]


class Commit(BaseModel):
    commit: str
    first_run: str | None
    machines: list[str]
    dirty: bool


class Baseline(BaseModel):
    label: str = Field(description="the baseline's label (its method where it has none)")
    value: str = Field(description="what the `baseline` filter takes for it: its method, or the label")
    methods: list[str | None]
    rows: int = Field(description="its measurements in the selection")


class Options(BaseModel):
    families: list[str]
    ops: list[str]
    shapes: list[str]
    m: list[int]
    threads: list[int]
    baselines: list[Baseline]
    variants: list[str]
    machines: list[str]
    commits: list[Commit]


class HistoryPoint(BaseModel):
    run_id: str
    started: str | None
    commit: str | None
    dirty: bool | None
    median_us: float | None
    p20_us: float | None
    p80_us: float | None
    verdict: str
    change: float | None
    anomaly_z: float | None


class Series(BaseModel):
    machine: str
    machine_name: str | None
    family: str
    op: str | None
    method: str | None
    label: str | None
    config: dict[str, Any]
    threads: int | None
    case: str
    points: list[HistoryPoint]


class History(BaseModel):
    window: int
    threshold: float
    truncated: bool
    series: list[Series]


class Verdict(BaseModel):
    kind: str
    machine: str
    machine_name: str | None
    family: str
    op: str | None
    method: str | None
    label: str | None
    config: dict[str, Any]
    threads: int | None
    case: str
    run_id: str
    commit: str | None
    last_good_commit: str | None
    median_us: float | None
    band_low_us: float | None
    band_high_us: float | None
    change: float | None
    history_runs: int
    description: str
    notes: list[str]


class Anomaly(BaseModel):
    machine: str
    machine_name: str | None
    family: str
    op: str | None
    method: str | None
    label: str | None
    config: dict[str, Any]
    threads: int | None
    run_id: str
    started: str | None
    commit: str | None
    median_us: float
    neighbours_median_us: float
    z: float
    ratio_to_neighbours: float | None


class MatrixCell(BaseModel):
    family: str
    op: str | None
    backend: str
    machine: str
    machine_name: str | None
    works: bool
    status: str
    median_us: float | None
    reason: str | None
    last_run: str | None


class ErrorEstimate(BaseModel):
    model: str
    shapes: int
    loo_winner_agreement: float | None
    loo_mean_slowdown: float | None
    loo_worst_slowdown: float | None


class Prediction(BaseModel):
    machine: str
    run: dict[str, Any] | None
    op: str
    shape: dict[str, int]
    backend: str
    threads: int | None
    tiles: dict[str, int] | None
    config: dict[str, int] | None
    predicted: bool
    source_shape: dict[str, int] | None
    measured_shapes: int
    measured: dict[str, float | None] | None
    error_estimate: ErrorEstimate | None


ERRORS = {
    404: {"model": ErrorBody, "description": "a filter names something the database does not hold"},
    503: {"model": ErrorBody, "description": "the database cannot be read now (missing, locked, empty, old schema)"},
}


def _error(status: int, message: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def _validation_message(errors) -> str:
    parts = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("query", "path", "body")]
        parts.append(f"{'.'.join(loc) or 'request'}: {e.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def create_app(db_path, lock_timeout: float = 5.0) -> FastAPI:
    """The app over the database at db_path (opened read-only for each request; a writer
    holding it longer than lock_timeout seconds gives a 503)."""
    db = explore.ReadOnlyResults(db_path, lock_timeout=lock_timeout)
    app = FastAPI(
        title="accelops results",
        version=str(SCHEMA_VERSION),
        description="Benchmark results of accelops (read-only): runs, machines, measurements, accelops vs "
        "baselines, regressions, anomalies, compatibility and the tuned dispatch's predictions.",
    )
    app.state.db = db

    @app.exception_handler(explore.NotFound)
    async def not_found(request: Request, exc: explore.NotFound):
        return _error(404, str(exc))

    @app.exception_handler(explore.Unavailable)
    async def unavailable(request: Request, exc: explore.Unavailable):
        locked = "held by" in str(exc)
        return _error(503, str(exc), headers={"Retry-After": "5"} if locked else None)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = jsonable_encoder(exc.errors(), custom_encoder={float: lambda x: x if math.isfinite(x) else None})
        for e in errors:
            e.pop("url", None)
        return JSONResponse({"error": _validation_message(errors), "status": 422, "detail": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        return _error(500, f"internal error in accelops results serve: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ the page

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse((STATIC / "dashboard.html").read_text())

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        from fastapi.responses import Response

        return Response(status_code=204)

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str):
        if name == "plotly.min.js":
            return FileResponse(plotly_js(), media_type="text/javascript")
        files = {p.name: p for p in STATIC.iterdir() if p.suffix in (".js", ".css", ".html")}
        if name not in files:
            return _error(404, f"no static file {name!r}")
        return FileResponse(files[name])

    # ------------------------------------------------------------------ the API

    @app.get("/api/info", response_model=Info, responses=ERRORS, summary="The database: counts and families")
    def info():
        _, rows = db.query(
            "SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM measurements), "
            "(SELECT count(DISTINCT machine_fingerprint) FROM runs)"
        )
        _, fams = db.query("SELECT DISTINCT family FROM measurements ORDER BY 1")
        runs, meas, machines = rows[0]
        return {
            "database": str(db.path),
            "schema_version": SCHEMA_VERSION,
            "runs": runs,
            "measurements": meas,
            "machines": machines,
            "families": [f for (f,) in fams],
        }

    @app.get("/api/machines", response_model=list[Machine], responses=ERRORS, summary="Machines by CPU and ISA")
    def machines():
        return explore.machines(db)

    @app.get(
        "/api/runs", response_model=Page[RunItem], responses=ERRORS, summary="Bench runs, newest first (paginated)"
    )
    def runs(
        machine: Annotated[list[Fingerprint] | None, Query()] = None,
        family: Text | None = None,
        commit: Annotated[list[CommitPrefix] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        offset: Annotated[int, Query(ge=0, le=1 << 40)] = 0,
    ):
        return explore.runs(db, machine, family, commit, limit, offset)

    @app.get(
        "/api/measurements",
        response_model=Page[MeasurementItem],
        responses=ERRORS,
        summary="Measurements, filtered and paginated (newest run first)",
    )
    def measurements(
        family: Text | None = None,
        op: Text | None = None,
        method: Text | None = None,
        label: Text | None = None,
        run_id: Text | None = None,
        machine: Annotated[list[Fingerprint] | None, Query()] = None,
        commit: Annotated[list[CommitPrefix] | None, Query()] = None,
        shape: Shape | None = None,
        m: Dim | None = None,
        n: Dim | None = None,
        k: Dim | None = None,
        threads: Annotated[int | None, Query(ge=1, le=65536)] = None,
        is_accelops: bool | None = None,
        status: Text | None = None,
        quick: Annotated[bool, Query(description="include --quick runs")] = False,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
        offset: Annotated[int, Query(ge=0, le=1 << 40)] = 0,
    ):
        filters = dict(
            family=family,
            op=op,
            method=method,
            label=label,
            run_id=run_id,
            m=m,
            n=n,
            k=k,
            threads=threads,
            is_accelops=is_accelops,
            status=status,
        )
        return explore.measurements(db, filters, machine, commit, shape, quick, limit, offset)

    @app.get("/api/options", response_model=Options, responses=ERRORS, summary="Values of the page's selectors")
    def options(family: Text | None = None, op: Text | None = None):
        return explore.options(db, family, op)

    @app.get(
        "/api/ratios",
        response_model=Page[RatioItem],
        responses=ERRORS,
        summary="accelops vs each baseline: speed-up with its p20-p80 spread",
        description="speedup = baseline median / accelops median (> 1: accelops faster), speedup_low = "
        "baseline p20 / accelops p80, speedup_high = baseline p80 / accelops p20; latest=true keeps each "
        "machine's newest run of the family among those selected.",
    )
    def ratios(
        family: Text | None = None,
        op: Text | None = None,
        method: Text | None = None,
        machine: Annotated[list[Fingerprint] | None, Query()] = None,
        commit: Annotated[list[CommitPrefix] | None, Query()] = None,
        shape: Shape | None = None,
        m: Dim | None = None,
        threads: Annotated[int | None, Query(ge=1, le=65536)] = None,
        baseline: Text | None = None,
        latest: bool = True,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 500,
        offset: Annotated[int, Query(ge=0, le=1 << 40)] = 0,
    ):
        filters = dict(family=family, op=op, method=method, m=m, threads=threads)
        return explore.ratios(db, filters, machine, commit, shape, baseline, latest, limit, offset)

    @app.get(
        "/api/history",
        response_model=History,
        responses=ERRORS,
        summary="A benchmark's runs, each judged by the regression rule and the outlier rule",
    )
    def history(
        family: Text | None = None,
        op: Text | None = None,
        machine: Annotated[list[Fingerprint] | None, Query()] = None,
        commit: Annotated[list[CommitPrefix] | None, Query()] = None,
        shape: Shape | None = None,
        m: Dim | None = None,
        threads: Annotated[int | None, Query(ge=1, le=65536)] = None,
        accelops_only: bool = True,
        window: Annotated[int, Query(ge=1, le=100)] = 5,
        threshold: Annotated[float, Query(ge=0, lt=10)] = 0.10,
    ):
        return explore.history(
            db, family, op, machine, threads, shape, m, commit, accelops_only, window, threshold, max_series=200
        )

    @app.get(
        "/api/regressions",
        response_model=list[Verdict],
        responses=ERRORS,
        summary="The regression check (accelops report --check's rule) on each benchmark's newest run",
    )
    def regressions(
        machine: Annotated[list[Fingerprint] | None, Query()] = None,
        family: Text | None = None,
        kind: Annotated[
            list[Annotated[str, StringConstraints(pattern="^(regression|improvement|ok|too little history|invalid)$")]]
            | None,
            Query(),
        ] = None,
        window: Annotated[int, Query(ge=1, le=100)] = 5,
        threshold: Annotated[float, Query(ge=0, lt=10)] = 0.10,
    ):
        return explore.regressions(db, machine, family, kind, window, threshold)

    @app.get(
        "/api/anomalies",
        response_model=list[Anomaly],
        responses=ERRORS,
        summary="Single outlier measurements (robust z-score against neighbouring runs)",
        description="A run's median is an outlier of its benchmark's series when |0.6745 (x - m) / MAD| > z_max, "
        "m and MAD over the j runs before and the j after it, j = min(k, runs before, runs after) >= 2, MAD "
        "floored at floor x m. See accelops/results/explore.py.",
    )
    def anomalies(
        machine: Annotated[list[Fingerprint] | None, Query()] = None,
        family: Text | None = None,
        k: Annotated[int, Query(ge=2, le=50)] = 3,
        z_max: Annotated[float, Query(gt=0, le=100)] = 3.5,
        floor: Annotated[float, Query(ge=0, le=1)] = 0.05,
    ):
        return explore.anomalies(db, machine, family, k, z_max, floor)

    @app.get(
        "/api/matrix",
        response_model=list[MatrixCell],
        responses=ERRORS,
        summary="Compatibility matrix: op x backend x machine, newest run",
    )
    def matrix(family: Text | None = None, machine: Annotated[list[Fingerprint] | None, Query()] = None):
        return explore.matrix(db, family, machine)

    @app.get(
        "/api/predict",
        response_model=Prediction,
        responses=ERRORS,
        summary="The tuned dispatch's choice for a shape, with the model's leave-one-out error",
    )
    def predict(
        op: Annotated[str, Query(pattern="^(ternary_matmul|int8_linear)$")],
        m: Dim,
        n: Dim,
        k: Dim,
        machine: Fingerprint | None = None,
    ):
        return explore.predict(db, machine, op, m, n, k)

    return app


def plotly_js() -> Path:
    """The plotly.js bundle the plotly package ships (served locally: no CDN, works offline)."""
    import plotly

    path = Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"
    if not path.exists():
        raise FileNotFoundError(f"plotly.js is not where the plotly package keeps it ({path})")
    return path


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, so that a port in use is one clear error before the server starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (another server there? pass --port)")
    sock.listen(128)
    return sock


def serve(db_path, host: str = "127.0.0.1", port: int = 8765, lock_timeout: float = 5.0, out=None) -> int:
    import sys

    import uvicorn

    out = out or sys.stdout
    plotly_js()  # fail now, not on the first page load
    if not Path(db_path).exists():
        raise FileNotFoundError(
            f"results database {db_path} does not exist (run a benchmark or `accelops results import` first)"
        )
    app = create_app(db_path, lock_timeout)
    try:  # readable now? (a database a bench is writing, or an empty one, is served all the same)
        explore.ReadOnlyResults(db_path, lock_timeout)._connect().close()
    except explore.Unavailable as exc:
        print(f"warning: {exc}; the API answers 503 until it is readable", file=out)
    try:
        sock = listen(host, port)
    except OSError as exc:
        raise SystemExit(str(exc)) from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"accelops results serve: http://{shown}:{bound}/ (database {db_path}, read-only; Ctrl-C stops)", file=out)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {host}: anyone who can reach this address can read the results", file=out)
    out.flush()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
    return 0
