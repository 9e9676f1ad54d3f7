"""8-bit optimizers (accelops.optim, accelops.ops.optim): every backend bit-identical to the
reference (codes, scales, parameters), the quantization maps, opcheck, the optimizers'
semantics (vs torch.optim where the states are fp32), state_dict round trips, bad input,
NaN containment, FSDP2 and ZeRO-1 on 2 gloo ranks, and convergence."""

import copy
import datetime
import io

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accelops import ops
from accelops.ops import optim as O
from accelops.optim import AdamW8bit, SGD8bit
from accelops.reference import optim as R

from .conftest import isa_skip_reason, use_backend
from .helpers import run_forked_ranks

# "cpu" is the widest path this CPU has (AVX-512 on an AVX-512 machine); "cpu-avx2" and
# "cpu-scalar" force the narrower ones through ACCELOPS_CPU_ISA (skipped where they would
# repeat "cpu" or the CPU cannot run them).
KERNEL_BACKENDS = ["cpu", "cpu-avx2", "cpu-scalar", "triton"]
RUNNABLE_BACKENDS = [b for b in KERNEL_BACKENDS if isa_skip_reason(b) is None]
SIZES = [1, 7, 255, 256, 257, 1000, 4097, 70_001]
HYP = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, with every NaN made one pattern (payloads may differ)."""
    if t.is_floating_point():
        t = torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t)
        return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])
    return t


def assert_same(a: torch.Tensor, b: torch.Tensor, what=""):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(_bits(a), _bits(b)), f"{what}: {(_bits(a) != _bits(b)).sum().item()} elements differ"


def _use(monkeypatch, backend_name: str) -> None:
    reason = isa_skip_reason(backend_name)
    if reason:
        pytest.skip(reason)
    use_backend(monkeypatch, backend_name)


def _adam_run(n, dtype, bs, steps, seed, scale=0.1, wd=0.01, impl=None):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen).to(dtype)
    mc, ma = O.new_state(p, bs)
    vc, va = O.new_state(p, bs)
    for t in range(1, steps + 1):
        g = (torch.randn(n, generator=gen) * scale * (1 + t)).to(dtype)
        if impl is None:
            s = R.adamw_scalars(3e-3, 0.9, 0.999, 1e-8, wd, t)
            R.adamw8bit_step_(p, g, mc, ma, vc, va, R.signed_map(), R.unsigned_map(), s, bs)
        else:
            ops.adamw8bit_step_(
                p, g, mc, ma, vc, va, lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd, step=t, block_size=bs
            )
    return p, mc, ma, vc, va


def _sgd_run(n, dtype, bs, steps, seed, nesterov, dampening, wd, impl=None):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen).to(dtype)
    c, a = O.new_state(p, bs)
    for t in range(1, steps + 1):
        g = (torch.randn(n, generator=gen) * 0.1).to(dtype)
        if impl is None:
            R.sgd8bit_step_(p, g, c, a, R.signed_map(), 0.05, 0.9, dampening, wd, nesterov, t == 1, bs)
        else:
            ops.sgd8bit_step_(
                p,
                g,
                c,
                a,
                lr=0.05,
                momentum=0.9,
                dampening=dampening,
                weight_decay=wd,
                nesterov=nesterov,
                first=t == 1,
                block_size=bs,
            )
    return p, c, a


# =========================================================================== maps


@pytest.mark.parametrize("signed", [True, False])
def test_map_properties(signed):
    q = R.dynamic_map(signed)
    assert q.dtype == torch.float32 and q.numel() == 256
    assert bool((q[1:] > q[:-1]).all())
    assert float(q[-1]) == 1.0 and 0.0 in q.tolist()
    if signed:
        assert float(q[0]) == -1.0
        # symmetric except the smallest positive magnitude
        pos = q[q > 0]
        assert torch.equal(-q[q < 0].flip(0), pos[1:])
    else:
        assert float(q[0]) == 0.0
    # dynamic: relative spacing is bounded across 6+ decades (a linear map would be 1 / 127
    # absolute), and the finest steps are next to 1
    mags = q[q > 0].double()
    assert float(mags.min()) < 1e-6
    rel = (mags[1:] - mags[:-1]) / mags[1:]
    assert float(rel[-20:].max()) < 0.02
    # each code quantizes to itself, and the thresholds separate neighbours
    codes, absmax = R.quantize_blockwise(q, q, block_size=256)
    assert torch.equal(codes.long(), torch.arange(256))
    t = R.thresholds(q)
    assert bool(((t > q[:-1]) & (t < q[1:])).all())


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_is_nearest_code_with_ties_down(signed):
    q = R.dynamic_map(signed)
    lo = -1.0 if signed else 0.0
    x = torch.rand(20000, dtype=torch.float64).to(torch.float32) * (1 - lo) + lo
    x[0] = 1.0  # absmax 1: x is quantized as it is
    codes, _ = R.quantize_blockwise(x, q, block_size=x.numel() if False else 32768)
    err = (x[:, None].double() - q[None, :].double()).abs()
    best = err.min(dim=1).values
    chosen = err.gather(1, codes.long()[:, None])[:, 0]
    assert bool((chosen <= best + 1e-7 * x.abs().double() + 1e-12).all())
    # exactly on a threshold: the lower code
    t = R.thresholds(q)
    on = torch.cat([torch.ones(1), t])
    c, _ = R.quantize_blockwise(on, q, block_size=256)
    assert torch.equal(c[1:].long(), torch.arange(255))


def test_quantize_roundtrip_error_is_relative():
    x = torch.randn(256 * 64) * torch.logspace(-4, 0, 256 * 64)
    codes, absmax = R.quantize_blockwise(x, R.signed_map())
    y = R.dequantize_blockwise(codes, absmax, R.signed_map())
    blocks = x.view(-1, 256)
    rel = (y - x).view(-1, 256).abs() / blocks.abs().amax(1, keepdim=True)
    assert float(rel.max()) < 0.01  # at most ~half the top decade's step of the block absmax


# =========================================================================== backends vs reference


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_adamw_step_matches_reference(monkeypatch, backend_name, dtype):
    _use(monkeypatch, backend_name)
    for n in SIZES:
        bs = 256 if n != 1000 else 64
        want = _adam_run(n, dtype, bs, 3, n)
        got = _adam_run(n, dtype, bs, 3, n, impl="ops")
        for name, a, b in zip(("param", "m_codes", "m_absmax", "v_codes", "v_absmax"), got, want):
            assert_same(a, b, f"n={n} {name}")


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("nesterov,dampening,wd", [(False, 0.0, 0.0), (True, 0.0, 1e-2), (False, 0.3, 1e-3)])
def test_sgd_step_matches_reference(monkeypatch, backend_name, nesterov, dampening, wd):
    _use(monkeypatch, backend_name)
    for dtype in (torch.float32, torch.bfloat16):
        for n in SIZES:
            want = _sgd_run(n, dtype, 256, 3, n, nesterov, dampening, wd)
            got = _sgd_run(n, dtype, 256, 3, n, nesterov, dampening, wd, impl="ops")
            for name, a, b in zip(("param", "codes", "absmax"), got, want):
                assert_same(a, b, f"n={n} {dtype} {name}")


@HYP
@given(
    n=st.one_of(st.sampled_from([1, 255, 256, 257, 513, 4095]), st.integers(1, 20_000)),
    log_bs=st.integers(0, 11),
    seed=st.integers(0, 2**16),
    log_scale=st.integers(-12, 4),
)
def test_adamw_hypothesis_all_backends(monkeypatch, n, log_bs, seed, log_scale):
    bs = 2**log_bs
    want = _adam_run(n, torch.float32, bs, 2, seed, scale=10.0**log_scale)
    for b in RUNNABLE_BACKENDS:
        use_backend(monkeypatch, b)
        got = _adam_run(n, torch.float32, bs, 2, seed, scale=10.0**log_scale, impl="ops")
        for name, x, y in zip(("param", "m_codes", "m_absmax", "v_codes", "v_absmax"), got, want):
            assert_same(x, y, f"{b} n={n} bs={bs} {name}")


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("signed", [True])
def test_quantization_edges_exact(monkeypatch, backend_name, signed):
    """SGD's first step with lr=0 stores quantize(grad): feed it every threshold, its float
    neighbours, +-0, tiny and huge values, with absmax 1 so x is the value itself."""
    _use(monkeypatch, backend_name)
    q = R.signed_map()
    t = R.thresholds(q)
    inf = torch.tensor(float("inf"))
    vals = torch.cat(
        [
            t,
            torch.nextafter(t, inf),
            torch.nextafter(t, -inf),
            q,
            torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-45, 0.99999994, -0.99999994]),
        ]
    )
    blocks = vals.split(255)
    g = torch.cat([torch.cat([torch.ones(1), b, torch.zeros(255 - b.numel())]) for b in blocks])
    p = torch.zeros_like(g)
    c, a = O.new_state(p)
    ops.sgd8bit_step_(p, g, c, a, lr=0.0, momentum=0.9, first=True)
    want_c, want_a = R.quantize_blockwise(g, q)
    assert_same(c, want_c, "codes")
    assert_same(a, want_a, "absmax")


def _first_step_matches_reference(g: torch.Tensor) -> None:
    """One AdamW8bit step from zero states with beta1 = beta2 = 0 (so each state quantizes g
    or g^2 as is), blocks of 256: states and parameter bit for bit as the reference's."""
    got, want = torch.zeros_like(g), torch.zeros_like(g)
    states = [O.new_state(g) + O.new_state(g) for _ in range(2)]
    ops.adamw8bit_step_(got, g, *states[0], lr=1e-3, beta1=0.0, beta2=0.0, eps=1e-8, weight_decay=0.0, step=1)
    s = R.adamw_scalars(1e-3, 0.0, 0.0, 1e-8, 0.0, 1)
    R.adamw8bit_step_(want, g, *states[1], R.signed_map(), R.unsigned_map(), s, 256)
    for name, a, b in zip(("m_codes", "m_absmax", "v_codes", "v_absmax"), states[0], states[1]):
        assert_same(a, b, name)
    assert_same(got, want, "param")


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_unsigned_quantization_edges_exact(monkeypatch, backend_name):
    """AdamW with beta2 = 0 stores quantize(g * g) as v: feed gradients whose squares land on
    and around every threshold of the unsigned map (absmax 1 in every block)."""
    _use(monkeypatch, backend_name)
    t = R.thresholds(R.unsigned_map()).double().sqrt().to(torch.float32)
    inf = torch.tensor(float("inf"))
    vals = torch.cat([t, torch.nextafter(t, inf), torch.nextafter(t, -inf), -t, torch.tensor([0.0, -0.0, 1e-30])])
    blocks = vals.split(255)
    g = torch.cat([torch.cat([torch.ones(1), b, torch.zeros(255 - b.numel())]) for b in blocks])
    _first_step_matches_reference(g)


