"""Issue 24, item 1: every op is defined in Python (accelops/ops/<family>.py through
accelops/ops/_library.py) with its reference as the default kernel; the C++ extension
only adds CPU kernels (TORCH_LIBRARY_IMPL). So each op exists, runs and compiles without
the extension: the subprocess test below runs this file and every family's opcheck tests
with accelops._C hidden (ACCELOPS_TEST_NO_EXTENSION=1, see conftest.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from accelops import reference as R
from accelops.ops import _backend, _library
from accelops.ops import optim as O
from accelops.reference import comm as RC
from accelops.reference import fake_quant as RFQ
from accelops.reference import ffn as RF
from accelops.reference import optim as RO
from accelops.reference import ternary_base3 as RB3
from accelops.reference import ternary_lut as RL
from accelops.reference.ternary import quantize_weight_ternary_values

ROOT = Path(__file__).resolve().parents[1]
NO_EXTENSION = os.environ.get("ACCELOPS_TEST_NO_EXTENSION") == "1"
HAS_EXTENSION = _backend.extension()[0] is not None

OPS = {
    "ternary": [
        "pack_ternary",
        "unpack_ternary",
        "quantize_weight_ternary",
        "ternary_matmul",
        "ternary_matmul_int_mm",
        "ternary_matmul_lut",
        "ternary_matmul_base3",
    ],
    "int8": ["quantize_activation_int8", "quantize_weight_int8", "int8_matmul", "int8_linear", "int8_linear_int_mm"],
    "fake_quant": [
        "fake_quantize",
        "fake_quantize_backward",
        "fake_quantize_learnable",
        "fake_quantize_learnable_backward",
    ],
    "ffn": ["fused_ffn", "fused_ffn_backward", "fused_ffn_backward_consume_", "ffn_activation"],
    "comm": [
        "bucket_flatten",
        "bucket_unflatten_",
        "cast_div",
        "topk_compress_",
        "topk_decompress",
        "sign_compress_",
        "sign_decompress",
        "int8_compress_",
        "int8_decompress",
        "orthogonalize_",
    ],
    "optim": ["adamw8bit_step_", "sgd8bit_step_", "adamw8bit_fp8_step_"],
    "decode": ["ternary_decode_layer"],
}
ALL_OPS = [name for names in OPS.values() for name in names]


def _args(name: str) -> tuple:
    """Fresh, deterministic arguments for one call of accelops::<name> (in-place ops
    mutate theirs, so every call builds its own)."""
    torch.manual_seed(0)
    w = torch.randn(12, 200)
    x = torch.randn(3, 200)
    bias = torch.randn(12)
    if name in OPS["ternary"]:
        packed, scale = R.quantize_weight_ternary(w, per_channel=True)
        return {
            "pack_ternary": (quantize_weight_ternary_values(w)[0],),
            "unpack_ternary": (packed, 200),
            "quantize_weight_ternary": (w, True),
            "ternary_matmul_lut": (x, RL.pack_ternary_lut(R.unpack_ternary(packed, 200)), scale, 12, bias),
            "ternary_matmul_base3": (x, RB3.pack_ternary_base3(R.unpack_ternary(packed, 200)), scale, bias),
        }.get(name, (x, packed, scale, bias))
    if name in OPS["int8"]:
        w_q, w_scale = R.quantize_weight_int8(w)
        x_q, x_scale = R.quantize_activation_int8(x)
        return {
            "quantize_activation_int8": (x.half(),),
            "quantize_weight_int8": (w,),
            "int8_matmul": (x_q, x_scale, w_q, w_scale, bias, torch.bfloat16),
        }.get(name, (x, w_q, w_scale, bias))
    if name in OPS["fake_quant"]:
        xf = torch.randn(6, 20)
        s = torch.rand(6) * 0.1 + 0.01
        z = torch.randint(-5, 5, (6,), dtype=torch.int32)
        bits = RFQ.pack_mask(RFQ.fake_quantize_with_mask(xf, s, z, -128, 127, 0)[1])
        return {
            "fake_quantize": (xf, s, z, -128, 127, 0),
            "fake_quantize_backward": (torch.randn(6, 20), bits),
            "fake_quantize_learnable": (xf, s, z.float(), -128, 127, 0, 0.5),
            "fake_quantize_learnable_backward": (torch.randn(6, 20), xf, s, z.float(), -128, 127, 0, 0.5),
        }[name]
    if name in OPS["ffn"]:
        xf, w_gate, w_up, w_down = torch.randn(2, 3, 8), torch.randn(12, 8), torch.randn(12, 8), torch.randn(8, 12)
        b = (torch.randn(12), torch.randn(12), torch.randn(8))
        if name == "fused_ffn":
            return (xf, w_gate, w_up, w_down, *b, "swiglu", True, False)
        g, u = torch.randn(2, 3, 12), torch.randn(2, 3, 12)
        if name == "ffn_activation":
            return (g, u, "geglu")
        return (torch.randn(2, 3, 8), xf, g, u, w_gate, w_up, w_down, "swiglu", True, True, True, False, True, True)
    if name in OPS["comm"]:
        grad, residual = torch.randn(300), torch.randn(300)
        values, indices = RC.topk_compress_(grad.clone(), None, 7)
        sbits, sscales = RC.sign_compress_(grad.clone(), None, 64)
        q, qscales = RC.int8_compress_(grad.clone(), None, 64, 5)
        return {
            "bucket_flatten": ([torch.randn(3, 4), torch.randn(5)], torch.bfloat16, 2.0),
            "bucket_unflatten_": (torch.randn(17), [torch.zeros(3, 4), torch.zeros(5, dtype=torch.float16)], 2.0),
            "cast_div": (torch.randn(4, 5), 3.0, torch.float16),
            "topk_compress_": (grad, residual, 7, "sampled", 32, 1),
            "topk_decompress": (torch.stack([values, values]), torch.stack([indices, indices]), 300),
            "sign_compress_": (grad, residual, 64),
            "sign_decompress": (sbits, sscales, 300, 64),
            "int8_compress_": (grad, residual, 64, 5),
            "int8_decompress": (q, qscales, 64),
            "orthogonalize_": (torch.randn(2, 30, 3), 1e-8),
        }[name]
    if name == "ternary_decode_layer":
        from tests.test_decode_layer import layer_args

        return layer_args(batch=2, dim=32, n_heads=4, kv_heads=2, hidden=48, size=8, positions=(3, 6))
    p, g = torch.randn(300), torch.randn(300)
    if name == "adamw8bit_step_":
        (mc, ma), (vc, va) = O.new_state(p, 128), O.new_state(p, 128)
        s = RO.adamw_scalars(1e-3, 0.9, 0.999, 1e-8, 0.01, 1)
        return (
            p,
            g,
            mc,
            ma,
            vc,
            va,
            O.qmap(True, "cpu"),
            O.qmap(False, "cpu"),
            s["beta1"],
            s["c1"],
            s["beta2"],
            s["c2"],
            s["decay"],
            s["step_size"],
            s["bc2_sqrt"],
            s["eps"],
            128,
        )
    if name == "adamw8bit_fp8_step_":
        (mc, ma), (vc, va) = O.new_state(p, 128), O.new_state(p, 128)
        s = RO.adamw_scalars(1e-3, 0.9, 0.999, 1e-8, 0.01, 1)
        keys = ("beta1", "c1", "beta2", "c2", "decay", "step_size", "bc2_sqrt", "eps")
        return (p, g, mc, ma, vc, va, *[s[k] for k in keys], 128)
    if name == "sgd8bit_step_":
        c, a = O.new_state(p, 128)
        return (p, g, c, a, O.qmap(True, "cpu"), 0.1, 0.9, 0.0, 0.01, True, False, 128)
    raise KeyError(f"no sample call for accelops::{name}: add one here (and the op to OPS)")


def _tensors(value) -> list:
    """The tensors in an op's result or argument list, flattened in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def test_every_op_is_defined_in_python_once():
    assert sorted(_library.OPS) == sorted(ALL_OPS) and len(_library.OPS) == len(set(_library.OPS))
    for name in ALL_OPS:
        qualname = f"accelops::{name}"
        has = lambda key: torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)  # noqa: E731
        assert has("CompositeExplicitAutograd"), f"{name}: no default (reference) kernel"
        assert has("Meta"), f"{name}: no fake"
        assert has("CPU") == HAS_EXTENSION, f"{name}: CPU kernel {'missing' if HAS_EXTENSION else 'present'}"


