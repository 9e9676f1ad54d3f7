"""Triton-specific checks of kernels/ (accelops.kernels), beyond the shared backend suites:
the launchers really launch @triton.jit kernels, the GPU tile configurations (which the
interpreter never picks on its own) give the same bits, and edges the suites do not reach
(round-half-even ties, K = 0, strided operands, grouped tile order, int32 extremes)."""

import inspect
import os
import warnings

import pytest
import torch
import triton

from accelops import ops
from accelops import reference as R
from accelops.kernels import int8 as K8
from accelops.kernels import ternary as KT
from accelops.reference.ternary import packed_cols

from .helpers import assert_close_to_reference, integer_rows

# The interpreter runs kernels on CPU tensors; without it they need a GPU.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

KERNELS = {
    K8: ["_quantize_rows_int8_kernel", "_int8_matmul_kernel"],
    KT: ["_pack_ternary_kernel", "_unpack_ternary_kernel", "_quantize_pack_ternary_kernel", "_ternary_matmul_kernel"],
}


class _Spy:
    """Stands in for a kernel: records each launch grid, then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.fixture
def spies(monkeypatch):
    found = {}
    for module, names in KERNELS.items():
        for name in names:
            found[name] = _Spy(getattr(module, name))
            monkeypatch.setattr(module, name, found[name])
    return found


@pytest.fixture
def gpu_tiles(monkeypatch):
    """Makes the launchers pick the tile sizes they would pick on a GPU."""
    monkeypatch.setattr(K8, "_interpreting", lambda: False)
    monkeypatch.setattr(KT, "_interpreting", lambda: False)


def _launched(spies):
    return {name for name, spy in spies.items() if spy.grids}


# ------------------------------------------------------------------ real kernels


@pytest.mark.parametrize("module", list(KERNELS), ids=["int8", "ternary"])
def test_kernels_are_triton_jit(module):
    for name in KERNELS[module]:
        kernel = getattr(module, name)
        assert isinstance(kernel, triton.runtime.jit.KernelInterface), name
        source = inspect.getsource(kernel.fn)
        assert "torch." not in source, f"{name} must be Triton code, not a torch call"
    assert "tl.dot(" in inspect.getsource(K8._int8_matmul_kernel.fn)
    src = inspect.getsource(KT._ternary_matmul_kernel.fn)
    assert "tl.dot(" in src and ">>" in src and "& 3" in src  # bytes decoded in registers


def test_each_launcher_launches_its_kernels(spies):
    w = torch.randn(24, 300, device=DEVICE)
    x = torch.randn(2, 5, 300, device=DEVICE)
    cases = [
        (lambda: K8.quantize_activation_int8(x), {"_quantize_rows_int8_kernel"}),
        (lambda: K8.quantize_weight_int8(w), {"_quantize_rows_int8_kernel"}),
        (
            lambda: K8.int8_matmul(*K8.quantize_activation_int8(x), *K8.quantize_weight_int8(w)),
            {"_quantize_rows_int8_kernel", "_int8_matmul_kernel"},
        ),
        (lambda: K8.int8_linear(x, *R.quantize_weight_int8(w)), {"_quantize_rows_int8_kernel", "_int8_matmul_kernel"}),
        (lambda: KT.pack_ternary(torch.zeros(24, 300, dtype=torch.int8, device=DEVICE)), {"_pack_ternary_kernel"}),
        (lambda: KT.unpack_ternary(R.quantize_weight_ternary(w)[0], 300), {"_unpack_ternary_kernel"}),
        (lambda: KT.quantize_weight_ternary(w, True), {"_quantize_pack_ternary_kernel"}),
        (
            lambda: KT.ternary_matmul(x, *R.quantize_weight_ternary(w)),
            {"_quantize_rows_int8_kernel", "_ternary_matmul_kernel"},
        ),
    ]
    for call, expected in cases:
        for spy in spies.values():
            spy.grids.clear()
        call()
        assert _launched(spies) == expected


def test_ops_with_forced_triton_backend_launch_kernels(spies, monkeypatch):
    monkeypatch.setenv("ACCELOPS_BACKEND", "triton")
    packed, scale = R.quantize_weight_ternary(torch.randn(8, 64, device=DEVICE))
    ops.ternary_matmul(torch.randn(3, 64, device=DEVICE), packed, scale)
    w_q, w_scale = R.quantize_weight_int8(torch.randn(8, 64, device=DEVICE))
    ops.int8_linear(torch.randn(3, 64, device=DEVICE), w_q, w_scale)
    assert _launched(spies) == {"_quantize_rows_int8_kernel", "_ternary_matmul_kernel", "_int8_matmul_kernel"}


# ------------------------------------------------------------------ tile heuristics

MS = [1, 2, 15, 16, 17, 63, 64, 65, 255, 4096, 1 << 20]


def _pow2(v):
    return v > 0 and v & (v - 1) == 0


@pytest.mark.parametrize("interpret", [False, True], ids=["gpu", "interpreter"])
def test_matmul_configs_are_valid_tiles(interpret):
    for m in MS:
        for n in (1, 40, 4096):
            for k in (1, 127, 4097):
                c = K8._matmul_config(m, n, k, interpret)
                assert all(_pow2(c[d]) for d in ("BLOCK_M", "BLOCK_N", "BLOCK_K")), c
                assert c["BLOCK_M"] >= 16 and c["BLOCK_N"] >= 16 and c["BLOCK_K"] >= 32, c  # tl.dot / int8 MMA k
                t = KT._matmul_config(m, n, triton.cdiv(k, 128), interpret)
                assert _pow2(t["BLOCK_M"]) and _pow2(t["BLOCK_N"]) and _pow2(t["BLOCKS_PER_STEP"]), t
                assert t["BLOCK_M"] >= 16 and t["BLOCK_N"] >= 16, t
                if not interpret:
                    # int8 operand tiles per pipeline stage must fit the shared memory of an
                    # A100 (164 KiB) with room to spare.
                    assert (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * c["num_stages"] <= 128 * 1024, c
                    kstep = 128 * t["BLOCKS_PER_STEP"]
                    assert (t["BLOCK_M"] * kstep + t["BLOCK_N"] * kstep // 4) * t["num_stages"] <= 128 * 1024, t
    gpu = lambda m: K8._matmul_config(m, 4096, 4096, False)  # noqa: E731
    assert gpu(1)["BLOCK_M"] == 16, "decode (M=1) should not pay for a wide M tile"
    assert gpu(1 << 20)["BLOCK_M"] == 128 and gpu(1 << 20)["BLOCK_N"] == 128, "large M wants the big tile"
    assert KT._matmul_config(1, 4096, 32, False)["BLOCK_M"] == 16
    assert KT._matmul_config(1 << 20, 4096, 32, False)["BLOCK_M"] == 128


@pytest.mark.parametrize("interpret", [False, True], ids=["gpu", "interpreter"])
def test_quantize_and_byte_configs(interpret):
    for m in MS:
        for k in (1, 3, 127, 128, 1000, 4096, 4097, 1 << 16):
            c = K8._quantize_config(m, k, interpret)
            assert _pow2(c["BLOCK_M"]) and _pow2(c["BLOCK_K"]) and c["BLOCK_K"] >= 16
            assert c["ONE_CHUNK"] == (k <= c["BLOCK_K"])
            assert c["BLOCK_M"] < 2 * m, "no more rows per program than the next power of 2"
            if not interpret:
                assert c["BLOCK_M"] * c["BLOCK_K"] <= 4096
            b = KT._bytes_config(m, packed_cols(k), interpret)
            assert _pow2(b["BLOCK_N"]) and b["BLOCK_C"] % 32 == 0


# ------------------------------------------------------------------ GPU tiles, exact


# M = 1 / 17 / 130 take the three GPU tile classes (130: two M tiles, the second partial);
# the K values cover one weight, a tail of 1 past a packed block, a mid-block tail, and a
# long K with many steps.
@pytest.mark.parametrize("m,k", [(1, 1), (1, 4097), (17, 129), (17, 300), (17, 4097), (130, 1), (130, 300)])
def test_gpu_tiles_integer_exact(gpu_tiles, m, k):
    n = 37  # not a multiple of any tile
    x = integer_rows(m, k).to(DEVICE)
    wq = torch.randint(-1, 2, (n, k), dtype=torch.int8, device=DEVICE)
    packed = KT.pack_ternary(wq)
    assert torch.equal(packed, R.pack_ternary(wq))
    assert torch.equal(KT.unpack_ternary(packed, k), wq)
    y = KT.ternary_matmul(x, packed, torch.ones(1, device=DEVICE))
    assert torch.equal(y, (x.double() @ wq.double().t()).float())

    w_q = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=DEVICE)
    x_q = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=DEVICE)
    y = K8.int8_matmul(x_q, torch.ones(m, 1, device=DEVICE), w_q, torch.ones(n, device=DEVICE))
    assert torch.equal(y.double(), (x_q.long() @ w_q.long().t()).double())
    assert torch.equal(K8.int8_linear(x, w_q, torch.ones(n, device=DEVICE)).double(), x.double() @ w_q.double().t())


@pytest.mark.parametrize("k", [5, 300, 4097, 5000])
def test_gpu_tiles_quantizers_bit_exact(gpu_tiles, k):
    # K = 4097 and 5000 take the two-pass path on GPU tiles (rows longer than 4096).
    x = torch.randn(6, k, device=DEVICE) * torch.logspace(-6, 4, 6, device=DEVICE)[:, None]
    x[1, k // 2] = float("nan")
    x[4, 0] = float("-inf")
    _assert_quantized_same(K8.quantize_activation_int8(x), R.quantize_activation_int8(x))
    w = torch.randn(5, k, device=DEVICE) * 3
    _assert_quantized_same(K8.quantize_weight_int8(w), R.quantize_weight_int8(w))
    for per_channel in (False, True):
        _assert_quantized_same(KT.quantize_weight_ternary(w, per_channel), R.quantize_weight_ternary(w, per_channel))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_tiles_float_outputs(gpu_tiles, dtype):
    m, n, k = 20, 50, 300  # 40 rows: the 64-row GPU tile class, with per-channel scales and bias
    x = torch.randn(2, m, k, device=DEVICE).to(dtype)
    bias = torch.randn(n, device=DEVICE).to(dtype)
    packed, scale = R.quantize_weight_ternary(torch.randn(n, k, device=DEVICE), per_channel=True)
    assert_close_to_reference(KT.ternary_matmul(x, packed, scale, bias), R.ternary_matmul(x, packed, scale, bias))
    w_q, w_scale = R.quantize_weight_int8(torch.randn(n, k, device=DEVICE))
    assert_close_to_reference(K8.int8_linear(x, w_q, w_scale, bias), R.int8_linear(x, w_q, w_scale, bias))


def _assert_quantized_same(got, ref):
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(
            a.view(torch.uint8) if a.dtype == torch.int8 else a.nan_to_num(7.0),
            b.view(torch.uint8) if b.dtype == torch.int8 else b.nan_to_num(7.0),
        )
        if a.is_floating_point():
            assert torch.equal(torch.isnan(a), torch.isnan(b))


# ------------------------------------------------------------------ grouped tile order


def test_grouped_tile_order_covers_every_tile(monkeypatch):
    # Small tiles and GROUP_M = 3 over a 7 x 5 tile grid: the last group is partial, and any
    # tile visited twice or never would show up as a wrong or unwritten output.
    small = {"BLOCK_M": 16, "BLOCK_N": 16, "GROUP_M": 3, "num_warps": 4, "num_stages": 1}
    monkeypatch.setattr(K8, "_matmul_config", lambda m, n, k, interp: {**small, "BLOCK_K": 32})
    monkeypatch.setattr(KT, "_matmul_config", lambda m, n, nb, interp: {**small, "BLOCKS_PER_STEP": 1})
    m, n, k = 100, 70, 100
    x = integer_rows(m, k).to(DEVICE)
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEVICE)
    assert torch.equal(K8.int8_linear(x, w_q, torch.ones(n, device=DEVICE)).double(), x.double() @ w_q.double().t())
    wq = torch.randint(-1, 2, (n, k), dtype=torch.int8, device=DEVICE)
    y = KT.ternary_matmul(x, R.pack_ternary(wq), torch.ones(1, device=DEVICE))
    assert torch.equal(y, (x.double() @ wq.double().t()).float())


# ------------------------------------------------------------------ numerics at the edges


def test_activation_ties_round_half_to_even():
    # absmax 127 gives the multiplier 127/127 = 1, so these values are the exact ties.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -125.5, 3.4999998]], device=DEVICE)
    q, s = K8.quantize_activation_int8(x)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126, -126, 3]]
    assert torch.equal(q, R.quantize_activation_int8(x)[0]) and torch.equal(s, R.quantize_activation_int8(x)[1])


def test_ternary_weight_ties_round_half_to_even():
    # mean |w| = 8 / 8 = 1 exactly, so w / scale = w: +-0.5 are ties that round to 0.
    w = torch.tensor([[0.5, -0.5, 1.5, -1.5, 0.5, 1.0, 1.5, 1.0]], device=DEVICE)
    packed, scale = KT.quantize_weight_ternary(w)
    ref_packed, ref_scale = R.quantize_weight_ternary(w)
    assert scale.item() == 1.0
    assert torch.equal(packed, ref_packed) and torch.equal(scale, ref_scale)
    assert KT.unpack_ternary(packed, 8).tolist() == [[0, 0, 1, -1, 0, 1, 1, 1]]


def test_weight_far_above_or_below_scale():
    # One huge weight among zeros (w / scale in the thousands) clamps to 1; a row whose
    # mean |w| is below EPS is divided by the EPS floor instead.
    k = 1 << 12
    w = torch.zeros(2, k, device=DEVICE)
    w[0, 5] = 3.0e30
    w[1, 7] = -1.0e-30  # scale below EPS: the EPS floor applies
    for per_channel in (False, True):
        _assert_quantized_same(KT.quantize_weight_ternary(w, per_channel), R.quantize_weight_ternary(w, per_channel))


def test_nan_and_inf_rows_raise_no_numpy_warnings():
    x = torch.randn(4, 50, device=DEVICE)
    x[1, 3] = float("inf")
    x[2, 4] = float("nan")
    w_q, w_scale = R.quantize_weight_int8(torch.randn(6, 50, device=DEVICE))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = K8.int8_linear(x, w_q, w_scale)
    assert torch.isnan(y[1:3]).all() and torch.isfinite(y[[0, 3]]).all()


def test_int32_accumulation_at_the_extremes():
    k = 4097  # |sum| = 128 * 128 * 4097 ~ 2**26: int32 is exact, fp16 partial sums would not be
    x_q = torch.full((3, k), -128, dtype=torch.int8, device=DEVICE)
    w_q = torch.full((2, k), -128, dtype=torch.int8, device=DEVICE)
    w_q[1] = 127
    y = K8.int8_matmul(x_q, torch.ones(3, 1, device=DEVICE), w_q, torch.ones(2, device=DEVICE))
    assert torch.equal(y, R.int8_matmul(x_q, torch.ones(3, 1, device=DEVICE), w_q, torch.ones(2, device=DEVICE)))
    assert y[0].tolist() == [float(128 * 128 * k), float(torch.tensor(-128 * 127 * k, dtype=torch.float32))]
    x = torch.full((2, k), -127.0, device=DEVICE)
    wq = torch.full((3, k), -1, dtype=torch.int8, device=DEVICE)
    assert (KT.ternary_matmul(x, R.pack_ternary(wq), torch.ones(1, device=DEVICE)) == 127.0 * k).all()


def test_k_zero():
    # The reference's reshape(-1, 0) cannot run K = 0; the kernels' empty K loop gives
    # 0 * x_scale * w_scale + bias, which is what the reference's formula means.
    n = 5
    bias = torch.randn(n, device=DEVICE)
    x_q = torch.zeros(2, 3, 0, dtype=torch.int8, device=DEVICE)
    x_scale = torch.rand(2, 3, 1, device=DEVICE)
    x_scale[1, 2] = float("nan")
    w_scale = torch.rand(n, device=DEVICE)
    y = K8.int8_matmul(x_q, x_scale, torch.zeros(n, 0, dtype=torch.int8, device=DEVICE), w_scale, bias)
    assert y.shape == (2, 3, n)
    assert torch.equal(y[0], bias.expand(3, n)) and torch.isnan(y[1, 2]).all()
    y = K8.int8_linear(
        torch.zeros(4, 0, device=DEVICE).half(),
        torch.zeros(n, 0, dtype=torch.int8, device=DEVICE),
        w_scale,
        bias.half(),
    )
    assert y.dtype == torch.float16 and torch.equal(y, bias.half().expand(4, n))
    y = KT.ternary_matmul(
        torch.zeros(3, 0, device=DEVICE),
        torch.zeros(n, 0, dtype=torch.uint8, device=DEVICE),
        torch.ones(1, device=DEVICE),
        bias,
    )
    assert torch.equal(y, bias.expand(3, n))
    _assert_quantized_same(
        K8.quantize_activation_int8(torch.zeros(2, 0, device=DEVICE)),
        R.quantize_activation_int8(torch.zeros(2, 0, device=DEVICE)),
    )


def test_strided_operands():
    k, n = 300, 24
    w = torch.randn(k, n, device=DEVICE).t()  # [n, k], column-major
    _assert_quantized_same(KT.quantize_weight_ternary(w, True), R.quantize_weight_ternary(w.contiguous(), True))
    _assert_quantized_same(K8.quantize_weight_int8(w), R.quantize_weight_int8(w.contiguous()))
    wq = torch.randint(-1, 2, (k, n), dtype=torch.int8, device=DEVICE).t()
    assert torch.equal(KT.pack_ternary(wq), R.pack_ternary(wq.contiguous()))
    wide = torch.randint(0, 255, (n, 3 * packed_cols(k)), dtype=torch.uint8, device=DEVICE)
    packed = wide[:, : packed_cols(k)]  # a column slice of a wider buffer: row stride != width
    assert torch.equal(KT.unpack_ternary(packed, k), R.unpack_ternary(packed.contiguous(), k))
    x = torch.randn(7, 2 * k, device=DEVICE)[:, ::2]
    scale = torch.rand(n, device=DEVICE)
    assert_close_to_reference(
        KT.ternary_matmul(x, packed, scale), R.ternary_matmul(x.contiguous(), packed.contiguous(), scale)
    )
    w_q = torch.randint(-127, 128, (k, n), dtype=torch.int8, device=DEVICE).t()
    x_q = torch.randint(-127, 128, (k, 7), dtype=torch.int8, device=DEVICE).t()
    x_scale = torch.rand(1, 7, device=DEVICE).t()
    w_scale = torch.rand(2 * n, device=DEVICE)[::2]
    bias = torch.randn(3 * n, device=DEVICE)[::3]
    assert_close_to_reference(
        K8.int8_matmul(x_q, x_scale, w_q, w_scale, bias),
        R.int8_matmul(
            x_q.contiguous(), x_scale.contiguous(), w_q.contiguous(), w_scale.contiguous(), bias.contiguous()
        ),
    )


# ------------------------------------------------------------------ GPU compilation

_COMPILE_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from accelops.kernels import int8 as K8, ternary as KT

def compile_for(arch, kernel, pointers, ints, cfg):
    # What a launch on contiguous, 16-byte aligned tensors specializes: ints equal to 1 become
    # constants, pointers and ints divisible by 16 carry the divisibility hint.
    cfg = dict(cfg)
    opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in cfg:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name], attrs[(i,)] = pointers[name], [["tt.divisibility", 16]]
        elif ints[name] == 1:
            sig[name], cfg[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=sig, constexprs=cfg, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts).asm["ptx"]

def compile_all(arch, m, n=4096, k=4096, everything=True):
    scales = {"xs_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": "*bf16", "y_ptr": "*bf16"}
    ptx = {
        "int8_matmul": compile_for(arch, K8._int8_matmul_kernel, {"a_ptr": "*i8", "b_ptr": "*i8", **scales},
            dict(M=m, N=n, K=k, stride_am=k, stride_ak=1, stride_bn=k, stride_bk=1, stride_xs=1, stride_ws=1,
                 stride_ym=n, stride_yn=1), {**K8._matmul_config(m, n, k, False), "HAS_BIAS": True}),
        "ternary_matmul": compile_for(arch, KT._ternary_matmul_kernel, {"a_ptr": "*i8", "p_ptr": "*u8", **scales},
            dict(M=m, N=n, K=k, NBLOCKS=k // 128, stride_am=k, stride_ak=1, stride_pn=k // 4, stride_pc=1,
                 stride_xs=1, stride_ws=1, stride_ym=n, stride_yn=1),
            {**KT._matmul_config(m, n, k // 128, False), "HAS_BIAS": True}),
    }
    if everything:
        ptx["quantize_rows"] = compile_for(arch, K8._quantize_rows_int8_kernel,
            {"x_ptr": "*bf16", "q_ptr": "*i8", "scale_ptr": "*fp32"},
            dict(M=m, K=k, stride_xm=k, stride_xk=1, stride_qm=k, stride_qk=1), K8._quantize_config(m, k, False))
        b = KT._bytes_config(n, k // 4, False)
        ints = dict(N=n, K=k, NBYTES=k // 4, stride_wn=k, stride_wk=1, stride_on=k // 4, stride_s=1,
                    stride_pn=k // 4, stride_pc=1)
        ptx["pack"] = compile_for(arch, KT._pack_ternary_kernel, {"wq_ptr": "*i8", "out_ptr": "*u8"}, ints, b)
        ptx["unpack"] = compile_for(arch, KT._unpack_ternary_kernel, {"p_ptr": "*u8", "out_ptr": "*i8"}, ints, b)
        ptx["quantize_pack"] = compile_for(arch, KT._quantize_pack_ternary_kernel,
                                           {"w_ptr": "*fp16", "scale_ptr": "*fp32", "out_ptr": "*u8"}, ints, b)
    return {name: {"int8_mma": ".s32.s8.s8" in p, "div_rn": "div.rn.f32" in p,
                   "div_approx": "div.approx" in p or "div.full" in p, "fma": "fma.rn.f32" in p,
                   "cp_async": "cp.async" in p}
            for name, p in ptx.items()}

# H100 with large-M tiles (wgmma) for every kernel; A100 with the decode tiles for the GEMMs.
json.dump({"sm90": compile_all(90, 4096), "sm80-decode": compile_all(80, 1, everything=False)}, sys.stdout)
"""


