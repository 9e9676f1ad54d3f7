"""Communication family: bucket packing and gradient compression, every backend against
accelops/reference/comm.py (bit for bit where the spec is exact), plus the properties the
spec promises (error feedback, unbiased stochastic rounding, NaN never hidden)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accelops import ops
from accelops.reference import comm as R

from .conftest import use_backend

# The family has no Triton kernels: the C++ kernels' AVX2 and portable paths against the
# reference (which also runs as a backend, so its own contract is checked too).
BACKENDS = ["reference", "cpu", "cpu-scalar"]
GRAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
WIRE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
OPS = [
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
]
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SIZES = [1, 2, 7, 8, 9, 15, 17, 63, 100, 257, 2047, 2048, 2049, 4099]
CHUNKS = [1, 3, 8, 13, 100, 2048]
NAN, INF = float("nan"), float("inf")


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    use_backend(monkeypatch, request.param)
    if request.param != "reference":
        for name in OPS:  # otherwise ops.comm would silently run the op's default kernel, the reference
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"accelops::{name}", "CPU"), (
                f"the extension registers no CPU kernel for accelops::{name}"
            )
    return request.param


@pytest.fixture(params=BACKENDS[1:])
def native(request, monkeypatch):
    """The C++ paths only: for the large inputs, where the reference would only be compared with itself."""
    use_backend(monkeypatch, request.param)
    return request.param


# --------------------------------------------------------------------------- helpers

_INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-identical, except that any NaN matches any NaN (payloads may differ)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    if not a.is_floating_point():
        assert torch.equal(a, b)
        return
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b)), "NaN in different places"
    ai, bi = a.view(_INT_VIEW[a.dtype])[~nan], b.view(_INT_VIEW[b.dtype])[~nan]
    diff = (ai != bi).nonzero()
    assert diff.numel() == 0, (
        f"{diff.numel()} elements differ, first at {int(diff[0])}: "
        f"{a[~nan][diff[0]].item()} vs {b[~nan][diff[0]].item()}"
    )


def random_bits(n: int, dtype: torch.dtype, gen) -> torch.Tensor:
    """Every bit pattern is possible: subnormals, rounding ties, Inf, NaN, values that overflow a cast."""
    wide = torch.randint(-(2**31), 2**31, (n,), generator=gen, dtype=torch.int64)
    if dtype == torch.float64:
        return (wide * (2**32) + torch.randint(0, 2**32, (n,), generator=gen)).view(torch.float64)
    return (
        wide.to(torch.int32).view(torch.float32).to(dtype)
        if dtype == torch.float32
        else wide.to(torch.int16).view(dtype)
    )


def make_values(n: int, dtype: torch.dtype, kind: str, gen) -> torch.Tensor:
    if kind == "bits":
        return random_bits(n, dtype, gen)
    if kind == "ties":  # small integers: many equal magnitudes
        return torch.randint(-3, 4, (n,), generator=gen).to(dtype)
    x = torch.randn(n, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-3, 3, (n,), generator=gen)
    if kind == "special" and n:
        idx = torch.randint(0, n, (max(1, n // 50),), generator=gen)
        x[idx] = torch.tensor([NAN, INF, -INF, -0.0, 0.0, 1e30], dtype=torch.float64)[
            torch.randint(0, 6, idx.shape, generator=gen)
        ]
    return x.to(dtype)


def acc_of(grad, residual):
    acc = grad.float() if residual is None else grad.float() + residual
    return acc.reshape(-1)


def clone(t):
    return None if t is None else t.clone()


def sent_count(indices: torch.Tensor) -> int:
    """Slots before the padding: indices ascend strictly, padding repeats indices[0]."""
    steps = (indices[1:] <= indices[:-1]).nonzero()
    return indices.numel() if steps.numel() == 0 else int(steps[0]) + 1


def magnitudes(acc):
    mag = acc.abs()
    return torch.where(torch.isnan(mag), torch.full_like(mag, INF), mag)


# --------------------------------------------------------------------------- buckets


@given(
    sizes=st.lists(st.sampled_from([0, 1, 3, 8, 9, 33, 1000, 4099]), min_size=1, max_size=6),
    src=st.lists(st.sampled_from(GRAD_DTYPES), min_size=6, max_size=6),
    dtype=st.sampled_from(GRAD_DTYPES + [None]),
    divisor=st.sampled_from([None, 1, 2, 3.0, 7, 0.3, 8]),
    kind=st.sampled_from(["bits", "normal", "special"]),
    seed=st.integers(0, 2**16),
)
@SETTINGS
def test_bucket_flatten_matches_reference(backend, sizes, src, dtype, divisor, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    if dtype is None:
        src = [src[0]] * len(sizes)
    tensors = [
        make_values(n, dt, kind, gen).reshape(-1, 1) if n % 3 == 0 else make_values(n, dt, kind, gen)
        for n, dt in zip(sizes, src)
    ]
    flat = ops.bucket_flatten(tensors, dtype, divisor)
    same(flat, R.bucket_flatten(tensors, dtype, divisor))


def test_outputs_larger_than_the_caches(native):
    # >= 16 MiB outputs are written with streaming stores from the first aligned element on.
    gen = torch.Generator().manual_seed(10)
    n = 4_194_311
    parts = [torch.randn(s, generator=gen) for s in (3, 1_000_001, 5, 3_194_302)]
    flat = ops.bucket_flatten(parts, torch.float32, 3)
    same(flat, R.bucket_flatten(parts, torch.float32, 3))
    wire = flat.to(torch.bfloat16)
    mine, theirs = [torch.empty_like(p) for p in parts], [torch.empty_like(p) for p in parts]
    ops.bucket_unflatten_(wire, mine, 0.5)
    R.bucket_unflatten_(wire, theirs, 0.5)
    for a, b in zip(mine, theirs):
        same(a, b)
    same(ops.bucket_flatten(parts, torch.float64), R.bucket_flatten(parts, torch.float64))
    bits, scales = ops.sign_compress_(flat, None, 1000)
    same(ops.sign_decompress(bits, scales, n, 1000), R.sign_decompress(bits, scales, n, 1000))
    q, scales = ops.int8_compress_(flat, None, 1000, 1)
    same(ops.int8_decompress(q, scales, 1000), R.int8_decompress(q, scales, 1000))


@given(
    sizes=st.lists(st.sampled_from([0, 1, 3, 8, 9, 33, 1000, 4099]), min_size=1, max_size=6),
    dst=st.lists(st.sampled_from(GRAD_DTYPES), min_size=6, max_size=6),
    flat_dtype=st.sampled_from(GRAD_DTYPES),
    divisor=st.sampled_from([None, 1, 2, 3.0, 0.3]),
    kind=st.sampled_from(["bits", "normal", "special"]),
    seed=st.integers(0, 2**16),
)
@SETTINGS
def test_bucket_unflatten_matches_reference(backend, sizes, dst, flat_dtype, divisor, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    flat = make_values(sum(sizes), flat_dtype, kind, gen)
    mine = [torch.empty(n, dtype=dt) for n, dt in zip(sizes, dst)]
    theirs = [torch.empty(n, dtype=dt) for n, dt in zip(sizes, dst)]
    out = ops.bucket_unflatten_(flat, mine, divisor)
    assert out is mine
    R.bucket_unflatten_(flat, theirs, divisor)
    for a, b in zip(mine, theirs):
        same(a, b)


def test_bucket_round_trip_many_tensors(native):
    # Enough elements for several parallel ranges, which start and end inside tensors.
    gen = torch.Generator().manual_seed(1)
    shapes = [(300, 97), (1,), (5000,), (64, 64, 3), (0,), (77,), (40000,), (3, 1)] * 4
    grads = [torch.randn(s, generator=gen) for s in shapes]
    flat = ops.bucket_flatten(grads, torch.bfloat16, divisor=4)
    same(flat, R.bucket_flatten(grads, torch.bfloat16, 4))
    back = [torch.empty_like(g) for g in grads]
    ops.bucket_unflatten_(flat, back, divisor=0.5)
    expected = [torch.empty_like(g) for g in grads]
    R.bucket_unflatten_(flat, expected, 0.5)
    for a, b in zip(back, expected):
        same(a, b)
    plain = ops.bucket_flatten(grads)
    assert torch.equal(plain, torch.cat([g.reshape(-1) for g in grads]))
    ops.bucket_unflatten_(plain, back)
    assert all(torch.equal(a, b) for a, b in zip(back, grads))


@given(
    shape=st.sampled_from([(1,), (7,), (8,), (33,), (5, 9), (2, 3, 17), (0, 4), (4099,)]),
    src=st.sampled_from(GRAD_DTYPES),
    dtype=st.sampled_from(WIRE_DTYPES),
    divisor=st.sampled_from([1, 2, 3, 7.0, 0.3, 1e-30, 1e30]),
    kind=st.sampled_from(["bits", "normal", "special"]),
    seed=st.integers(0, 2**16),
)
@SETTINGS
def test_cast_div_matches_reference(backend, shape, src, dtype, divisor, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    x = make_values(n, src, kind, gen).reshape(shape)
    y = ops.cast_div(x, divisor, dtype)
    assert y.shape == x.shape
    same(y, R.cast_div(x, divisor, dtype))


def test_cast_div_rounds_once_like_torch(backend):
    # Ties and near-ties of the bf16 / fp16 rounding, overflow to Inf, NaN: exactly torch's conversion.
    base = torch.arange(-2000, 2000, dtype=torch.int32)
    x = (base.to(torch.int32) << 15 | 0x3F800000).view(torch.float32)  # every bf16 tie around 1.0
    x = torch.cat([x, -x, torch.tensor([NAN, -NAN, INF, 3.5e38, 65520.0, 65519.0, 6e-8, 1e-45])])
    for dtype in (torch.bfloat16, torch.float16):
        same(ops.cast_div(x, 1, dtype), x.to(dtype))
        same(ops.cast_div(x, 3, dtype), (x / 3).to(dtype))


# --------------------------------------------------------------------------- top-k


def check_topk(grad, residual, k, method="exact", sample_size=4096, seed=0):
    """Mine against the reference: same number sent, same multiset of magnitudes, values
    exactly acc at the indices, residual exactly acc with them zeroed; and, when no two
    magnitudes are equal, the very same output."""
    res_mine, res_ref = clone(residual), clone(residual)
    values, indices = ops.topk_compress_(grad, res_mine, k, method, sample_size, seed)
    rvalues, rindices = R.topk_compress_(grad, res_ref, k, method, sample_size, seed)
    acc = acc_of(grad, residual)
    assert values.shape == (k,) and values.dtype == torch.float32
    assert indices.shape == (k,) and indices.dtype == torch.int32
    count = sent_count(indices)
    assert count == sent_count(rindices)
    if method == "exact":
        assert count == k
    sent = indices[:count].long()
    same(values[:count], acc[sent])
    assert bool((values[count:] == 0).all()) and bool((indices[count:] == indices[0]).all())
    mag = magnitudes(acc)
    assert torch.equal(mag[sent].sort().values, mag[rindices[:count].long()].sort().values)
    if residual is not None:
        expected = acc.clone()
        expected[sent] = acc[sent] - acc[sent]
        same(res_mine.reshape(-1), expected)
    if torch.unique(mag).numel() == mag.numel():
        assert torch.equal(indices, rindices)
        same(values, rvalues)
        if residual is not None:
            same(res_mine, res_ref)
    return values, indices


@given(
    n=st.sampled_from(SIZES),
    k_pick=st.sampled_from(["1", "n", "1%", "half", "random"]),
    dtype=st.sampled_from(GRAD_DTYPES),
    feedback=st.booleans(),
    kind=st.sampled_from(["normal", "ties", "special"]),
    seed=st.integers(0, 2**16),
)
@SETTINGS
def test_topk_exact_matches_reference(backend, n, k_pick, dtype, feedback, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    k = {
        "1": 1,
        "n": n,
        "1%": max(1, n // 100),
        "half": max(1, n // 2),
        "random": int(torch.randint(1, n + 1, (), generator=gen)),
    }[k_pick]
    grad = make_values(n, dtype, kind, gen)
    residual = torch.randn(n, generator=gen) * 0.1 if feedback else None
    check_topk(grad, residual, k)


@given(
    n=st.sampled_from(SIZES + [10007]),
    k_pick=st.sampled_from(["1", "n", "1%", "10%"]),
    sample_size=st.sampled_from([1, 7, 64, 4096, 100000]),
    sample_seed=st.integers(0, 1000),
    feedback=st.booleans(),
    kind=st.sampled_from(["normal", "ties", "special"]),
    seed=st.integers(0, 2**16),
)
@SETTINGS
def test_topk_sampled_matches_reference(backend, n, k_pick, sample_size, sample_seed, feedback, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    k = {"1": 1, "n": n, "1%": max(1, n // 100), "10%": max(1, n // 10)}[k_pick]
    grad = make_values(n, torch.float32, kind, gen)
    residual = torch.randn(n, generator=gen) * 0.1 if feedback else None
    check_topk(grad, residual, k, "sampled", sample_size, sample_seed)


@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("method", ["exact", "sampled"])
def test_topk_large_bucket(native, kind, method):
    # Several parallel ranges; with "ties" the boundary magnitude is shared across them.
    gen = torch.Generator().manual_seed(2)
    n = 200_003
    grad = make_values(n, torch.float32, kind, gen)
    check_topk(grad, torch.randn(n, generator=gen) * 0.01, 3000, method, 4096, 5)


def test_topk_exact_when_the_threshold_sample_misleads(native):
    # The kernel estimates exact top-k's threshold from a strided sample; here every sampled
    # position holds one of the few large values, so fewer than k elements reach the
    # estimate and the kernel must fall back to collecting everything.
    gen = torch.Generator().manual_seed(9)
    n = 300_001
    grad = torch.rand(n, generator=gen)
    grad[::18] = 100.0
    check_topk(grad, None, 20_000)
    check_topk(grad, torch.zeros(n), n // 18 + 1)


def test_topk_nan_counts_as_largest(backend):
    grad = torch.tensor([1.0, NAN, -5.0, INF, 0.5, -INF, 2.0, NAN, 0.0])
    residual = torch.zeros(9)
    values, indices = ops.topk_compress_(grad, residual, 4)
    assert indices.tolist() == [1, 3, 5, 7]
    assert torch.isnan(values[0]) and values[1] == INF and values[2] == -INF and torch.isnan(values[3])
    # acc - sent is NaN for the Inf and NaN elements, exactly as the spec computes it
    assert torch.isnan(residual[[1, 3, 5, 7]]).all()
    assert residual[[0, 2, 4, 6, 8]].tolist() == [1.0, -5.0, 0.5, 2.0, 0.0]
    dense = ops.topk_decompress(values, indices, 9)
    assert torch.isnan(dense[[1, 7]]).all() and dense[3] == INF and dense[5] == -INF


@given(
    ranks=st.sampled_from([1, 2, 3]),
    n=st.sampled_from([1, 9, 100, 4099]),
    layout=st.sampled_from(["compressed", "duplicates", "padded"]),
    seed=st.integers(0, 2**16),
)
@SETTINGS
def test_topk_decompress_matches_reference(backend, ranks, n, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    k = max(1, n // 10)
    if layout == "duplicates":  # any order, repeated indices, NaN and -0.0 values
        indices = torch.randint(0, n, (ranks, k), generator=gen, dtype=torch.int32)
        values = make_values(ranks * k, torch.float32, "special", gen).reshape(ranks, k)
        values[:, 0] = -0.0
    else:
        payloads = [
            ops.topk_compress_(
                torch.randn(n, generator=gen), None, k, "sampled" if layout == "padded" else "exact", 16, r
            )
            for r in range(ranks)
        ]
        values = torch.stack([p[0] for p in payloads])
        indices = torch.stack([p[1] for p in payloads])
    if ranks == 1 and seed % 2:
        values, indices = values[0], indices[0]
    same(ops.topk_decompress(values, indices, n), R.topk_decompress(values, indices, n))


# --------------------------------------------------------------------------- sign


@given(
    n=st.sampled_from(SIZES),
    chunk=st.sampled_from(CHUNKS),
    dtype=st.sampled_from(GRAD_DTYPES),
    feedback=st.booleans(),
    kind=st.sampled_from(["normal", "ties", "special"]),
    seed=st.integers(0, 2**16),
)
@SETTINGS
def test_sign_compress_matches_reference(backend, n, chunk, dtype, feedback, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    grad = make_values(n, dtype, kind, gen)
    residual = torch.randn(n, generator=gen) if feedback else None
    res_mine, res_ref = clone(residual), clone(residual)
    bits, scales = ops.sign_compress_(grad, res_mine, chunk)
    rbits, rscales = R.sign_compress_(grad, res_ref, chunk)
    same(bits, rbits)
    same(scales, rscales)
    if feedback:
        same(res_mine, res_ref)


@pytest.mark.parametrize("chunk", [2048, 4093, 70_001, 200_003])
def test_sign_large_bucket(native, chunk):
    # 70_001 and 200_003 take the kernels' split-chunk path (chunks larger than a task).
    gen = torch.Generator().manual_seed(3)
    n = 200_003
    grad = torch.randn(n, generator=gen)
    grad[123_456] = NAN
    res_mine, res_ref = torch.randn(n, generator=gen), None
    res_ref = res_mine.clone()
    bits, scales = ops.sign_compress_(grad, res_mine, chunk)
    rbits, rscales = R.sign_compress_(grad, res_ref, chunk)
    same(bits, rbits)
    same(scales, rscales)
    same(res_mine, res_ref)
    stacked = (torch.stack([bits, rbits.flip(0)]), torch.stack([scales, rscales.flip(0)]))
    same(ops.sign_decompress(*stacked, n, chunk), R.sign_decompress(*stacked, n, chunk))


def test_sign_nan_and_inf_chunks(backend):
    grad = torch.tensor([1.0, -2.0, NAN, 4.0, -1.0, INF, 0.5, -0.5, -0.0, 0.0, 3.0])
    residual = torch.zeros(11)
    bits, scales = ops.sign_compress_(grad, residual, chunk_size=4)
    assert torch.isnan(scales[:2]).all() and scales[2] == pytest.approx((0.0 + 0.0 + 3.0) / 3)
    # bit 1 for acc >= 0 or NaN (-0.0 >= 0), least significant first
    expected = [1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1]
    unpacked = [(int(bits[i // 8]) >> (i % 8)) & 1 for i in range(11)]
    assert unpacked == expected
    assert int(bits[1]) >> 3 == 0  # padding bits are zero
    assert torch.isnan(residual[:8]).all() and not torch.isnan(residual[8:]).any()
    dense = ops.sign_decompress(bits, scales, 11, 4)
    assert torch.isnan(dense[:8]).all() and not torch.isnan(dense[8:]).any()


@given(
    ranks=st.sampled_from([1, 2, 3, 5]),
    n=st.sampled_from(SIZES),
    chunk=st.sampled_from(CHUNKS),
    seed=st.integers(0, 2**16),
)
@SETTINGS
def test_sign_decompress_matches_reference(backend, ranks, n, chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 256, (ranks, (n + 7) // 8), generator=gen, dtype=torch.uint8)
    scales = make_values(ranks * ((n + chunk - 1) // chunk), torch.float32, "special", gen).reshape(ranks, -1)
    if ranks == 1 and seed % 2:
        bits, scales = bits[0], scales[0]
    same(ops.sign_decompress(bits, scales, n, chunk), R.sign_decompress(bits, scales, n, chunk))


# --------------------------------------------------------------------------- int8


@given(
    n=st.sampled_from(SIZES),
    chunk=st.sampled_from(CHUNKS),
    dtype=st.sampled_from(GRAD_DTYPES),
    feedback=st.booleans(),
    kind=st.sampled_from(["normal", "ties", "special"]),
    qseed=st.sampled_from([0, 1, 12345, 2**40 + 3]),
    seed=st.integers(0, 2**16),
)
@SETTINGS
def test_int8_compress_matches_reference(backend, n, chunk, dtype, feedback, kind, qseed, seed):
    gen = torch.Generator().manual_seed(seed)
    grad = make_values(n, dtype, kind, gen)
    residual = torch.randn(n, generator=gen) if feedback else None
    res_mine, res_ref = clone(residual), clone(residual)
    q, scales = ops.int8_compress_(grad, res_mine, chunk, qseed)
    rq, rscales = R.int8_compress_(grad, res_ref, chunk, qseed)
    same(q, rq)
    same(scales, rscales)
    if feedback:
        same(res_mine, res_ref)


@pytest.mark.parametrize("chunk", [2048, 70_001])
def test_int8_large_bucket(native, chunk):
    gen = torch.Generator().manual_seed(4)
    n = 200_003
    grad = torch.randn(n, generator=gen, dtype=torch.float64) * 3
    grad[7] = INF
    res_mine = torch.randn(n, generator=gen)
    res_ref = res_mine.clone()
    q, scales = ops.int8_compress_(grad, res_mine, chunk, 99)
    rq, rscales = R.int8_compress_(grad, res_ref, chunk, 99)
    same(q, rq)
    same(scales, rscales)
    same(res_mine, res_ref)
    assert torch.isnan(scales[0]) and bool((q[:chunk] == 0).all())
    stacked = (torch.stack([q, rq.flip(0)]), torch.stack([scales, rscales.flip(0)]))
    same(ops.int8_decompress(*stacked, chunk), R.int8_decompress(*stacked, chunk))


@given(
    ranks=st.sampled_from([1, 2, 3, 5]),
    n=st.sampled_from(SIZES),
    chunk=st.sampled_from(CHUNKS),
    seed=st.integers(0, 2**16),
)
@SETTINGS
def test_int8_decompress_matches_reference(backend, ranks, n, chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (ranks, n), generator=gen, dtype=torch.int8)
    scales = make_values(ranks * ((n + chunk - 1) // chunk), torch.float32, "special", gen).reshape(ranks, -1)
    if ranks == 1 and seed % 2:
        q, scales = q[0], scales[0]
    same(ops.int8_decompress(q, scales, chunk), R.int8_decompress(q, scales, chunk))


def test_uniform_hash_draws():
    u = R.uniform_hash(7, 100_000)
    assert u.dtype == torch.float32 and float(u.min()) >= 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert torch.equal(u[:10], R.uniform_hash(7, 10)) and not torch.equal(u[:10], R.uniform_hash(8, 10))
    assert torch.equal((u * 2**24), (u * 2**24).floor())  # multiples of 2^-24


def test_int8_rounding_is_unbiased(backend):
    # E[q * scale] = acc: the mean of the decompressed values over many seeds converges to
    # acc; each draw's error lies in (-scale, scale) with variance <= scale^2 / 4.
    gen = torch.Generator().manual_seed(5)
    acc = torch.randn(4096, generator=gen)
    seeds = 300
    total = torch.zeros(4096, dtype=torch.float64)
    for s in range(seeds):
        q, scales = ops.int8_compress_(acc, None, 512, s)
        total += ops.int8_decompress(q, scales, 512).double()
    mean = total / seeds
    scale = acc.reshape(-1, 512).abs().amax(1).repeat_interleave(512).double() / 127
    sigma = scale / (2 * math.sqrt(seeds))
    assert bool(((mean - acc.double()).abs() <= 6 * sigma).all())
    assert abs(float((mean - acc.double()).mean())) < 6 * float(sigma.mean()) / math.sqrt(4096)


# --------------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("scheme", ["topk", "topk-sampled", "sign", "int8"])
def test_error_feedback_invariant(backend, scheme):
    """sent + residual == acc after every step: exactly for top-k (its sent values are
    elements of acc), to one fp32 rounding of the residual for sign and int8; and so over
    steps, everything sent plus the last residual adds up to everything accumulated."""
    gen = torch.Generator().manual_seed(6)
    n = 5003
    residual = torch.zeros(n)
    sent_total = torch.zeros(n, dtype=torch.float64)
    grad_total = torch.zeros(n, dtype=torch.float64)
    for step in range(5):
        grad = torch.randn(n, generator=gen).to(torch.bfloat16)
        acc = grad.float() + residual
        if scheme.startswith("topk"):
            v, i = ops.topk_compress_(grad, residual, 50, "sampled" if scheme == "topk-sampled" else "exact", 256, step)
            sent = ops.topk_decompress(v, i, n)
            assert torch.equal(sent + residual, acc)
        elif scheme == "sign":
            bits, scales = ops.sign_compress_(grad, residual, 256)
            sent = ops.sign_decompress(bits, scales, n, 256)
        else:
            q, scales = ops.int8_compress_(grad, residual, 256, step)
            sent = ops.int8_decompress(q, scales, 256)
        err = (sent.double() + residual.double() - acc.double()).abs()
        assert bool((err <= residual.double().abs() * 2.0**-24).all())
        sent_total += sent.double()
        grad_total += grad.double()
    drift = (sent_total + residual.double() - grad_total).abs().max()
    assert float(drift) < 1e-4 * float(grad_total.abs().max())


def test_results_do_not_depend_on_thread_count(backend):
    gen = torch.Generator().manual_seed(7)
    grad = torch.randn(400_003, generator=gen)
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            res = torch.ones(grad.numel())
            outs.append(
                [
                    *ops.topk_compress_(grad, res, 4000),
                    *ops.sign_compress_(grad, res, 70_001),
                    *ops.int8_compress_(grad, res, 2048, 3),
                    res,
                ]
            )
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*outs):
        same(a, b)


# --------------------------------------------------------------------------- PowerSGD


def orth_error(m: torch.Tensor, eps: float = 1e-8) -> tuple[float, float]:
    """(kernel's error, reference's own error), both max |. - fp64 reference|."""
    gold = R.orthogonalize_(m.double().clone(), eps)
    mine = ops.orthogonalize_(m.clone(), eps)
    theirs = R.orthogonalize_(m.clone(), eps)
    return float((mine.double() - gold).abs().max()), float((theirs.double() - gold).abs().max())


@given(
    shape=st.sampled_from([(1, 1), (5, 1), (7, 3), (64, 4), (4096, 4), (3, 100, 8), (2, 2, 33, 2), (16400, 2)]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_orthogonalize_error_within_twice_reference(backend, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(shape, generator=gen)
    err, ref_err = orth_error(m)
    assert err <= 2 * ref_err + 2 * torch.finfo(torch.float32).eps, (err, ref_err)
    q = ops.orthogonalize_(m.clone())
    gram = q.transpose(-1, -2).double() @ q.double()
    assert torch.allclose(gram, torch.eye(shape[-1], dtype=torch.float64).expand_as(gram), atol=1e-4)


def test_orthogonalize_float64_and_in_place(backend):
    gen = torch.Generator().manual_seed(8)
    m = torch.randn(6, 500, 5, generator=gen, dtype=torch.float64)
    out = ops.orthogonalize_(m)
    assert out is m
    expected = R.orthogonalize_(torch.randn(6, 500, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64))
    assert torch.allclose(m, expected, rtol=0, atol=1e-12)


def test_orthogonalize_nan_reaches_later_columns_only(backend):
    m = torch.randn(50, 4)
    m[10, 2] = NAN
    ops.orthogonalize_(m)
    assert not torch.isnan(m[:, :2]).any() and torch.isnan(m[:, 2:]).all()
    z = torch.zeros(2, 8, 3)
    ops.orthogonalize_(z)
    assert torch.equal(z, torch.zeros(2, 8, 3))  # 0 / (0 + eps) stays 0


# --------------------------------------------------------------------------- bad input


def test_bad_bucket_input():
    x = torch.randn(4)
    with pytest.raises(TypeError, match="tensors must be a list"):
        ops.bucket_flatten(x)
    with pytest.raises(ValueError, match="tensors is empty"):
        ops.bucket_flatten([])
    assert ops.bucket_flatten([], torch.bfloat16).shape == (0,)
    with pytest.raises(TypeError, match="mixed dtypes"):
        ops.bucket_flatten([x, x.half()])
    with pytest.raises(TypeError, match="dtype must be"):
        ops.bucket_flatten([x], torch.int32)
    with pytest.raises(TypeError, match=r"tensors\[1\] must be float32"):
        ops.bucket_flatten([x, torch.ones(2, dtype=torch.int64)], torch.float32)
    with pytest.raises(ValueError, match=r"tensors\[0\] must be contiguous"):
        ops.bucket_flatten([torch.randn(3, 4).t()])
    with pytest.raises(TypeError, match="tensors\\[0\\] must be a torch.Tensor"):
        ops.bucket_flatten([[1.0]])
    for bad in (0, -2, INF, NAN):
        with pytest.raises(ValueError, match="divisor must be a finite number > 0"):
            ops.bucket_flatten([x], divisor=bad)
    for bad in (True, "2", None if False else torch.tensor(2.0)):
        with pytest.raises(TypeError, match="divisor must be a number"):
            ops.cast_div(x, bad, torch.bfloat16)
    with pytest.raises(ValueError, match="flat must be 1-D"):
        ops.bucket_unflatten_(torch.randn(2, 2), [torch.empty(4)])
    with pytest.raises(ValueError, match="flat has 4 elements but the tensors hold 5"):
        ops.bucket_unflatten_(x, [torch.empty(5)])
    with pytest.raises(TypeError, match="tensors must be a list"):
        ops.bucket_unflatten_(x, x)
    with pytest.raises(TypeError, match="dtype must be float32, bfloat16 or float16"):
        ops.cast_div(x, 2, torch.float64)
    with pytest.raises(TypeError, match="x must be float32"):
        ops.cast_div(torch.ones(3, dtype=torch.int32), 2, torch.float32)


def test_bad_compressor_input():
    g = torch.randn(10)
    with pytest.raises(ValueError, match="grad is empty"):
        ops.topk_compress_(torch.empty(0), None, 1)
    with pytest.raises(ValueError, match="grad is empty"):
        ops.sign_compress_(torch.empty(0), None)
    with pytest.raises(ValueError, match="grad is empty"):
        ops.int8_compress_(torch.empty(0), None)
    with pytest.raises(TypeError, match="grad must be float32"):
        ops.sign_compress_(torch.ones(4, dtype=torch.int32), None)
    with pytest.raises(ValueError, match="grad must be contiguous"):
        ops.int8_compress_(torch.randn(4, 3).t(), None)
    with pytest.raises(TypeError, match="residual must be torch.float32"):
        ops.topk_compress_(g, torch.zeros(10, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="residual must have grad's 10 elements"):
        ops.sign_compress_(g, torch.zeros(9))
    with pytest.raises(ValueError, match="residual must be contiguous"):
        ops.int8_compress_(torch.randn(2, 5), torch.zeros(5, 2).t())
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\]"):
        ops.topk_compress_(g, None, 0)
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\]"):
        ops.topk_compress_(g, None, 11)
    with pytest.raises(TypeError, match="k must be an int"):
        ops.topk_compress_(g, None, 2.0)
    with pytest.raises(TypeError, match="k must be an int"):
        ops.topk_compress_(g, None, True)
    with pytest.raises(ValueError, match="method must be one of"):
        ops.topk_compress_(g, None, 2, "random")
    with pytest.raises(ValueError, match="sample_size must be >= 1"):
        ops.topk_compress_(g, None, 2, "sampled", 0)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        ops.topk_compress_(g, None, 2, "sampled", 16, -1)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        ops.sign_compress_(g, None, 0)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        ops.int8_compress_(g, None, 4, -3)


def test_bad_payload_input():
    v, i = ops.topk_compress_(torch.randn(20), None, 4)
    with pytest.raises(ValueError, match="must have one shape"):
        ops.topk_decompress(v, i[:3], 20)
    with pytest.raises(TypeError, match="indices must be torch.int32"):
        ops.topk_decompress(v, i.long(), 20)
    with pytest.raises(TypeError, match="values must be torch.float32"):
        ops.topk_decompress(v.half(), i, 20)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 5\)"):
        ops.topk_decompress(v, i, 5)
    with pytest.raises(ValueError, match="numel must be >= 1"):
        ops.topk_decompress(v, i, 0)
    with pytest.raises(ValueError, match="values must be 1-D"):
        ops.topk_decompress(v.reshape(1, 1, 4), i.reshape(1, 1, 4), 20)
    bits, scales = ops.sign_compress_(torch.randn(20), None, 8)
    with pytest.raises(ValueError, match="bits must hold 4 bytes for 30 elements"):
        ops.sign_decompress(bits, scales, 30, 8)
    with pytest.raises(ValueError, match="scales must hold 2 scales"):
        ops.sign_decompress(bits, scales, 20, 16)
    with pytest.raises(ValueError, match="payloads must be all 1-D"):
        ops.sign_decompress(bits.unsqueeze(0), scales, 20, 8)
    with pytest.raises(TypeError, match="bits must be torch.uint8"):
        ops.sign_decompress(bits.to(torch.int8), scales, 20, 8)
    q, scales = ops.int8_compress_(torch.randn(20), None, 8)
    with pytest.raises(ValueError, match="scales must hold 5 scales"):
        ops.int8_decompress(q, scales, 4)
    with pytest.raises(ValueError, match="q is empty"):
        ops.int8_decompress(torch.empty(0, dtype=torch.int8), torch.empty(0), 4)
    with pytest.raises(ValueError, match="payloads must be all 1-D"):
        ops.int8_decompress(torch.stack([q, q]), torch.stack([scales, scales, scales]), 8)
    with pytest.raises(TypeError, match="q must be torch.int8"):
        ops.int8_decompress(q.to(torch.uint8), scales, 8)


def test_bad_orthogonalize_input():
    with pytest.raises(TypeError, match="m must be float32 or float64"):
        ops.orthogonalize_(torch.randn(4, 2).half())
    with pytest.raises(ValueError, match=r"m must be \[..., n, r\]"):
        ops.orthogonalize_(torch.randn(4))
    with pytest.raises(ValueError, match="m must be contiguous"):
        ops.orthogonalize_(torch.randn(2, 4).t())
    for eps in (-1.0, NAN, INF, "0"):
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            ops.orthogonalize_(torch.randn(4, 2), eps)
    with pytest.raises(TypeError, match="m must be a torch.Tensor"):
        ops.orthogonalize_([[1.0]])


@given(k=st.integers(-3, 30), chunk=st.integers(-2, 40), seed=st.integers(-2, 2**62), sample=st.integers(-2, 50))
@settings(max_examples=40, deadline=None)
def test_any_int_argument_works_or_raises_value_error(k, chunk, seed, sample):
    g = torch.randn(25)
    if 1 <= k <= 25 and sample >= 1 and seed >= 0:
        values, indices = ops.topk_compress_(g, None, k, "sampled", sample, seed)
        assert values.shape == (k,)
    else:
        with pytest.raises(ValueError):
            ops.topk_compress_(g, None, k, "sampled", sample, seed)
    if chunk >= 1 and seed >= 0:
        q, scales = ops.int8_compress_(g, None, chunk, seed)
        same(q, R.int8_compress_(g, None, chunk, seed)[0])
    else:
        with pytest.raises(ValueError):
            ops.int8_compress_(g, None, chunk, seed)


def test_native_ops_check_their_arguments_too():
    # Called directly (torch.ops), the kernels reject what the Python layer would.
    g = torch.randn(10)
    with pytest.raises(RuntimeError, match="k must be in"):
        torch.ops.accelops.topk_compress_(g, None, 0)
    with pytest.raises(RuntimeError, match="index 10 lies outside"):
        torch.ops.accelops.topk_decompress(torch.ones(1), torch.tensor([10], dtype=torch.int32), 10)
    with pytest.raises(RuntimeError, match="chunk_size must be >= 1"):
        torch.ops.accelops.sign_compress_(g, None, 0)
    with pytest.raises(RuntimeError, match="flat has 10 elements"):
        torch.ops.accelops.bucket_unflatten_(g, [torch.empty(3)])


# --------------------------------------------------------------------------- registration


def test_opcheck():
    A = torch.ops.accelops
    g = torch.randn(300)
    opcheck = torch.library.opcheck
    opcheck(A.bucket_flatten.default, ([torch.randn(3, 4), torch.randn(5)], torch.bfloat16, 2.0))
    opcheck(A.bucket_flatten.default, ([torch.randn(7)], None, None))
    opcheck(A.bucket_unflatten_.default, (torch.randn(17), [torch.empty(3, 4), torch.empty(5)], 2.0))
    opcheck(A.cast_div.default, (torch.randn(4, 5), 3.0, torch.float16))
    for method in ("exact", "sampled"):
        opcheck(A.topk_compress_.default, (g, torch.randn(300), 7, method, 32, 1))
    opcheck(A.topk_compress_.default, (g.to(torch.bfloat16), None, 300))
    v, i = A.topk_compress_(g, None, 7)
    opcheck(A.topk_decompress.default, (torch.stack([v, v]), torch.stack([i, i]), 300))
    opcheck(A.sign_compress_.default, (g, torch.randn(300), 64))
    bits, scales = A.sign_compress_(g, None, 64)
    opcheck(A.sign_decompress.default, (bits, scales, 300, 64))
    opcheck(A.int8_compress_.default, (g.double(), torch.randn(300), 64, 5))
    q, scales = A.int8_compress_(g, None, 64, 5)
    opcheck(A.int8_decompress.default, (torch.stack([q, q]), torch.stack([scales, scales]), 64))
    opcheck(A.orthogonalize_.default, (torch.randn(2, 30, 3), 1e-8))


def test_compiles_fullgraph():
    def step(grad, residual):
        bits, scales = ops.sign_compress_(grad, residual, 128)
        return ops.sign_decompress(bits, scales, grad.numel(), 128)

    grad = torch.randn(1000)
    r1, r2 = torch.zeros(1000), torch.zeros(1000)
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    same(compiled(grad, r1), step(grad, r2))
    same(r1, r2)
