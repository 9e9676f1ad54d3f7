"""The `accelops` command."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="accelops", description="accelops: low-bit and distributed kernels for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and the backends available on this machine")
    from .train.run import add_arguments  # light: torch and argparse only; the trainer loads on use

    add_arguments(sub.add_parser("train", help="train a character-level TransformerLM / RNNLM from a config file "
                                               "(under torchrun: data-parallel)"))
    from .results.cli import add_arguments as add_results_arguments  # argparse only; duckdb loads on use

    add_results_arguments(sub.add_parser("results", help="the benchmark results database: import, query, export"))
    from .results.cli import add_report_arguments

    add_report_arguments(sub.add_parser("report", help="HTML report with plots of the results database; --check: "
                                                       "exit 1 on a performance regression"))
    from .tune import add_arguments as add_tune_arguments

    add_tune_arguments(sub.add_parser("tune", help="measure backends and thread counts of the tuned ops here and "
                                                   "write the dispatch table accelops.ops consults"))
    from .plan import add_arguments as add_plan_arguments

    add_plan_arguments(sub.add_parser("plan", help="per-device memory of each training strategy (and quant mode), "
                                                   "what fits, and the strategy / micro-batch / accumulation to use"))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command == "info":
        from . import info

        info()
    elif args.command == "train":
        from .train.run import run_args

        return run_args(args, argv[argv.index("train") + 1:])
    elif args.command == "results":
        from .results.cli import run_args as run_results

        return run_results(args)
    elif args.command == "tune":
        from .tune import run_args as run_tune

        return run_tune(args)
    elif args.command == "plan":
        from .plan import run_args as run_plan

        return run_plan(args)
    elif args.command == "report":
        from .results.cli import run_report

        return run_report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