def _float_bits_in(lo_bits: int, hi_bits: int):
    """Floats drawn uniformly over their bit patterns (every exponent equally likely)."""
    return st.integers(lo_bits, hi_bits).map(lambda b: float(torch.tensor(b, dtype=torch.int32).view(torch.float32)))


def _near_thresholds(qmap: torch.Tensor):
    """A threshold of the map moved by -3..3 ulps, with either sign."""
    t = R.thresholds(qmap)

    def move(i, k, neg):
        x = t[i : i + 1]
        for _ in range(abs(k)):
            x = torch.nextafter(x, torch.tensor(float("inf") if k > 0 else -float("inf")))
        return float(-x if neg else x)

    return st.builds(move, st.integers(0, 254), st.integers(-3, 3), st.booleans())


# |x| <= 1 as bit patterns: 0x3F800000 is 1.0; the sign is drawn apart
_UNIT_FLOAT = st.builds(lambda x, neg: -x if neg else x, _float_bits_in(0, 0x3F800000), st.booleans())


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@given(vals=st.lists(st.one_of(_UNIT_FLOAT, _near_thresholds(R.signed_map())), min_size=1, max_size=600))
@HYP
def test_signed_codes_hypothesis(monkeypatch, backend_name, vals):
    """The code search (the AVX-512 path's fitted guess plus one compare, the others' table)
    against the reference's nearest code with ties down, on values spread over every exponent
    and within a few ulps of the thresholds: SGD's first step with lr=0 stores quantize(grad),
    and each block of 255 starts with 1.0 so its absmax is 1 and x is the value itself."""
    _use(monkeypatch, backend_name)
    v = torch.tensor(vals, dtype=torch.float32)
    blocks = v.split(255)
    g = torch.cat([torch.cat([torch.ones(1), b, torch.zeros(255 - b.numel())]) for b in blocks])
    p = torch.zeros_like(g)
    c, a = O.new_state(p)
    ops.sgd8bit_step_(p, g, c, a, lr=0.0, momentum=0.9, first=True)
    want_c, want_a = R.quantize_blockwise(g, R.signed_map())
    assert_same(c, want_c, "codes")
    assert_same(a, want_a, "absmax")


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@given(
    vals=st.lists(st.one_of(_UNIT_FLOAT, _near_thresholds(R.unsigned_map())), min_size=1, max_size=600),
    absmax=st.sampled_from([1.0, 3.0, 1e-20, 7e30]),
)
@HYP
def test_unsigned_codes_hypothesis(monkeypatch, backend_name, vals, absmax):
    """The same for the unsigned map (second moment): AdamW with beta2 = 0 stores
    quantize(g * g), so g = sqrt(|value|) * sqrt(absmax), with each block's absmax pinned by a
    first element sqrt(absmax) (the division then has real work to do)."""
    _use(monkeypatch, backend_name)
    scale = torch.tensor(absmax, dtype=torch.float64).sqrt()
    v = (torch.tensor(vals, dtype=torch.float64).abs().sqrt() * scale).to(torch.float32)
    blocks = v.split(255)
    g = torch.cat([torch.cat([scale.to(torch.float32).view(1), b, torch.zeros(255 - b.numel())]) for b in blocks])
    _first_step_matches_reference(g)


