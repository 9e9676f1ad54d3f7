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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command == "info":
        from . import info

        info()
    elif args.command == "train":
        from .train.run import run_args

        return run_args(args, argv[argv.index("train") + 1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