def test_kernels_compile_for_gpus(tmp_path):
    """No GPU here, but Triton's own compiler (and its bundled ptxas) runs on the CPU: every
    kernel must lower to a cubin with the GPU tile sizes, and the PTX must show the choices
    the exactness rests on (int8 MMA with int32 accumulation, IEEE division, no FMA folded
    into the quantizer's rounding)."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    both = json.loads(run.stdout)
    for target, info in both.items():
        for name in ("int8_matmul", "ternary_matmul"):
            assert info[name]["int8_mma"], f"{target} {name} should use an s8 x s8 -> s32 MMA"
            assert info[name]["cp_async"], f"{target} {name}'s K loop should be software-pipelined"
    info = both["sm90"]
    for name in ("quantize_rows", "quantize_pack"):
        assert info[name]["div_rn"] and not info[name]["div_approx"], f"{name} must divide with IEEE rounding"
    assert not info["quantize_rows"]["fma"], "an FMA in the quantizer would round once where the reference rounds twice"


# --------------------------------------------------------------------------- tuned GEMM configs
# `accelops tune --device cuda` times the GEMMs under each configuration of
# matmul_config_grid; the table sets the winner with matmul_config. No configuration may
# change a result (the interpreter runs the block sizes; warps and stages are GPU-only).


def _distinct_tiles(kind, m):
    k_key = "BLOCK_K" if kind == "int8" else "BLOCKS_PER_STEP"
    seen = {}
    for cfg in K8.matmul_config_grid(kind, m):
        seen.setdefault((cfg["BLOCK_M"], cfg["BLOCK_N"], cfg[k_key]), cfg)
    return list(seen.values())


@pytest.mark.parametrize("kind", ["int8", "ternary"])
@pytest.mark.parametrize("m", [1, 40, 130])
def test_every_tuned_gemm_config_gives_the_same_bits(kind, m):
    torch.manual_seed(m)
    n, k = 70, 300
    x, w = torch.randn(m, k, device=DEVICE), torch.randn(n, k, device=DEVICE)
    bias = torch.randn(n, device=DEVICE)
    if kind == "int8":
        wq, ws = K8.quantize_weight_int8(w)
        run = lambda: K8.int8_linear(x, wq, ws, bias)  # noqa: E731
    else:
        wp, ws = KT.quantize_weight_ternary(w)
        run = lambda: KT.ternary_matmul(x, wp, ws, bias)  # noqa: E731
    want = run()
    configs = _distinct_tiles(kind, m)
    assert len(configs) >= 4
    for cfg in configs:
        with K8.matmul_config(kind, cfg):
            assert K8.tuned_config(kind) == cfg
            got = run()
        assert K8.tuned_config(kind) is None  # restored
        assert torch.equal(got, want), cfg


def test_tuned_gemm_config_is_the_one_launched(spies):
    torch.manual_seed(0)
    x, w = torch.randn(20, 64, device=DEVICE), torch.randn(100, 64, device=DEVICE)
    wq, ws = K8.quantize_weight_int8(w)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=3)
    with K8.matmul_config("int8", cfg):
        K8.int8_linear(x, wq, ws)
    assert spies["_int8_matmul_kernel"].grids[-1] == (triton.cdiv(20, 16) * triton.cdiv(100, 32),)


@pytest.mark.parametrize(
    "cfg,match",
    [
        (dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4), "exactly the keys"),
        (dict(BLOCK_M=8, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=3), "BLOCK_M must be one of"),
        (dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=3), "BLOCK_K must be one of"),
        (dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=3, num_stages=3), "num_warps must be one of"),
        (dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=True), "num_stages must be"),
        ("fast", "exactly the keys"),
    ],
)
def test_bad_gemm_configs_are_refused(cfg, match):
    with pytest.raises(ValueError, match=match):
        with K8.matmul_config("int8", cfg):
            pass
    assert K8.tuned_config("int8") is None


def test_dispatch_sets_a_tables_gemm_config_only_for_cuda_tensors():
    from accelops.ops import _tuning

    cfg = K8.matmul_config_grid("int8", 1)[0]
    choice = _tuning.Choice("native", None, config=("int8", tuple(sorted(cfg.items()))))

    class CudaLike:  # the device check is all call_with reads of the tensor
        device = torch.device("cuda")

    seen = []
    _tuning.call_with(choice, lambda *a: seen.append(K8.tuned_config("int8")), CudaLike())
    _tuning.call_with(choice, lambda *a: seen.append(K8.tuned_config("int8")), torch.zeros(1))
    assert seen == [cfg, None] and K8.tuned_config("int8") is None
    table = _tuning.DispatchTable.from_json(
        {
            "entries": [
                {
                    "op": "int8_linear",
                    "shape": {"M": 1, "N": 8, "K": 8},
                    "winner": {"backend": "native", "threads": None, "config": cfg},
                }
            ]
        },
        "fp",
    )
    assert table.lookup("int8_linear", (1, 8, 8)).config == choice.config
    assert table.lookup("int8_linear", (2, 8, 8)).config == choice.config  # predicted


def test_tune_triton_candidates_exclude_failing_configs():
    from accelops.tune import _triton_configs, measure

    torch.manual_seed(0)
    x, w = torch.randn(1, 64, device=DEVICE), torch.randn(24, 64, device=DEVICE)
    wq, ws = K8.quantize_weight_int8(w)

    def native():
        cfg = K8.tuned_config("int8")
        if cfg is not None and cfg["BLOCK_N"] == 32:
            raise RuntimeError("out of resources: shared memory")
        return K8.int8_linear(x, wq, ws)

    excluded = {}
    got = _triton_configs("int8_linear", {"M": 1, "N": 24, "K": 64}, native, excluded)
    grid = K8.matmul_config_grid("int8", 1)
    assert [c[3] for c in got] == [c for c in grid if c["BLOCK_N"] != 32]
    assert len(excluded) == sum(c["BLOCK_N"] == 32 for c in grid)
    assert all("out of resources" in why for why in excluded.values())
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            measure("int8_linear", {"M": 1, "N": 8, "K": 8}, device="cuda")