_OTHER_MAPS = {
    # evenly spaced: one line an octave fits everywhere
    "linear": torch.linspace(-1, 1, 256),
    # starts at 0: the AVX-512 search's unsigned variant
    "linear unsigned": torch.linspace(0, 1, 256),
    # dense near 0, sparse near +-1
    "cubic": torch.linspace(-1, 1, 256) ** 3,
    # the signed dynamic map at half scale: its decade bends move to other octaves
    "dynamic / 2": R.signed_map() * 0.5,
    # values beyond +-1: the AVX-512 search rejects it (it assumes a map inside [-1, 1])
    "wide": torch.linspace(-2, 2, 256),
}


@pytest.mark.parametrize("backend_name", [b for b in KERNEL_BACKENDS if b != "triton"])
@pytest.mark.parametrize("map_name", list(_OTHER_MAPS))
@given(data=st.data())
@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_other_maps_codes_hypothesis(monkeypatch, backend_name, map_name, data):
    """The C++ op takes any strictly increasing map: ones the AVX-512 search can fit use it,
    the rest keep the table; both give the reference's codes. SGD's first step with lr = 0
    stores quantize(grad) with the op's map (absmax 1 in every block)."""
    _use(monkeypatch, backend_name)
    qmap = _OTHER_MAPS[map_name].to(torch.float32).contiguous()
    vals = data.draw(st.lists(st.one_of(_UNIT_FLOAT, _near_thresholds(qmap)), min_size=1, max_size=600))
    v = torch.tensor(vals, dtype=torch.float32)
    g = torch.cat([torch.cat([torch.ones(1), b, torch.zeros(255 - b.numel())]) for b in v.split(255)])
    p = torch.zeros_like(g)
    c, a = O.new_state(p)
    torch.ops.accelops.sgd8bit_step_(p, g, c, a, qmap, 0.0, 0.9, 0.0, 0.0, False, True, 256)
    want_c, want_a = R.quantize_blockwise(g, qmap)
    assert_same(c, want_c, "codes")
    assert_same(a, want_a, "absmax")


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_special_values_match_reference(monkeypatch, backend_name):
    """Infinities, subnormals, signed zeros and huge values in the gradient, in blocks of every
    tail length, match the reference bit for bit (NaN where it gives NaN)."""
    _use(monkeypatch, backend_name)
    special = torch.tensor([float("inf"), -float("inf"), 1e-45, -1e-45, 0.0, -0.0, 3e38, -3e38, 1e-39, 2.5])
    for n in (1, 15, 16, 17, 33, 300):
        g = special.repeat(-(-n // special.numel()))[:n].clone()
        g[n // 2 :] *= 1e-3  # a second block (bs 16) with a different absmax
        for kernel in (True, False):
            p = torch.linspace(-1, 1, n)
            mc, ma = O.new_state(p, 16)
            vc, va = O.new_state(p, 16)
            c, a = O.new_state(p, 16)
            q = p.clone()
            for t in (1, 2):
                if kernel:
                    ops.adamw8bit_step_(
                        p,
                        g,
                        mc,
                        ma,
                        vc,
                        va,
                        lr=1e-2,
                        beta1=0.9,
                        beta2=0.99,
                        eps=1e-8,
                        weight_decay=0.1,
                        step=t,
                        block_size=16,
                    )
                    ops.sgd8bit_step_(q, g, c, a, lr=1e-2, momentum=0.9, weight_decay=0.1, first=t == 1, block_size=16)
                else:
                    s = R.adamw_scalars(1e-2, 0.9, 0.99, 1e-8, 0.1, t)
                    R.adamw8bit_step_(p, g, mc, ma, vc, va, R.signed_map(), R.unsigned_map(), s, 16)
                    R.sgd8bit_step_(q, g, c, a, R.signed_map(), 1e-2, 0.9, 0.0, 0.1, False, t == 1, 16)
            if kernel:
                got = (p, mc, ma, vc, va, q, c, a)
            else:
                want = (p, mc, ma, vc, va, q, c, a)
        for name, x, y in zip(
            ("param", "m_codes", "m_absmax", "v_codes", "v_absmax", "sgd param", "codes", "absmax"), got, want
        ):
            assert_same(x, y, f"n={n} {name}")


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_empty_tensors(monkeypatch, backend_name):
    _use(monkeypatch, backend_name)
    p, g = torch.empty(0), torch.empty(0)
    mc, ma = O.new_state(p)
    vc, va = O.new_state(p)
    ops.adamw8bit_step_(p, g, mc, ma, vc, va, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    ops.sgd8bit_step_(p, g, mc, ma, lr=1e-3, momentum=0.9, first=True)
    assert mc.numel() == 0 and ma.numel() == 0
    # an empty parameter among others: the others still step
    w, e = nn.Parameter(torch.ones(5000)), nn.Parameter(torch.empty(0, 3))
    w.grad, e.grad = torch.ones(5000), torch.empty(0, 3)
    for opt in (AdamW8bit([w, e], lr=0.1), SGD8bit([w, e], lr=0.1, momentum=0.9)):
        before = w.detach().clone()
        opt.step()
        assert bool((w < before).all()) and e.shape == (0, 3)


@pytest.mark.parametrize("backend_name", ["reference"] + KERNEL_BACKENDS)
def test_nan_stays_in_its_block(monkeypatch, backend_name):
    _use(monkeypatch, backend_name)
    n, bs = 1024, 256
    p = torch.randn(n)
    mc, ma = O.new_state(p, bs)
    vc, va = O.new_state(p, bs)
    g = torch.randn(n)
    g[300] = float("nan")  # block 1
    ops.adamw8bit_step_(p, g, mc, ma, vc, va, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    assert torch.isnan(p[300]) and int(torch.isnan(p).sum()) == 1
    assert torch.isnan(ma[1]) and torch.isnan(va[1]) and bool(torch.isfinite(ma[[0, 2, 3]]).all())
    ops.adamw8bit_step_(
        p, torch.randn(n), mc, ma, vc, va, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=2
    )
    nan = torch.isnan(p)
    assert bool(nan[256:512].all()) and not bool(nan[:256].any()) and not bool(nan[512:].any())


def test_opcheck():
    A = torch.ops.accelops
    for n in (1, 300, 1024):
        p = torch.randn(n)
        g = torch.randn(n)
        mc, ma = O.new_state(p, 128)
        vc, va = O.new_state(p, 128)
        s = R.adamw_scalars(1e-3, 0.9, 0.999, 1e-8, 0.01, 1)
        torch.library.opcheck(
            A.adamw8bit_step_.default,
            (
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
            ),
        )
        c, a = O.new_state(p, 128)
        torch.library.opcheck(
            A.sgd8bit_step_.default,
            (
                p.to(torch.bfloat16),
                g.to(torch.bfloat16),
                c,
                a,
                O.qmap(True, "cpu"),
                0.1,
                0.9,
                0.0,
                0.01,
                True,
                False,
                128,
            ),
        )


def test_ops_bad_input():
    p = torch.randn(300)
    mc, ma = O.new_state(p)
    vc, va = O.new_state(p)
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    with pytest.raises(ValueError, match="block_size must be a positive power of two"):
        ops.adamw8bit_step_(p, p.clone(), mc, ma, vc, va, block_size=100, **kw)
    with pytest.raises(TypeError, match="block_size must be an int"):
        ops.adamw8bit_step_(p, p.clone(), mc, ma, vc, va, block_size=256.0, **kw)
    with pytest.raises(TypeError, match="param must be float32"):
        ops.adamw8bit_step_(p.long(), p.long(), mc, ma, vc, va, **kw)
    with pytest.raises(TypeError, match="grad must have param's dtype"):
        ops.adamw8bit_step_(p, p.double(), mc, ma, vc, va, **kw)
    with pytest.raises(ValueError, match="m_absmax must be contiguous with"):
        ops.adamw8bit_step_(p, p.clone(), mc, ma[:1], vc, va, **kw)
    with pytest.raises(TypeError, match="m_codes must be torch.uint8"):
        ops.adamw8bit_step_(p, p.clone(), mc.to(torch.int8), ma, vc, va, **kw)
    with pytest.raises(ValueError, match="step must be an int >= 1"):
        ops.adamw8bit_step_(p, p.clone(), mc, ma, vc, va, **{**kw, "step": 0})
    with pytest.raises(RuntimeError, match="block_size must be a positive power of two"):
        torch.ops.accelops.sgd8bit_step_(
            p, p.clone(), mc, ma, O.qmap(True, "cpu"), 0.1, 0.9, 0.0, 0.0, False, False, 96
        )


# =========================================================================== the optimizers


def _mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 1)).to(dtype)


def _data(seed=0, n=512):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=gen)
    w = torch.randn(64, 1, generator=gen) / 8
    y = torch.sin(x @ w * 3) + 0.1 * (x[:, :1] ** 2)
    return x, y


def _train(model, opt, steps, x, y, batch=64):
    losses = []
    for i in range(steps):
        j = (i * batch) % x.shape[0]
        xb, yb = x[j : j + batch].to(next(model.parameters()).dtype), y[j : j + batch]
        loss = (model(xb).float() - yb).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_adamw8bit_fp32_states_match_torch_adamw(monkeypatch, backend_name):
    """With fp32 states (min_8bit_size above every tensor) the update is torch's AdamW, up to
    rounding order (torch fuses the last division into addcdiv)."""
    use_backend(monkeypatch, backend_name)
    x, y = _data()
    a, b = _mlp(), _mlp()
    _train(a, torch.optim.AdamW(a.parameters(), lr=1e-3, weight_decay=0.05), 20, x, y)
    _train(b, AdamW8bit(b.parameters(), lr=1e-3, weight_decay=0.05, min_8bit_size=10**9), 20, x, y)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-6)


def test_sgd8bit_fp32_states_match_torch_sgd():
    x, y = _data()
    for kw in (
        dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
        dict(momentum=0.9, dampening=0.2),
        dict(momentum=0.0),
    ):
        a, b = _mlp(), _mlp()
        _train(a, torch.optim.SGD(a.parameters(), lr=0.01, **kw), 20, x, y)
        _train(b, SGD8bit(b.parameters(), lr=0.01, min_8bit_size=10**9, **kw), 20, x, y)
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pb, pa, rtol=1e-5, atol=1e-6)


