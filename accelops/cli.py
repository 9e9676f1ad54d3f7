"""The `accelops` command."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="accelops", description="accelops: low-bit and distributed kernels for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and the backends available on this machine")
    args = parser.parse_args(argv)
    if args.command == "info":
        from . import info

        info()
    return 0


if __name__ == "__main__":
    sys.exit(main())
