"""Test set-up: Triton runs its kernels on CPU tensors through its interpreter, which must
be switched on before triton is first imported."""

import os
import sys
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
# The dispatch autotuner (accelops/ops/_tuning.py) would measure every new (op, shape) of
# the suite for up to a second and write the user's table: off for the suite (and the
# processes it starts), except in tests/test_autotune.py, which turns it on with a
# temporary table. Nor does the suite read the user's table: its choices would change
# which path a test exercises.
os.environ.setdefault("ACCELOPS_AUTOTUNE", "0")
os.environ.setdefault(
    "ACCELOPS_DISPATCH_TABLE", os.path.join(tempfile.gettempdir(), f"accelops-tests-{os.getpid()}", "dispatch.json")
)

# ACCELOPS_TEST_NO_EXTENSION=1: run as if accelops._C (and accelops._C_cuda) were not built;
# tests/test_registration.py runs the opcheck and compile tests that way in a subprocess. A
# None entry in sys.modules makes the import raise ImportError, as a missing module does.
if os.environ.get("ACCELOPS_TEST_NO_EXTENSION") == "1":
    sys.modules["accelops._C"] = None
    sys.modules["accelops._C_cuda"] = None

import pytest  # noqa: E402
import torch  # noqa: E402

import accelops  # noqa: E402,F401


def _cpu_isas() -> list[str]:
    """Instruction-set levels of the C++ kernels this CPU can run, lowest first."""
    try:
        import accelops._C as C

        return C.cpu_isas()
    except Exception:  # no extension: the cpu backends skip or fail on their own
        return ["scalar"]


CPU_ISAS = _cpu_isas()
AUTO_ISA = CPU_ISAS[-1]  # what "cpu" picks with ACCELOPS_CPU_ISA unset
# "cpu" runs the widest path this CPU has; "cpu-<isa>" forces a narrower one through
# ACCELOPS_CPU_ISA, so every path the CPU can run is checked on one machine (on an
# AVX-512 VNNI machine: avx512vnni as "cpu", then avx2 and scalar).
ISA_BACKENDS = ["cpu-avx512vnni", "cpu-avx2", "cpu-scalar"]
BACKENDS = ["reference", "cpu", *ISA_BACKENDS, "triton"]


def isa_skip_reason(backend: str) -> str | None:
    if not backend.startswith("cpu-"):
        return None
    isa = backend[len("cpu-") :]
    if isa not in CPU_ISAS:
        return f"this CPU cannot run the {isa} kernels (it runs {', '.join(CPU_ISAS)})"
    if isa == AUTO_ISA and backend != "cpu-scalar":
        return f"{isa} is the path 'cpu' already runs on this CPU"
    return None


def use_backend(monkeypatch, backend: str) -> None:
    if backend.startswith("cpu-"):
        monkeypatch.setenv("ACCELOPS_BACKEND", "cpu")
        monkeypatch.setenv("ACCELOPS_CPU_ISA", backend[len("cpu-") :])
    else:
        monkeypatch.setenv("ACCELOPS_BACKEND", backend)
        monkeypatch.delenv("ACCELOPS_CPU_ISA", raising=False)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    reason = isa_skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    use_backend(monkeypatch, request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- test tiers
# `make test-fast` deselects these (-m "not slow and not distributed and not ray"); `make
# test` (CI) runs everything. Marked here, by file and by name, rather than test by test, so
# a new test in one of these files gets its tier without anyone remembering the marker; a
# test elsewhere that is slow carries @pytest.mark.slow itself.
_TIER_FILES = {
    "ray": ("test_hpo_ray.py", "test_ray_train.py"),
    "distributed": ("test_distributed.py", "test_strategies.py", "test_launch.py"),
    "slow": (
        "test_cuda_sources.py",
        "test_cli_errors.py",
        "test_cli_generate.py",
        "test_report_plots.py",
        "test_bench.py",
    ),
}
# Tests measured above ~5 s on 2 loaded cores, or that start ranks, outside the files above.
_TIER_NAMES = {
    "distributed": ("two_ranks", "torchrun", "2_ranks", "rendezvous"),
    "slow": (
        "convergence",
        "test_kernels_compile_for_gpus",
        "training_loss_goes_down",
        "over_100_seeds",
        "mlflow",
        "sigkill",
        "sigterm",
    ),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        filename = item.path.name
        for marker, files in _TIER_FILES.items():
            if filename in files:
                item.add_marker(getattr(pytest.mark, marker))
        for marker, fragments in _TIER_NAMES.items():
            if any(f in item.name for f in fragments):
                item.add_marker(getattr(pytest.mark, marker))