def test_state_layout_and_bytes():
    model = _mlp()
    opt = AdamW8bit(model.parameters(), lr=1e-3)
    x, y = _data()
    _train(model, opt, 1, x, y)
    big = model[0].weight  # 8192 elements -> 8-bit
    small = model[0].bias  # 128 -> fp32
    st = opt.state[big]
    assert st["m_codes"].dtype == torch.uint8 and st["m_codes"].numel() == big.numel()
    assert st["m_absmax"].dtype == torch.float32 and st["m_absmax"].numel() == big.numel() // 256
    assert opt.state[small]["exp_avg"].dtype == torch.float32
    ref = torch.optim.AdamW([nn.Parameter(torch.randn(1 << 20))])
    one = AdamW8bit([nn.Parameter(torch.randn(1 << 20))])
    for o in (ref, one):
        o.param_groups[0]["params"][0].grad = torch.randn(1 << 20)
        o.step()
    ref_bytes = sum(
        v.numel() * v.element_size()
        for s in ref.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.dim() > 0
    )
    assert one.state_bytes() / ref_bytes <= 0.27


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [AdamW8bit, SGD8bit])
def test_state_dict_roundtrip_continues_bit_identically(cls, dtype):
    x, y = _data()
    kw = dict(lr=1e-3, weight_decay=0.01) if cls is AdamW8bit else dict(lr=0.01, momentum=0.9, nesterov=True)
    a = _mlp(dtype=dtype)
    opt_a = cls(a.parameters(), min_8bit_size=1000, **kw)
    _train(a, opt_a, 5, x, y)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b = _mlp(seed=1, dtype=dtype)
    b.load_state_dict(saved["model"])
    opt_b = cls(b.parameters(), min_8bit_size=1000, **kw)
    opt_b.load_state_dict(saved["opt"])
    for pa, pb in zip(a.parameters(), b.parameters()):
        for k, v in opt_a.state[pa].items():
            w = opt_b.state[pb][k]
            if torch.is_tensor(v):
                assert_same(w, v, k)
            else:
                assert w == v
    _train(a, opt_a, 5, x, y)
    _train(b, opt_b, 5, x, y)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert_same(pb.detach(), pa.detach(), "param")