def test_csrc_only_implements():
    """The C++ side defines no schema and registers a CPU kernel for every op."""
    cpu, cuda = (ROOT / "csrc" / "ops.cpp").read_text(), (ROOT / "csrc" / "cuda_ops.cpp").read_text()
    for text in (cpu, cuda):
        assert not re.search(r"TORCH_LIBRARY(_FRAGMENT)?\s*\(", text) and "m.def(" not in text
    assert sorted(re.findall(r'm\.impl\("(\w+)"', cpu)) == sorted(ALL_OPS)
    assert set(re.findall(r'm\.impl\("(\w+)"', cuda)) <= set(ALL_OPS)


@pytest.mark.parametrize("name", ALL_OPS)
def test_op_runs_and_compiles_fullgraph(name):
    """Eager and torch.compile(fullgraph=True) agree on the results and on what the op
    writes in place: the C++ kernel with the extension, the reference without it."""
    op = getattr(torch.ops.accelops, name)
    args = _args(name)
    out = op(*args)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: op(*a), fullgraph=True, backend="aot_eager")
    args_c = _args(name)
    out_c = compiled(*args_c)
    for a, b in zip(_tensors((out, args)), _tensors((out_c, args_c)), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.skipif(HAS_EXTENSION, reason="the CPU kernels are the C++ ones here")
def test_default_kernels_are_the_reference():
    w, x = torch.randn(12, 200), torch.randn(3, 200)
    packed, scale = R.quantize_weight_ternary(w)
    assert torch.equal(torch.ops.accelops.ternary_matmul(x, packed, scale), R.ternary_matmul(x, packed, scale))
    w_q, w_scale = R.quantize_weight_int8(w)
    assert torch.equal(torch.ops.accelops.int8_linear(x, w_q, w_scale), R.int8_linear(x, w_q, w_scale))
    ffn = _args("fused_ffn")
    y, g, u = torch.ops.accelops.fused_ffn(*ffn)
    assert torch.equal(y, RF.fused_ffn(*ffn[:4], ffn[4:7], "swiglu"))
    assert torch.equal(torch.ops.accelops.cast_div(x, 3.0, torch.bfloat16), RC.cast_div(x, 3.0, torch.bfloat16))


@pytest.mark.skipif(NO_EXTENSION, reason="this is the run without the extension")
def test_without_the_extension():
    """This file and every family's opcheck tests, in a process where accelops._C cannot
    be imported: the ops exist, run their reference, pass opcheck and compile."""
    files = [
        "tests/test_registration.py",
        "tests/test_ternary.py",
        "tests/test_int8.py",
        "tests/test_fake_quant.py",
        "tests/test_ffn.py",
        "tests/test_comm.py",
        "tests/test_optim.py",
        "tests/test_decode_layer.py",
    ]
    env = dict(os.environ, ACCELOPS_TEST_NO_EXTENSION="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-k", "opcheck or test_registration"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))),
    )


