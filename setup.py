"""Build accelops: the C++ CPU extension always, the CUDA extension only when torch has CUDA.

Nothing is compiled at import time; `pip install --no-build-isolation -e .` (or the
Makefile) builds `accelops._C` once, against the torch already installed.
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def rel(*parts):
    return os.path.relpath(os.path.join(HERE, *parts), HERE)


# The kernels choose their instruction set at run time (see csrc/cpu/cpu_features.h), so
# the build itself targets baseline x86-64 and compiles the AVX2/VNNI/AVX-512 functions
# with per-function target attributes: one wheel runs on any x86-64.
# -ffp-contract=off: no a*b+c is fused into an FMA behind the code's back, so the kernels
# round exactly where the references (and torch) round.
cxx_flags = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas"]
cpu_sources = sorted(glob.glob(rel("csrc", "cpu", "*.cpp"))) + [rel("csrc", "ops.cpp")]

ext_modules = [
    CppExtension(
        "accelops._C",
        cpu_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
]

# CUDA kernels need a CUDA build of torch (its c10/cuda libraries and headers) and nvcc: a
# visible GPU is neither necessary (CI builds wheels without one) nor sufficient (a ROCm
# torch also reports one; a CPU-only torch never does, and then no CUDA is built).
if torch.version.cuda is not None and CUDA_HOME is not None:
    ext_modules.append(
        CUDAExtension(
            "accelops._C_cuda",
            sorted(glob.glob(rel("csrc", "cuda", "*.cu"))) + [rel("csrc", "cuda_ops.cpp")],
            extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17"]},
        )
    )

setup(
    name="accelops",
    version="0.1.0",
    description="Low-bit (ternary, INT8) and distributed-training kernels for PyTorch",
    packages=find_packages(include=["accelops", "accelops.*"]) + ["accelops.kernels"],
    package_dir={"accelops.kernels": "kernels"},
    package_data={"accelops.results": ["static/*.html", "static/*.js", "static/*.css"]},  # the dashboard's page
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    license="BSD-3-Clause",
    python_requires=">=3.10",
    # duckdb: accelops.results; safetensors: accelops.save / accelops.load (both imported on use)
    install_requires=["torch>=2.4", "numpy", "duckdb>=1.1", "safetensors>=0.4"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "hypothesis", "triton>=3.0"],
        "bench": ["torchao==0.18.0", "tqdm"],
        "ray": ["ray[train]>=2.50"],  # accelops train --launcher ray / accelops.train.ray_fit
        "mlflow": ["mlflow>=2.10"],  # Trainer(mlflow=...) / accelops train --mlflow
        "train": ["tqdm", "tomli; python_version < '3.11'"],  # + tensorboard, used when installed
        "eval": ["tokenizers>=0.15"],  # accelops.eval.tokenize (imported on use)
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "plotly>=5"],  # accelops results serve
    },
    entry_points={"console_scripts": ["accelops=accelops.cli:main"]},
)