def test_optimizer_bad_input():
    p = [nn.Parameter(torch.randn(10))]
    with pytest.raises(ValueError, match="lr must be >= 0"):
        AdamW8bit(p, lr=-1e-3)
    for betas in ((1.0, 0.9), (0.9, -0.1), (0.9, 1.5)):
        with pytest.raises(ValueError, match=r"betas\[\d\] must be in \[0, 1\)"):
            AdamW8bit(p, betas=betas)
    for eps in (0.0, -1e-8):
        with pytest.raises(ValueError, match="eps must be > 0"):
            AdamW8bit(p, eps=eps)
    with pytest.raises(ValueError, match="eps must be finite"):
        AdamW8bit(p, eps=float("nan"))
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        AdamW8bit(p, weight_decay=-1)
    for bs in (0, 3, 100, -256):
        with pytest.raises(ValueError, match="block_size must be a positive power of two"):
            AdamW8bit(p, block_size=bs)
    with pytest.raises(ValueError, match="maximize=True"):
        AdamW8bit(p, maximize=True)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16 parameters"):
        AdamW8bit([torch.zeros(4, dtype=torch.int64)])
    with pytest.raises(TypeError, match="float32, bfloat16 or float16 parameters"):
        SGD8bit([nn.Parameter(torch.zeros(4, dtype=torch.float64))], lr=0.1)
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        SGD8bit(p, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="momentum must be in"):
        SGD8bit(p, lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        SGD8bit(p, lr=-0.1)
    # sparse gradients
    emb = nn.Embedding(100, 64, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    for opt in (AdamW8bit(emb.parameters(), min_8bit_size=0), SGD8bit(emb.parameters(), lr=0.1, momentum=0.9)):
        with pytest.raises(RuntimeError, match="sparse gradients"):
            opt.step()


def test_noncontiguous_param_is_updated():
    w = nn.Parameter(torch.randn(128, 64).t())  # non-contiguous
    w.grad = torch.randn(64, 128)
    v = nn.Parameter(w.detach().contiguous().clone())
    v.grad = w.grad.clone()
    AdamW8bit([w], min_8bit_size=0).step()
    AdamW8bit([v], min_8bit_size=0).step()
    assert_same(w.detach().contiguous(), v.detach())


@pytest.mark.parametrize("cls", ["adamw", "sgd"])
def test_convergence_near_fp32(cls):
    """A small MLP regression: the 8-bit optimizer (every state quantized) reaches about the
    fp32 optimizer's loss."""
    x, y = _data(n=1024)
    a, b = _mlp(), _mlp()
    if cls == "adamw":
        oa = torch.optim.AdamW(a.parameters(), lr=3e-3, weight_decay=0.01)
        ob = AdamW8bit(b.parameters(), lr=3e-3, weight_decay=0.01, min_8bit_size=0)
    else:
        oa = torch.optim.SGD(a.parameters(), lr=0.01, momentum=0.9)
        ob = SGD8bit(b.parameters(), lr=0.01, momentum=0.9, min_8bit_size=0)
    la = _train(a, oa, 400, x, y)
    lb = _train(b, ob, 400, x, y)
    fa, fb = sum(la[-20:]) / 20, sum(lb[-20:]) / 20
    assert fa < 0.5 * sum(la[:20]) / 20  # it learned something
    assert fb <= fa * 1.15 + 1e-3, (fa, fb)


def test_bf16_params_train():
    x, y = _data()
    m = _mlp(dtype=torch.bfloat16)
    losses = _train(m, AdamW8bit(m.parameters(), lr=3e-3, min_8bit_size=0), 100, x, y)
    assert sum(losses[-10:]) < sum(losses[:10])
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())


def test_lr_scheduler_and_closure():
    x, y = _data()
    m = _mlp()
    opt = AdamW8bit(m.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)

    def closure():
        opt.zero_grad()
        loss = (m(x[:32]) - y[:32]).pow(2).mean()
        loss.backward()
        return loss

    assert torch.is_tensor(opt.step(closure))
    sched.step()
    assert opt.param_groups[0]["lr"] == 5e-3
    opt.step(closure)


# =========================================================================== 2 gloo ranks


def _init(rank, world, port):
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    return dist


def _dist_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64))


def _dist_data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 32, generator=gen), torch.randn(16, 64, generator=gen)