@pytest.mark.skipif(not HAS_EXTENSION or NO_EXTENSION, reason="needs the C++ extension")
def test_extension_loaded_after_the_python_definitions():
    """accelops loads accelops._C before it defines the schemas; the other order (the
    extension's TORCH_LIBRARY_IMPL after the definitions) registers the same kernels."""
    proc = _run_python("""
        import importlib, sys
        sys.modules["accelops._C"] = None
        import torch
        import accelops
        from accelops.ops import _library
        assert accelops.ops._backend.extension()[0] is None
        del sys.modules["accelops._C"]
        importlib.import_module("accelops._C")
        for name in _library.OPS:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"accelops::{name}", "CPU"), name
        dump = torch._C._dispatch_dump("accelops::ternary_matmul")
        assert any(line.startswith("CPU:") and "ops.cpp" in line for line in dump.splitlines()), dump
        from accelops.reference import ternary as R
        packed, scale = R.quantize_weight_ternary(torch.randn(8, 300))
        x = torch.randn(4, 300)
        torch.testing.assert_close(torch.ops.accelops.ternary_matmul(x, packed, scale), R.ternary_matmul(x, packed, scale))
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


@pytest.mark.skipif(not HAS_EXTENSION or NO_EXTENSION, reason="needs the C++ extension")
def test_a_namespace_claimed_before_accelops_is_a_clear_import_error():
    """What an accelops._C built from older sources (with the schemas in its own
    TORCH_LIBRARY block) does: it claims the namespace first. Simulated from Python."""
    proc = _run_python("""
        import torch
        lib = torch.library.Library("accelops", "DEF")
        try:
            import accelops
        except ImportError as exc:
            print(exc)
    """)
    assert "built from sources older" in proc.stdout and "rebuild" in proc.stdout, proc.stdout + proc.stderr
