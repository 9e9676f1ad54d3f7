"""The code passes the repository's ruff configuration (pyproject.toml): the lint
(pycodestyle errors and warnings, pyflakes, import order) and `ruff format`'s layout.
CI runs this with the rest of `make test`; `make format` fixes both."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff():
    exe = Path(sys.executable).with_name("ruff")
    if exe.exists():
        return [str(exe)]
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.fail("ruff is not installed: it is in requirements-dev.txt (make test installs it)")


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "--diff", "."]], ids=["lint", "format"])
def test_ruff(args):
    proc = subprocess.run(_ruff() + args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"ruff {' '.join(args)} found problems (`make format` fixes most):\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}"
    )