def _fsdp_worker(rank, world, port):
    dist = _init(rank, world, port)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    try:
        mesh = init_device_mesh("cpu", (world,))
        model = _dist_model()
        ref = copy.deepcopy(model)
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[2], mesh=mesh)
        fully_shard(model, mesh=mesh)
        # block 32: every shard (32 x 32, 32, 32 x 64, 32) is whole blocks, so the sharded
        # states are the unsharded ones split between the ranks and the result is bit-identical
        kw = dict(lr=1e-2, weight_decay=0.01, min_8bit_size=0, block_size=32)
        opt = AdamW8bit(model.parameters(), **kw)
        ref_opt = AdamW8bit(ref.parameters(), **kw)
        x, y = _dist_data()
        for _ in range(3):
            for m, o in ((model, opt), (ref, ref_opt)):
                o.zero_grad()
                (m(x) - y).pow(2).mean().backward()
                o.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert isinstance(p, DTensor)
            local = p.to_local()
            st = opt.state[p]
            assert st["m_codes"].numel() == local.numel() and st["m_absmax"].numel() == -(-local.numel() // 32)
            full = p.full_tensor()
            torch.testing.assert_close(full, q.detach(), rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


def _zero_worker(rank, world, port):
    dist = _init(rank, world, port)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    try:
        model = _dist_model()
        ref = copy.deepcopy(model)
        zero = ZeroRedundancyOptimizer(
            model.parameters(), optimizer_class=AdamW8bit, lr=1e-2, weight_decay=0.01, min_8bit_size=0
        )
        ref_opt = AdamW8bit(ref.parameters(), lr=1e-2, weight_decay=0.01, min_8bit_size=0)
        x, y = _dist_data()
        for _ in range(3):
            for m, o in ((model, zero), (ref, ref_opt)):
                o.zero_grad()
                (m(x) - y).pow(2).mean().backward()
                o.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p.detach(), q.detach())
        # each rank holds 8-bit states for its own partition only
        owned = {id(p) for p in zero.optim.param_groups[0]["params"]}
        assert 0 < len(owned) < 4 and all("m_codes" in zero.optim.state[p] for p in zero.optim.state)
        zero.consolidate_state_dict(to=0)
        if rank == 0:
            sd = zero.state_dict()
            assert len(sd["state"]) == 4
            assert all(s["m_codes"].dtype == torch.uint8 for s in sd["state"].values())
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_gloo_ranks():
    run_forked_ranks(_fsdp_worker, timeout_s=180)


def test_zero_redundancy_two_gloo_ranks():
    run_forked_ranks(_zero_worker, timeout_s=180)


# =========================================================================== fp8 state maps

FP8_BACKENDS = ["cpu", "cpu-avx2", "cpu-scalar", "triton"]


def _fp8_grid(signed: bool) -> torch.Tensor:
    """The encoder's grid in fp64, one value per magnitude code: 2^(e - bias) * (1 + f / 8),
    code 0 included as its grid point (2^-15 / 2^-31), which then decodes to 0."""
    c = torch.arange(121 if signed else 249, dtype=torch.float64)
    e, f = torch.div(c, 8, rounding_mode="floor"), c % 8
    return torch.pow(2.0, e - (15 if signed else 31)) * (1 + f / 8)


def _fp8_oracle(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """Nearest grid point by brute force in fp64, ties to the even code (= even mantissa),
    saturating at 1; NaN -> 0; the sign as m's bit 7 (v: negative -> 0)."""
    grid = _fp8_grid(signed)
    a = x.double().abs() if signed else x.double().clamp_min(0)
    a = torch.nan_to_num(a, nan=0.0).clamp(max=1.0)
    d = (a[:, None] - grid[None, :]).abs()
    best = d.min(dim=1, keepdim=True).values
    cand = d == best
    idx = torch.arange(grid.numel())
    even = cand & (idx % 2 == 0)[None, :]
    code = torch.where(even.any(1), (even * idx).sum(1), (cand * idx).amax(1))
    if signed:
        code = code | torch.where(torch.signbit(x) & ~torch.isnan(x), 0x80, 0)
    code = torch.where(torch.isnan(x), 0, code)
    return code.to(torch.uint8)


@pytest.mark.parametrize("signed", [True, False])
def test_fp8_map_values(signed):
    m = R.fp8_map(signed)
    top = 120 if signed else 248
    assert float(m[0]) == 0.0 and float(m[top]) == 1.0
    mags = m[:128] if signed else m
    assert bool((mags[1 : top + 1] > mags[:top]).all())  # increasing with the magnitude code
    if signed:
        assert torch.equal(m[128:], -m[:128]) and torch.signbit(m[128]) and not torch.signbit(m[0])
    # every code the encoder produces comes back as itself
    codes = torch.arange(256).to(torch.uint8)
    produced = (codes & 0x7F) <= top if signed else codes <= top
    assert torch.equal(R.fp8_encode(m, signed)[produced], codes[produced])
    # relative spacing: 3 mantissa bits over 15 (m) / 31 (v) binades
    rel = (mags[2 : top + 1] - mags[1:top]) / mags[2 : top + 1]
    assert float(rel.max()) <= 0.125 and float(mags[1]) < (4e-5 if signed else 6e-10)


@pytest.mark.parametrize("signed", [True, False])
def test_fp8_encode_matches_fp64_oracle(signed):
    """The bit rule is round to nearest even on the grid: checked against a brute-force
    nearest search in fp64 on every grid point, every midpoint (the ties) and their ulp
    neighbours, spread values, zeros, infinities and NaN."""
    grid = _fp8_grid(signed).float()
    mids = ((_fp8_grid(signed)[1:] + _fp8_grid(signed)[:-1]) / 2).float()  # exact in fp32
    inf = torch.tensor(float("inf"))
    pts = torch.cat([grid, mids, torch.nextafter(mids, inf), torch.nextafter(mids, -inf), grid / 2, grid * 0.75])
    special = torch.tensor([0.0, -0.0, 1e-45, 1e-38, 1.0, 1.0000001, 2.0, float("inf"), -float("inf"), float("nan")])
    spread = torch.rand(5000, generator=torch.Generator().manual_seed(0)).pow(30)
    x = torch.cat([pts, -pts, special, spread, -spread])
    assert_same(R.fp8_encode(x, signed), _fp8_oracle(x, signed), "codes")


def _adam_fp8_run(n, dtype, bs, steps, seed, scale=0.1, wd=0.01, impl=None, betas=(0.9, 0.999)):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen).to(dtype)
    mc, ma = O.new_state(p, bs)
    vc, va = O.new_state(p, bs)
    for t in range(1, steps + 1):
        g = (torch.randn(n, generator=gen) * scale * (1 + t)).to(dtype)
        if impl is None:
            s = R.adamw_scalars(3e-3, betas[0], betas[1], 1e-8, wd, t)
            R.adamw8bit_fp8_step_(p, g, mc, ma, vc, va, s, bs)
        else:
            ops.adamw8bit_step_(
                p,
                g,
                mc,
                ma,
                vc,
                va,
                lr=3e-3,
                beta1=betas[0],
                beta2=betas[1],
                eps=1e-8,
                weight_decay=wd,
                step=t,
                block_size=bs,
                state_map="fp8",
            )
    return p, mc, ma, vc, va


@pytest.mark.parametrize("backend_name", FP8_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_adamw_fp8_step_matches_reference(monkeypatch, backend_name, dtype):
    _use(monkeypatch, backend_name)
    for n in SIZES:
        bs = 256 if n != 1000 else 64
        want = _adam_fp8_run(n, dtype, bs, 3, n)
        got = _adam_fp8_run(n, dtype, bs, 3, n, impl="ops")
        for name, a, b in zip(("param", "m_codes", "m_absmax", "v_codes", "v_absmax"), got, want):
            assert_same(a, b, f"n={n} {name}")


@HYP
@given(
    n=st.one_of(st.sampled_from([1, 15, 16, 17, 63, 64, 65, 255, 256, 257, 4095]), st.integers(1, 20_000)),
    log_bs=st.integers(0, 11),
    seed=st.integers(0, 2**16),
    log_scale=st.integers(-20, 4),
)
def test_adamw_fp8_hypothesis_all_backends(monkeypatch, n, log_bs, seed, log_scale):
    bs = 2**log_bs
    want = _adam_fp8_run(n, torch.float32, bs, 2, seed, scale=10.0**log_scale)
    for b in [b for b in FP8_BACKENDS if isa_skip_reason(b) is None]:
        use_backend(monkeypatch, b)
        got = _adam_fp8_run(n, torch.float32, bs, 2, seed, scale=10.0**log_scale, impl="ops")
        for name, x, y in zip(("param", "m_codes", "m_absmax", "v_codes", "v_absmax"), got, want):
            assert_same(x, y, f"{b} n={n} bs={bs} {name}")


def _fp8_first_step(g: torch.Tensor) -> None:
    """One fp8 step from zero states with beta1 = beta2 = 0: m = g and v = g * g are encoded
    as they are; every state and the parameter bit for bit as the reference's."""
    got, want = torch.zeros_like(g), torch.zeros_like(g)
    states = [O.new_state(g) + O.new_state(g) for _ in range(2)]
    kw = dict(lr=1e-3, beta1=0.0, beta2=0.0, eps=1e-8, weight_decay=0.0, step=1)
    ops.adamw8bit_step_(got, g, *states[0], **kw, state_map="fp8")
    R.adamw8bit_fp8_step_(want, g, *states[1], R.adamw_scalars(1e-3, 0.0, 0.0, 1e-8, 0.0, 1), 256)
    for name, a, b in zip(("m_codes", "m_absmax", "v_codes", "v_absmax"), states[0], states[1]):
        assert_same(a, b, name)
    assert_same(got, want, "param")


def _fp8_ties(signed: bool):
    """A grid midpoint of the map (a tie) moved by -2..2 ulps."""
    g = _fp8_grid(signed)
    mids = ((g[1:] + g[:-1]) / 2).float()

    def move(i, k):
        x = mids[i : i + 1]
        for _ in range(abs(k)):
            x = torch.nextafter(x, torch.tensor(float("inf") if k > 0 else -float("inf")))
        return float(x)

    return st.builds(move, st.integers(0, mids.numel() - 1), st.integers(-2, 2))


_ANY_FLOAT = _float_bits_in(-(2**31), 2**31 - 1)  # every bit pattern: NaN, inf, subnormals, both signs


@pytest.mark.parametrize("backend_name", FP8_BACKENDS)
@given(
    vals=st.lists(
        st.one_of(_UNIT_FLOAT, _fp8_ties(True), st.builds(lambda x: -x, _fp8_ties(True)), _ANY_FLOAT),
        min_size=1,
        max_size=600,
    ),
    absmax=st.sampled_from([1.0, 3.0, 1e-20, 7e30]),
)
@HYP
def test_fp8_codes_hypothesis(monkeypatch, backend_name, vals, absmax):
    """The arithmetic encode on every CPU path against the reference: values over every
    exponent, on and next to every tie of m's grid, and any bit pattern (NaN, inf,
    subnormals); each block of 255 starts with `absmax` so the scale is pinned (with 1.0 and
    m's ties, x is the value itself). v = g * g lands near v's ties through the square."""
    _use(monkeypatch, backend_name)
    v = torch.tensor(vals, dtype=torch.float32) * torch.tensor(absmax, dtype=torch.float32)
    head = torch.tensor([absmax], dtype=torch.float32)
    g = torch.cat([torch.cat([head, b, torch.zeros(255 - b.numel())]) for b in v.split(255)])
    _fp8_first_step(g)


@pytest.mark.parametrize("backend_name", FP8_BACKENDS)
@given(vals=st.lists(_fp8_ties(False), min_size=1, max_size=300))
@HYP
def test_fp8_unsigned_ties_hypothesis(monkeypatch, backend_name, vals):
    """v's ties: g = sqrt(tie) rounded, so g * g lands on or within a few ulps of v's grid
    midpoints (absmax 1: a first element of 1.0)."""
    _use(monkeypatch, backend_name)
    v = torch.tensor(vals, dtype=torch.float64).sqrt().to(torch.float32)
    g = torch.cat([torch.cat([torch.ones(1), b, torch.zeros(255 - b.numel())]) for b in v.split(255)])
    _fp8_first_step(g)


@pytest.mark.parametrize("backend_name", FP8_BACKENDS)
def test_fp8_special_blocks_match_reference(monkeypatch, backend_name):
    """Blocks with NaN, inf, a subnormal absmax (r = inf), huge values and signed zeros, over
    several steps and every tail length: bit for bit, and the NaN stays in its block."""
    _use(monkeypatch, backend_name)
    special = torch.tensor([float("inf"), -float("inf"), 1e-45, -1e-45, 0.0, -0.0, 3e38, -3e38, 1e-39, 2.5])
    for n in (1, 15, 16, 17, 33, 64, 65, 300):
        g = special.repeat(-(-n // special.numel()))[:n].clone()
        g[n // 2 :] *= 1e-3
        sub = torch.full((16,), 1e-40)  # a block whose absmax is subnormal
        sub[::3] = 0.0
        g = torch.cat([g, sub, -sub])
        out = {}
        for impl in ("ops", None):
            p = torch.linspace(-1, 1, g.numel())
            mc, ma = O.new_state(p, 16)
            vc, va = O.new_state(p, 16)
            for t in (1, 2, 3):
                if impl:
                    kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, block_size=16)
                    ops.adamw8bit_step_(p, g, mc, ma, vc, va, step=t, state_map="fp8", **kw)
                else:
                    R.adamw8bit_fp8_step_(p, g, mc, ma, vc, va, R.adamw_scalars(1e-2, 0.9, 0.99, 1e-8, 0.1, t), 16)
            out[impl] = (p, mc, ma, vc, va)
        for name, x, y in zip(("param", "m_codes", "m_absmax", "v_codes", "v_absmax"), out["ops"], out[None]):
            assert_same(x, y, f"n={n} {name}")


@pytest.mark.parametrize("backend_name", ["reference"] + FP8_BACKENDS)
def test_fp8_nan_stays_in_its_block(monkeypatch, backend_name):
    _use(monkeypatch, backend_name)
    n, bs = 1024, 256
    p = torch.randn(n)
    mc, ma = O.new_state(p, bs)
    vc, va = O.new_state(p, bs)
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, state_map="fp8")
    g = torch.randn(n)
    g[300] = float("nan")
    ops.adamw8bit_step_(p, g, mc, ma, vc, va, step=1, **kw)
    assert torch.isnan(p[300]) and int(torch.isnan(p).sum()) == 1
    assert torch.isnan(ma[1]) and torch.isnan(va[1]) and bool(torch.isfinite(ma[[0, 2, 3]]).all())
    ops.adamw8bit_step_(p, torch.randn(n), mc, ma, vc, va, step=2, **kw)
    nan = torch.isnan(p)
    assert bool(nan[256:512].all()) and not bool(nan[:256].any()) and not bool(nan[512:].any())


def test_fp8_opcheck():
    for n in (1, 300, 1024):
        p, g = torch.randn(n), torch.randn(n)
        mc, ma = O.new_state(p, 128)
        vc, va = O.new_state(p, 128)
        s = R.adamw_scalars(1e-3, 0.9, 0.999, 1e-8, 0.01, 1)
        scalars = [s[k] for k in ("beta1", "c1", "beta2", "c2", "decay", "step_size", "bc2_sqrt", "eps")]
        torch.library.opcheck(torch.ops.accelops.adamw8bit_fp8_step_.default, (p, g, mc, ma, vc, va, *scalars, 128))


def test_fp8_bad_input():
    p = torch.randn(300)
    mc, ma = O.new_state(p)
    vc, va = O.new_state(p)
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    with pytest.raises(ValueError, match="state_map must be one of"):
        ops.adamw8bit_step_(p, p.clone(), mc, ma, vc, va, state_map="e4m3", **kw)
    with pytest.raises(ValueError, match="m_absmax must be contiguous with"):
        ops.adamw8bit_step_(p, p.clone(), mc, ma[:1], vc, va, state_map="fp8", **kw)
    with pytest.raises(ValueError, match="state_map must be one of"):
        AdamW8bit([nn.Parameter(torch.randn(10))], state_map="fp4")


def test_fp8_optimizer_state_dict_records_the_map():
    """The map is in every param group and 8-bit state; a checkpoint continues bit-identically
    with the same map and is refused, with the map named, by the other."""
    x, y = _data()
    a = _mlp()
    opt_a = AdamW8bit(a.parameters(), lr=1e-3, min_8bit_size=1000, state_map="fp8")
    _train(a, opt_a, 5, x, y)
    sd = opt_a.state_dict()
    assert all(g["state_map"] == "fp8" for g in sd["param_groups"])
    assert any(s.get("state_map") == "fp8" for s in sd["state"].values())
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": sd}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    with pytest.raises(ValueError, match=r"saved with state_map='fp8', this optimizer has state_map='dynamic'"):
        AdamW8bit(_mlp().parameters(), lr=1e-3, min_8bit_size=1000).load_state_dict(saved["opt"])
    dyn = AdamW8bit(_mlp().parameters(), lr=1e-3, min_8bit_size=1000)
    _train(_mlp(), dyn, 0, x, y)
    with pytest.raises(ValueError, match=r"saved with state_map='dynamic', this optimizer has state_map='fp8'"):
        AdamW8bit(_mlp().parameters(), lr=1e-3, state_map="fp8").load_state_dict(dyn.state_dict())
    b = _mlp(seed=1)
    b.load_state_dict(saved["model"])
    opt_b = AdamW8bit(b.parameters(), lr=1e-3, min_8bit_size=1000, state_map="fp8")
    opt_b.load_state_dict(saved["opt"])
    _train(a, opt_a, 5, x, y)
    _train(b, opt_b, 5, x, y)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert_same(pb.detach(), pa.detach(), "param")
    # the map cannot change under existing states
    opt_b.param_groups[0]["state_map"] = "dynamic"
    with pytest.raises(ValueError, match="the map cannot change during training"):
        _train(b, opt_b, 1, x, y)


def test_fp8_state_bytes_and_convergence():
    x, y = _data(n=1024)
    a, b, c = _mlp(), _mlp(), _mlp()
    la = _train(a, torch.optim.AdamW(a.parameters(), lr=3e-3, weight_decay=0.01), 400, x, y)
    ob = AdamW8bit(b.parameters(), lr=3e-3, weight_decay=0.01, min_8bit_size=0, state_map="fp8")
    lb = _train(b, ob, 400, x, y)
    oc = AdamW8bit(c.parameters(), lr=3e-3, weight_decay=0.01, min_8bit_size=0)
    _train(c, oc, 1, x, y)
    assert ob.state_bytes() == oc.state_bytes()  # same layout: uint8 codes + fp32 block scales
    fa, fb = sum(la[-20:]) / 20, sum(lb[-20:]) / 20
    assert fb <= fa * 1.15 + 1e-3, (fa, fb)
