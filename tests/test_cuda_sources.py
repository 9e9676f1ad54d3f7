"""The CUDA sources build, on a machine with no GPU and a CPU-only torch.

csrc/cuda keeps its kernels behind a plain C ABI (csrc/cuda/accelops_cuda.h) so that nvcc
alone compiles them; these tests hold that line. Each .cu is compiled for sm_80 and sm_90
with host warnings on (and must be warning-free), the header must compile as C++ and as C
without torch, and the extern "C" functions it declares must be exactly those the objects
define with C linkage. The torch glue (csrc/cuda_ops.cpp) is syntax-checked against the
c10/cuda headers that CPU wheels ship, where they do.

Wall time: the three compiles run as concurrent processes started by one fixture, about
50 s of CPU in all (nvcc ~15-20 s per file for both architectures, g++ ~17 s on the glue):
~30 s on two idle cores, ~65 s measured on two cores shared with other jobs. These tests
need nvcc on PATH and skip, saying so, without it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
HEADER = CUDA_DIR / "accelops_cuda.h"
GLUE = ROOT / "csrc" / "cuda_ops.cpp"
CU_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")
CXX = shutil.which("g++")
CC = shutil.which("gcc")
# The two architectures the kernels are written for (dp4a everywhere, A100 and H100 tuning).
NVCC_FLAGS = [
    "-c",
    "-std=c++17",
    "-O3",
    "-gencode",
    "arch=compute_80,code=sm_80",
    "-gencode",
    "arch=compute_90,code=sm_90",
    "-Xcompiler",
    "-Wall",
]
TIMEOUT_S = 600

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH, so the CUDA sources cannot be compiled")


def _cuda_include_dir() -> Path | None:
    """The toolkit's include directory, as nvcc itself would pass it (nvcc may be a wrapper script)."""
    if NVCC is None:
        return None
    try:
        dry = subprocess.run(
            [NVCC, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
        for line in (dry.stdout + dry.stderr).splitlines():
            if "INCLUDES=" in line:
                for inc in re.findall(r'-I"?([^"\s]+)', line):
                    if (Path(inc) / "cuda_runtime_api.h").is_file():
                        return Path(inc)
    except (OSError, subprocess.SubprocessError):
        pass
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_runtime_api.h").is_file():
            return Path(root) / "include"
    return None


def _header_functions() -> set[str]:
    text = HEADER.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return set(re.findall(r"\bcudaError_t\s+(accelops_\w+)\s*\(", text))


def _glue_command() -> tuple[list[str] | None, str]:
    """g++ -fsyntax-only for csrc/cuda_ops.cpp against torch's headers, or None and why not."""
    if CXX is None:
        return None, "g++ is not on PATH"
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError as exc:
        return None, f"torch is not importable ({exc})"
    torch_inc = [Path(p) for p in include_paths()]
    if not any((p / "c10" / "cuda" / "CUDAStream.h").is_file() for p in torch_inc):
        return None, "this torch install ships no c10/cuda headers"
    cuda_inc = _cuda_include_dir()
    if cuda_inc is None:
        return None, "the CUDA toolkit's include directory was not found"
    py_inc = sysconfig.get_paths()["include"]
    # CPU wheels lack the generated c10/cuda/impl/cuda_cmake_macros.h; this define skips it
    # (the HIP build's switch). Only syntax is checked: nothing is linked against c10_cuda.
    return [
        CXX,
        "-std=c++17",
        "-fsyntax-only",
        "-Wall",
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        *[f"-I{p}" for p in torch_inc],
        f"-I{py_inc}",
        f"-I{cuda_inc}",
        str(GLUE),
    ], ""


class _Job:
    """A compiler process started now and waited for when a test needs its result."""

    def __init__(self, cmd: list[str], cwd: Path):
        self.cmd = cmd
        self._proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._result: tuple[int, str] | None = None

    def result(self) -> tuple[int, str]:
        if self._result is None:
            try:
                out, _ = self._proc.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                out, _ = self._proc.communicate()
                out += f"\n[timed out after {TIMEOUT_S} s]"
            self._result = (self._proc.returncode, out)
        return self._result


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Starts every slow compile at once, so they overlap on the available cores."""
    out = tmp_path_factory.mktemp("cuda_build")
    jobs = {
        src.name: (_Job([NVCC, *NVCC_FLAGS, str(src), "-o", str(out / f"{src.stem}.o")], ROOT), out / f"{src.stem}.o")
        for src in CU_SOURCES
    }
    glue_cmd, why = _glue_command()
    glue = _Job(glue_cmd, ROOT) if glue_cmd is not None else why
    yield {"objects": jobs, "glue": glue}
    for job, _ in jobs.values():
        job.result()  # reap; never leave a compiler running past the module
    if isinstance(glue, _Job):
        glue.result()


def _warnings(output: str) -> list[str]:
    return [line for line in output.splitlines() if re.search(r"\bwarning\b", line, re.I)]


def test_sources_present():
    assert {p.name for p in CU_SOURCES} >= {"ternary.cu", "int8.cu"}
    assert HEADER.is_file() and GLUE.is_file()


@needs_nvcc
@pytest.mark.parametrize("source", [p.name for p in CU_SOURCES])
def test_cu_compiles_for_sm80_and_sm90(builds, source):
    job, obj = builds["objects"][source]
    rc, output = job.result()
    assert rc == 0, f"{' '.join(job.cmd)}\n{output}"
    assert obj.is_file() and obj.stat().st_size > 0
    assert not _warnings(output), f"{source} compiles with warnings:\n{output}"


@needs_nvcc
def test_header_functions_are_defined_with_c_linkage(builds):
    declared = _header_functions()
    assert declared, "no accelops_* functions found in accelops_cuda.h"

    # In the sources: each declared function has exactly one extern "C" definition.
    defined: dict[str, list[str]] = {}
    for src in CU_SOURCES:
        text = re.sub(r"//[^\n]*|/\*.*?\*/", "", src.read_text(), flags=re.S)
        for name in re.findall(r'extern\s+"C"\s+cudaError_t\s+(accelops_\w+)\s*\([^;{]*\)\s*\{', text):
            defined.setdefault(name, []).append(src.name)
    assert declared == set(defined), (
        f"declared but not defined: {sorted(declared - set(defined))}; "
        f"defined but not declared: {sorted(set(defined) - declared)}"
    )
    assert all(len(files) == 1 for files in defined.values()), defined

    # In the objects: the same names, unmangled (C linkage), and nothing else exported.
    # nvcc gives anonymous-namespace functions global symbols with a per-file unique
    # prefix (_GLOBAL__N_<hash>); those cannot clash with anything and are ignored.
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm is not on PATH: symbol tables not checked (sources were)")
    exported: set[str] = set()
    for source, (job, obj) in builds["objects"].items():
        rc, output = job.result()
        assert rc == 0, output
        table = subprocess.run([nm, "-g", "--defined-only", str(obj)], capture_output=True, text=True, check=True)
        for line in table.stdout.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] == "T" and "_GLOBAL__N_" not in parts[2]:
                exported.add(parts[2])
    assert exported == declared, f"exported: {sorted(exported)}; declared: {sorted(declared)}"


@needs_nvcc
@pytest.mark.parametrize("language", ["c++", "c"])
def test_header_compiles_without_torch(tmp_path, language):
    compiler = CXX if language == "c++" else CC
    if compiler is None:
        pytest.skip(f"no {language} compiler on PATH")
    cuda_inc = _cuda_include_dir()
    assert cuda_inc is not None, "nvcc is on PATH but its include directory (cuda_runtime_api.h) was not found"
    suffix, std = (".cpp", "-std=c++17") if language == "c++" else (".c", "-std=c99")
    tu = tmp_path / f"use_header{suffix}"
    # Included twice (the guard), and every function's address taken (the declarations are
    # complete and usable).
    calls = "\n".join(f"  (void)&{name};" for name in sorted(_header_functions()))
    tu.write_text(
        f'#include "accelops_cuda.h"\n#include "accelops_cuda.h"\nint main(void) {{\n{calls}\n  return 0;\n}}\n'
    )
    cmd = [compiler, std, "-fsyntax-only", "-Wall", "-Wextra", "-Werror", f"-I{CUDA_DIR}", f"-I{cuda_inc}", str(tu)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}{res.stderr}"


@needs_nvcc
def test_torch_glue_syntax(builds):
    glue = builds["glue"]
    if not isinstance(glue, _Job):
        pytest.skip(f"csrc/cuda_ops.cpp not checked: {glue}")
    rc, output = glue.result()
    assert rc == 0, f"{' '.join(glue.cmd)}\n{output}"
    # torch's own headers warn under -std=c++17; only the glue's own lines must be clean.
    own = [line for line in _warnings(output) if "cuda_ops.cpp" in line]
    assert not own, output
