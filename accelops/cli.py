"""The `accelops` command.

Errors: a user error (a config or command line that cannot be used, a missing input file,
a corrupt checkpoint, a bad SQL query, a missing optional extra) prints one line,
`accelops <command>: error: <message>`, on stderr and exits 2, like argparse's usage errors.
Any other exception is a bug in accelops: it keeps its traceback (exit 1). ACCELOPS_DEBUG=1
shows the traceback of every error. Called from Python with an argv list, main() raises
instead (the typed exception), as the functions behind it do.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

DEBUG_ENV = "ACCELOPS_DEBUG"

# Exceptions whose message is the whole story for the person at the command line. Plain
# ValueError / TypeError are what accelops' argument and config validation raises. The
# classes of modules that may not be loaded are looked up only when they are (importing
# torch to classify a results-database error would cost seconds).
_USER_ERRORS = (
    ValueError,
    TypeError,
    ImportError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)
_USER_ERRORS_BY_NAME = (
    ("accelops.train.checkpoint", "CheckpointError"),
    ("accelops.results.db", "SchemaError"),
    ("accelops.results.db", "DatabaseLocked"),
    ("accelops.results.db", "DatabaseWriteError"),
)


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (DuckDB's and a few others span several; a line
    of only a caret pointing into the SQL means nothing once joined)."""
    lines = [line.strip() for line in str(exc).splitlines()]
    text = " ".join(line for line in lines if line and set(line) != {"^"})
    return text or type(exc).__name__


def is_user_error(exc: BaseException, command: str | None = None) -> bool:
    if isinstance(exc, _USER_ERRORS):
        return True
    for module, name in _USER_ERRORS_BY_NAME:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    # `accelops results` runs the SQL it is given: DuckDB's errors there are the query's
    duckdb = sys.modules.get("duckdb")
    return command == "results" and duckdb is not None and isinstance(exc, duckdb.Error)


def _prog(prog: str) -> str:
    # torchrun workers: every rank reports, so say which one
    world, rank = os.environ.get("WORLD_SIZE"), os.environ.get("RANK")
    if world and rank and world != "1":
        return f"{prog} [rank {rank}/{world}]"
    return prog


def _workers_failed(exc: BaseException):
    """(message, exit code) for torchrun's ChildFailedError (`accelops train --nproc-per-node`):
    the workers printed their own errors; exit 2 when the ones that failed by themselves all
    failed with a user error (torchrun then stops the others with SIGTERM)."""
    failures = getattr(exc, "failures", None)
    if type(exc).__name__ != "ChildFailedError" or not isinstance(failures, dict) or not failures:
        return None
    codes = {rank: getattr(failure, "exitcode", None) for rank, failure in sorted(failures.items())}
    stopped = [r for r, c in codes.items() if c == -signal.SIGTERM]
    failed = {r: c for r, c in codes.items() if r not in stopped} or codes
    parts = [
        f"rank {r} " + (f"killed by signal {-c}" if isinstance(c, int) and c < 0 else f"exit code {c}")
        for r, c in failed.items()
    ]
    after = f"; torchrun stopped rank(s) {', '.join(map(str, stopped))} after that" if failed is not codes else ""
    return (
        f"worker process(es) failed: {', '.join(parts)}{after}; each failed rank's error is above",
        2 if set(failed.values()) == {2} else 1,
    )


def run_reporting(prog: str, command: str | None, fn) -> int:
    """fn() -> its exit code, with a user error (see is_user_error) reported on one line of
    stderr as `prog: error: message` -> 2; other exceptions propagate with their traceback.
    A SystemExit carrying a message (argparse-style aborts) is reported the same way.
    ACCELOPS_DEBUG=1: everything propagates."""
    try:
        return fn()
    except SystemExit as exc:
        if debug_enabled() or exc.code is None or isinstance(exc.code, int):
            raise
        message = str(exc.code)
        message = message[len(prog) + 2 :] if message.startswith(prog + ": ") else message
        print(f"{_prog(prog)}: error: {one_line(Exception(message))}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - sorted below; the rest re-raised with their traceback
        if debug_enabled():
            raise
        failed = _workers_failed(exc)
        if failed is not None:
            print(f"{_prog(prog)}: error: {failed[0]}", file=sys.stderr)
            return failed[1]
        if not is_user_error(exc, command):
            raise
        print(f"{_prog(prog)}: error: {one_line(exc)}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    """The `accelops` command line. argv None (the program: sys.argv) reports user errors on
    one line and returns 2; an argv list (Python callers) lets them raise."""
    parser = argparse.ArgumentParser(
        prog="accelops",
        description="accelops: low-bit and distributed kernels for PyTorch",
        epilog=f"A user error prints one line 'accelops COMMAND: error: ...' and exits 2; {DEBUG_ENV}=1 shows "
        "the traceback.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and the backends available on this machine")
    from .train.run import add_arguments  # light: torch and argparse only; the trainer loads on use

    add_arguments(
        sub.add_parser(
            "train",
            help="train a character-level TransformerLM / RNNLM from a config file (under torchrun: data-parallel)",
        )
    )
    from .results.cli import add_arguments as add_results_arguments  # argparse only; duckdb loads on use

    add_results_arguments(
        sub.add_parser("results", help="the benchmark results database: import, query, export, serve")
    )
    from .results.cli import add_report_arguments

    add_report_arguments(
        sub.add_parser(
            "report", help="HTML report with plots of the results database; --check: exit 1 on a performance regression"
        )
    )
    from .tune import add_arguments as add_tune_arguments

    add_tune_arguments(
        sub.add_parser(
            "tune",
            help="measure backends and thread counts of the tuned ops here and "
            "write the dispatch table accelops.ops consults",
        )
    )
    from .planner import add_arguments as add_plan_arguments

    add_plan_arguments(
        sub.add_parser(
            "plan",
            help="per-device memory of each training strategy (and quant mode), "
            "what fits, and the strategy / micro-batch / accumulation to use",
        )
    )
    from .generate_cli import add_arguments as add_generate_arguments  # argparse only; torch loads on use

    add_generate_arguments(
        sub.add_parser(
            "generate",
            help="continue a prompt with a model trained by `accelops train` (KV-cached generation; prints tokens/s)",
        )
    )
    program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if not program:
        return _dispatch(args, argv)
    return run_reporting(f"accelops {args.command}", args.command, lambda: _dispatch(args, argv))


def _dispatch(args, argv) -> int:
    if args.command == "info":
        from . import info

        info()
    elif args.command == "train":
        from .train.run import run_args

        return run_args(args, argv[argv.index("train") + 1 :])
    elif args.command == "results":
        from .results.cli import run_args as run_results

        return run_results(args)
    elif args.command == "tune":
        from .tune import run_args as run_tune

        return run_tune(args)
    elif args.command == "plan":
        from .planner import run_args as run_plan

        return run_plan(args)
    elif args.command == "report":
        from .results.cli import run_report

        return run_report(args)
    elif args.command == "generate":
        from .generate_cli import run_args as run_generate

        return run_generate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
