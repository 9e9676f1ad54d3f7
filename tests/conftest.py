"""Test set-up: Triton runs its kernels on CPU tensors through its interpreter, which must
be switched on before triton is first imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import accelops  # noqa: E402,F401

# Every backend that can run on this machine; "cpu-scalar" is the C++ kernels' portable
# path (ACCELOPS_CPU_ISA=scalar), so both instruction-set paths are checked here.
BACKENDS = ["reference", "cpu", "cpu-scalar", "triton"]


def use_backend(monkeypatch, backend: str) -> None:
    if backend == "cpu-scalar":
        monkeypatch.setenv("ACCELOPS_BACKEND", "cpu")
        monkeypatch.setenv("ACCELOPS_CPU_ISA", "scalar")
    else:
        monkeypatch.setenv("ACCELOPS_BACKEND", backend)
        monkeypatch.delenv("ACCELOPS_CPU_ISA", raising=False)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    use_backend(monkeypatch, request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
