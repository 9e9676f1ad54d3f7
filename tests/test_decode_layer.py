"""accelops::ternary_decode_layer (one fused decode step of a ternary block) against its
reference, and generate()'s fused decode path against the modules' eager step."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import accelops
from accelops import ops
from accelops.models import TransformerLM, TransformerLMConfig
from accelops.models.generate import fused_decode_plan
from accelops.models.layers import rope_cos_sin
from accelops.ops import _backend
from accelops.reference import decode as ref
from accelops.reference import ternary as R
from tests.conftest import CPU_ISAS

HAS_EXTENSION = _backend.extension()[0] is not None


def layer_args(
    batch=2,
    dim=64,
    n_heads=4,
    kv_heads=2,
    hidden=96,
    size=16,
    positions=(5, 9),
    activation="relu2",
    sub_norms=True,
    biases=False,
    per_channel=True,
    seed=0,
):
    """The arguments of one accelops::ternary_decode_layer call (a random block, caches
    holding random keys and values) as a tuple in schema order."""
    g = torch.Generator().manual_seed(seed)
    hd = dim // n_heads
    kv = kv_heads * hd
    shapes = [(dim, dim), (kv, dim), (kv, dim), (dim, dim), (hidden, dim), (hidden, dim), (dim, hidden)]
    quantized = [R.quantize_weight_ternary(torch.randn(n, k, generator=g), per_channel) for n, k in shapes]
    w_packed, w_scale = [w for w, _ in quantized], [s for _, s in quantized]
    bias = [torch.randn(n, generator=g) if biases else None for n, _ in shapes]
    norms = [torch.rand(dim, generator=g) + 0.5, torch.rand(dim, generator=g) + 0.5]
    norms += [torch.rand(dim, generator=g) + 0.5, torch.rand(hidden, generator=g) + 0.5]
    if not sub_norms:
        norms[1] = norms[3] = None
    pos = torch.tensor(positions[:batch], dtype=torch.long)
    cos, sin = rope_cos_sin(pos, hd, 10000.0, torch.float32)
    k_cache = torch.randn(batch, kv_heads, size, hd, generator=g)
    v_cache = torch.randn(batch, kv_heads, size, hd, generator=g)
    x = torch.randn(batch, dim, generator=g) * 2
    in_features = [k for _, k in shapes]
    return (x, pos, cos, sin, k_cache, v_cache, norms, w_packed, w_scale, bias, in_features, n_heads, 1e-5, activation)


def _clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _check_against_reference(args):
    mine, theirs = _clone(args), _clone(args)
    out = torch.ops.accelops.ternary_decode_layer(*mine)
    want = ref.ternary_decode_layer(*theirs)
    # fp32 norms / softmax in another reduction order: rounding-level differences, which an
    # int8 activation rounding step can turn into one quantization step of a projection
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    for a, b in ((mine[4], theirs[4]), (mine[5], theirs[5])):  # the caches, written at the positions
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    return out


@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
@pytest.mark.parametrize("sub_norms", [True, False])
def test_matches_reference(activation, sub_norms):
    _check_against_reference(layer_args(activation=activation, sub_norms=sub_norms))


@pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ kernel's instruction-set paths")
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("n_heads, kv_heads, hd", [(8, 2, 16), (6, 2, 8), (3, 3, 16), (4, 1, 6), (12, 4, 8)])
def test_every_isa_path_matches_reference(monkeypatch, isa, n_heads, kv_heads, hd):
    """Each level this CPU runs (the vector attention takes 1-4 query heads a key/value head,
    head_dim a multiple of 8; the scalar one the rest), long enough for the vector exp."""
    monkeypatch.setenv("ACCELOPS_CPU_ISA", isa)
    for positions in ((0, 37), (29, 3)):
        args = layer_args(dim=n_heads * hd, n_heads=n_heads, kv_heads=kv_heads, hidden=40, size=40, positions=positions)
        _check_against_reference(args)


def test_softmax_of_far_apart_scores():
    """Scores that differ by more than expf's range: the vector exp's underflow gives 0, as
    the reference's softmax does, never NaN."""
    args = layer_args(positions=(10, 12), size=16)
    args[4][:, :, :5] *= 1e4  # keys of huge dot products with any query
    out = _check_against_reference(args)
    assert torch.isfinite(out).all()


def test_matches_reference_with_biases_and_per_tensor_scales():
    _check_against_reference(layer_args(biases=True, per_channel=False))


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    n_heads=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 2]),
    hd=st.sampled_from([2, 8, 16]),
    hidden=st.integers(1, 300),
    size=st.integers(1, 12),
    data=st.data(),
)
def test_shapes_match_reference(batch, n_heads, group, hd, hidden, size, data):
    if n_heads % group:
        group = 1
    positions = tuple(data.draw(st.integers(0, size - 1)) for _ in range(batch))
    args = layer_args(
        batch=batch,
        dim=n_heads * hd,
        n_heads=n_heads,
        kv_heads=n_heads // group,
        hidden=hidden,
        size=size,
        positions=positions,
        activation=data.draw(st.sampled_from(ref.ACTIVATIONS)),
        sub_norms=data.draw(st.booleans()),
        seed=data.draw(st.integers(0, 1000)),
    )
    _check_against_reference(args)


def test_only_the_rows_slots_are_written_and_read():
    """Row b writes its slot positions[b] and nothing else; slots after it never matter."""
    args = layer_args(positions=(2, 7))
    mine = _clone(args)
    before_k, before_v = mine[4].clone(), mine[5].clone()
    out = torch.ops.accelops.ternary_decode_layer(*mine)
    changed = (mine[4] != before_k).any(-1)  # [batch, kv_heads, size]
    for b, p in enumerate((2, 7)):
        assert changed[b, :, p].all() and not changed[b, :, :p].any() and not changed[b, :, p + 1 :].any()
    assert torch.equal((mine[5] != before_v).any(-1), changed)
    later = _clone(args)
    later[4][:, :, 8:] = 1e6  # garbage past every row's position
    later[5][:, :, 8:] = float("nan")
    torch.testing.assert_close(torch.ops.accelops.ternary_decode_layer(*later), out)


def test_projections_are_ternary_matmuls():
    """With identity norms, no attention mixing (one slot) and relu2, the output is computed
    from ternary_matmul outputs exactly as the reference composes them: the GEMVs are exact."""
    args = list(layer_args(batch=1, positions=(0,), size=1))
    args[6] = [torch.ones(64), None, torch.ones(64), None]
    out = torch.ops.accelops.ternary_decode_layer(*_clone(args))
    torch.testing.assert_close(out, ref.ternary_decode_layer(*_clone(args)), rtol=1e-5, atol=1e-5)


def test_opcheck():
    for kwargs in ({}, {"activation": "swiglu", "sub_norms": False, "biases": True}):
        torch.library.opcheck(torch.ops.accelops.ternary_decode_layer.default, layer_args(**kwargs))


def test_public_function_runs_the_op():
    args = layer_args()
    x, pos, cos, sin, kc, vc, norms, wp, ws, bias, inf, n_heads, eps, act = _clone(args)
    out = ops.ternary_decode_layer(
        x, pos, cos, sin, kc, vc, norms, wp, ws, bias, in_features=inf, n_heads=n_heads, eps=eps, activation=act
    )
    torch.testing.assert_close(out, torch.ops.accelops.ternary_decode_layer(*_clone(args)))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.__setitem__(0, a[0].double()), "x must be torch.float32"),
        (lambda a: a.__setitem__(1, torch.tensor([5, 16])), r"positions must lie in \[0, 16\)"),
        (lambda a: a.__setitem__(1, torch.tensor([5, -1])), r"positions must lie in \[0, 16\)"),
        (lambda a: a.__setitem__(1, torch.tensor([5])), r"positions must have shape \(2,\)"),
        (lambda a: a.__setitem__(2, a[2][:, :4].contiguous()), "cos must have shape"),
        (lambda a: a.__setitem__(5, a[5][:, :, :8].contiguous()), "v_cache must have shape"),
        (lambda a: a.__setitem__(11, 3), "n_heads=3 does not fit"),
        (lambda a: a.__setitem__(12, 0.0), "eps must be a float > 0"),
        (lambda a: a.__setitem__(13, "gelu"), "activation must be one of"),
        (lambda a: a[7].__setitem__(1, a[7][1][:8]), r"w_packed\[1\] \(k_proj\) must be a contiguous"),
        (lambda a: a[8].__setitem__(4, torch.ones(3)), r"w_scale\[4\] \(gate_proj\) must hold 1 or N=96"),
        (lambda a: a[6].__setitem__(0, None), r"norms\[0\] \(norm1\) must be a torch.Tensor"),
        (lambda a: a[6].__setitem__(3, torch.ones(64)), r"norms\[3\] \(ffn_sub_norm\) must have shape \(96,\)"),
        (lambda a: a[9].__setitem__(6, torch.ones(5)), r"bias\[6\] \(down_proj\) must have shape \(64,\)"),
        (lambda a: a.__setitem__(7, a[7][:6]), "w_packed must be a list of 7 entries"),
    ],
)
def test_bad_input_is_named(change, message):
    args = list(_clone(layer_args()))
    args[6:10] = [list(a) for a in args[6:10]]
    change(args)
    x, pos, cos, sin, kc, vc, norms, wp, ws, bias, inf, n_heads, eps, act = args
    with pytest.raises((ValueError, TypeError), match=message):
        ops.ternary_decode_layer(
            x, pos, cos, sin, kc, vc, norms, wp, ws, bias, in_features=inf, n_heads=n_heads, eps=eps, activation=act
        )


@pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ kernel's own checks")
def test_kernel_refuses_a_position_outside_the_cache():
    args = list(_clone(layer_args()))
    args[1] = torch.tensor([5, 16])
    with pytest.raises(RuntimeError, match=r"positions\[1\]=16 lies outside the cache of 16 slots"):
        torch.ops.accelops.ternary_decode_layer(*args)


# --------------------------------------------------------------------------- in_features

# layer_args(): q .. up read x's dim 64, down the FFN width 96; a weight packed for K=100
# (q .. up) or K=120 (down) has the same packed width (one 128-block, 32 bytes a row), which
# the op used to read as if zero-padded to the block's K: a silently wrong result.
DIM, HIDDEN = 64, 96
LARGER_K = [100] * 6 + [120]
PATHS = ["public", "kernel", "reference", "fake"]


def _with_larger_k(i):
    """layer_args() with projection i packed for LARGER_K[i] (nonzero weights at every
    position past the block's K), and in_features saying so: -> the argument list."""
    args = list(layer_args())
    args[7], args[10] = list(args[7]), list(args[10])
    n, k = args[7][i].shape[0], LARGER_K[i]
    wq = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(i))
    implied = HIDDEN if i == 6 else DIM
    wq[:, implied:] = torch.where(wq[:, implied:] == 0, 1, wq[:, implied:]).to(torch.int8)
    args[7][i] = R.pack_ternary(wq)
    assert args[7][i].shape == (n, R.packed_cols(implied))  # the shapes alone agree
    args[10][i] = k
    return args


def _call(path, args, format="i2"):
    """The op through one path: the public function, the dispatcher's CPU kernel (C++ with
    the extension), the reference, or the fake kernel (meta tensors)."""
    if path == "public":
        x, pos, cos, sin, kc, vc, norms, wp, ws, bias, inf, n_heads, eps, act = args
        return ops.ternary_decode_layer(
            x, pos, cos, sin, kc, vc, norms, wp, ws, bias, in_features=inf, n_heads=n_heads, eps=eps, activation=act,
            format=format,
        )  # fmt: skip
    args = list(args) + [format]
    if path == "reference":
        return ref.ternary_decode_layer(*args)
    if path == "fake":
        meta = [
            [None if t is None else t.to("meta") for t in a] if isinstance(a, list) and i != 10 else a
            for i, a in enumerate(args)
        ]
        meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in meta]
        return torch.ops.accelops.ternary_decode_layer(*meta)
    if HAS_EXTENSION:  # the C++ kernel is what the dispatcher runs for CPU tensors
        assert torch._C._dispatch_has_kernel_for_dispatch_key("accelops::ternary_decode_layer", "CPU")
    return torch.ops.accelops.ternary_decode_layer(*args)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("i", range(7), ids=ref.PROJECTIONS)
def test_a_weight_packed_for_a_larger_k_is_refused(path, i):
    args = _with_larger_k(i)
    before = args[4].clone(), args[5].clone()
    source = r"up_proj's N, the FFN width" if i == 6 else r"x's dim"
    implied = HIDDEN if i == 6 else DIM
    with pytest.raises(
        ValueError,
        match=rf"in_features\[{i}\] \({ref.PROJECTIONS[i]}\) = {LARGER_K[i]} does not match its input's "
        rf"K={implied} \({source}\): w_packed\[{i}\] was packed for another K",
    ):
        _call(path, args)
    # refused before anything ran: the caches are as they were
    assert torch.equal(args[4], before[0]) and torch.equal(args[5], before[1])


@pytest.mark.parametrize("path", PATHS)
def test_in_features_that_agree_run(path):
    args = layer_args()
    assert args[10] == [DIM] * 6 + [HIDDEN]
    out = _call(path, list(_clone(args)))
    assert out.shape == (2, DIM)


@pytest.mark.parametrize("path", PATHS)
def test_in_features_against_the_packed_width(path):
    """in_features agrees with the block, but a weight has another block count."""
    args = list(layer_args())
    args[7] = list(args[7])
    args[7][6] = R.pack_ternary(torch.ones(DIM, 200, dtype=torch.int8))  # 2 blocks for K=96
    with pytest.raises(
        (ValueError, RuntimeError),  # the C++ kernel's shape checks raise RuntimeError
        match=r"w_packed\[6\] \(down_proj\) must .*32.* in_features\[6\]=96.*got .*\(?64, 64\)?",
    ):
        _call(path, args)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "bad, message",
    [
        ([DIM] * 6, r"in_features must be a list of 7 ints \(q_proj, .*down_proj\), got 6 entries"),
        ([DIM] * 6 + [HIDDEN, HIDDEN], r"in_features must be a list of 7 ints .*got 8 entries"),
        ([DIM, 0, DIM, DIM, DIM, DIM, HIDDEN], r"in_features\[1\] \(k_proj\) must be a positive int, got 0"),
        ([DIM] * 6 + [DIM], r"in_features\[6\] \(down_proj\) = 64 does not match its input's K=96"),
        ([DIM, DIM, DIM, HIDDEN, DIM, DIM, HIDDEN], r"in_features\[3\] \(o_proj\) = 96 does not match .*K=64"),
    ],
)
def test_bad_in_features_are_named(path, bad, message):
    args = list(layer_args())
    args[10] = bad
    with pytest.raises(ValueError, match=message):
        _call(path, args)


def test_public_in_features_is_required_and_typed():
    x, pos, cos, sin, kc, vc, norms, wp, ws, bias, inf, n_heads, eps, act = layer_args()
    with pytest.raises(TypeError, match="in_features"):
        ops.ternary_decode_layer(x, pos, cos, sin, kc, vc, norms, wp, ws, bias, n_heads=n_heads, eps=eps, activation=act)  # fmt: skip
    for bad, message in ((64, "in_features must be a list of 7 ints"), ([True] + inf[1:], "must be a positive int")):
        with pytest.raises(ValueError, match=message):
            ops.ternary_decode_layer(
                x, pos, cos, sin, kc, vc, norms, wp, ws, bias, in_features=bad, n_heads=n_heads, eps=eps,
                activation=act,
            )  # fmt: skip


# --------------------------------------------------------------------------- generate(fused=...)


def _model(activation="relu2", seed=0, **overrides):
    torch.manual_seed(seed)
    shape = dict(dim=128, n_layers=3, n_heads=4, n_kv_heads=2, hidden=256, vocab_size=300, max_len=96)
    shape.update(overrides)
    cfg = TransformerLMConfig.bitnet_2b4t(**shape, activation=activation)
    model = TransformerLM(cfg)
    accelops.convert(model, "ternary", head="int8")
    return model.eval()


@pytest.mark.skipif(not HAS_EXTENSION, reason="the fused step needs the C++ extension")
@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
def test_generate_fused_equals_eager_and_no_cache_argmax(activation):
    model = _model(activation)
    assert fused_decode_plan(model)[0] is not None
    prompts = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 12, 3)]
    fused = model.generate(prompts, 20, temperature=0, fused=True)
    eager = model.generate(prompts, 20, temperature=0, fused=False)
    assert torch.equal(fused, eager)
    assert torch.equal(model.generate(prompts, 20, temperature=0), fused)  # the default takes it
    with torch.no_grad():
        for i, p in enumerate(prompts):  # token for token the no-cache forward's argmax
            seq = torch.cat([p, fused[i]])
            assert torch.equal(model(seq[None, :-1])[0, p.numel() - 1 :].argmax(-1), fused[i])


@pytest.mark.skipif(not HAS_EXTENSION, reason="the fused step needs the C++ extension")
def test_generate_fused_llama_shaped_ternary_model():
    """No sub-norms, swiglu: the FFN is a FusedFFN(quant="ternary"), which the plan takes too."""
    torch.manual_seed(1)
    cfg = TransformerLMConfig(
        vocab_size=300, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden=256, max_len=64,
        activation="swiglu", pos_emb="rope", norm="rmsnorm",
    )  # fmt: skip
    model = TransformerLM(cfg)
    accelops.convert(model, "ternary")
    model.eval()
    assert type(model.blocks[0].ffn).__name__ == "FusedFFN"
    assert fused_decode_plan(model)[0] is not None
    prompts = [[5, 6, 7, 8], [9, 10]]
    assert torch.equal(
        model.generate(prompts, 12, temperature=0, fused=True), model.generate(prompts, 12, temperature=0, fused=False)
    )


@pytest.mark.skipif(not HAS_EXTENSION, reason="the fused step needs the C++ extension")
def test_generate_fused_sampling_is_seeded():
    model = _model()
    a = model.generate([[1, 2, 3]], 10, temperature=0.8, top_p=0.9, seed=3, fused=True)
    b = model.generate([[1, 2, 3]], 10, temperature=0.8, top_p=0.9, seed=3, fused=True)
    assert torch.equal(a, b)


def test_fused_plan_says_why_not():
    model = _model()
    fp32 = TransformerLM(model.config).eval()  # unconverted: nn.Linear projections
    plan, why = fused_decode_plan(fp32)
    assert plan is None and "TernaryLinear" in why
    with pytest.raises(ValueError, match="fused=True: this model's decode step cannot run fused: .*TernaryLinear"):
        fp32.generate([[1, 2]], 3, temperature=0, fused=True)
    assert fp32.generate([[1, 2]], 3, temperature=0).shape == (1, 3)  # the default falls back
    layer_norm = _model(norm="layernorm")
    assert "norm='rmsnorm'" in fused_decode_plan(layer_norm)[1]
    with pytest.raises(ValueError, match="choose one"):
        model.generate([[1, 2]], 3, temperature=0, fused=True, compile=True)
    with pytest.raises(ValueError, match="fused must be None, True or False"):
        model.generate([[1, 2]], 3, temperature=0, fused=1)


@pytest.mark.skipif(not HAS_EXTENSION, reason="the fused step needs the C++ extension")
def test_hooks_keep_the_eager_step():
    """A forward hook on a block would be skipped by the fused op: the plan refuses, and the
    default generate runs the hooked modules."""
    model = _model()
    calls = []
    handle = model.blocks[1].ffn.register_forward_hook(lambda *a: calls.append(1))
    plan, why = fused_decode_plan(model)
    assert plan is None and "forward hooks" in why and "blocks[1]" in why
    model.generate([[1, 2, 3]], 4, temperature=0)
    assert len(calls) == 4  # prefill + 3 decode steps
    handle.remove()
    assert fused_decode_plan(model)[0] is not None


@pytest.mark.skipif(not HAS_EXTENSION, reason="the fused step needs the C++ extension")
def test_fused_plan_passes_each_layers_in_features():
    model = _model(hidden=200)
    plan, _ = fused_decode_plan(model)
    assert all(layer[4] == [128] * 6 + [200] for layer in plan)
    # A down_proj packed for K=250 where the FFN is 200 wide: the same 2 packed blocks a row,
    # which the fused step used to read as zero-padded; now the op names it. (generate's
    # eager prefill would stop first, in TernaryLinear's own check: the plan's call directly.)
    model.blocks[1].ffn.down_proj = accelops.nn.TernaryLinear.from_linear(torch.nn.Linear(250, 128))
    norms, w_packed, w_scale, bias, in_features, _format = fused_decode_plan(model)[0][1]
    assert in_features[6] == 250 and w_packed[6].shape == (128, R.packed_cols(200))
    cfg = model.config
    pos = torch.tensor([3])
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, torch.float32)
    cache = torch.zeros(1, cfg.kv_heads, 8, cfg.head_dim)
    with pytest.raises(ValueError, match=r"in_features\[6\] \(down_proj\) = 250 does not match its input's K=200"):
        torch.ops.accelops.ternary_decode_layer(
            torch.randn(1, 128), pos, cos, sin, cache, cache.clone(), norms, w_packed, w_scale, bias, in_features,
            cfg.n_heads, cfg.norm_eps, cfg.activation,
        )  # fmt: skip


# --------------------------------------------------------------------------- the base3 format


def _as_base3(args):
    """The same block with its seven weights repacked in the base3 format (5 weights a byte)."""
    w_packed, in_features = args[7], args[10]
    w_b3 = [ops.convert_ternary_format(w, "i2", "base3", n=w.shape[0], k=k) for w, k in zip(w_packed, in_features)]
    return args[:7] + (w_b3,) + args[8:]


def _check_base3(args):
    """base3 weights give the i2 kernel's result bit for bit (every projection is the same exact
    int32 sum and epilogue) and match the reference run on base3 weights."""
    b3 = _as_base3(args)
    want_i2 = torch.ops.accelops.ternary_decode_layer(*_clone(args))
    mine, theirs = _clone(b3), _clone(b3)
    out = torch.ops.accelops.ternary_decode_layer(*mine, "base3")
    torch.testing.assert_close(out, want_i2, rtol=0, atol=0)
    want = ref.ternary_decode_layer(*theirs, "base3")
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    for a, b in ((mine[4], theirs[4]), (mine[5], theirs[5])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu2", "swiglu"])
def test_base3_matches_i2_and_reference(activation):
    # dim 64 / hidden 96 pad to one 320 block; hidden 700 to three (K not a multiple of 320)
    _check_base3(layer_args(activation=activation))
    _check_base3(layer_args(activation=activation, hidden=700, biases=True, per_channel=False))


@pytest.mark.skipif(not HAS_EXTENSION, reason="the C++ kernel's instruction-set paths")
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_base3_every_isa_path(monkeypatch, isa):
    monkeypatch.setenv("ACCELOPS_CPU_ISA", isa)
    _check_base3(layer_args(dim=320, n_heads=4, kv_heads=2, hidden=650, size=24, positions=(3, 21), batch=2))


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 3), hidden=st.integers(1, 700), seed=st.integers(0, 1000))
def test_base3_shapes(batch, hidden, seed):
    _check_base3(layer_args(batch=batch, hidden=hidden, positions=(0, 7, 15)[:batch], seed=seed))


@pytest.mark.parametrize("path", PATHS)
def test_base3_weights_need_format_base3(path):
    """i2 weights called as base3 (or the reverse) have the wrong width: a named error, caches
    untouched; an unknown format is named too."""
    args = layer_args(dim=320, n_heads=4, kv_heads=2, hidden=640)
    b3 = _as_base3(args)
    for call_args, fmt, msg in (
        (args, "base3", r"w_packed\[0\] \(q_proj\) must (be a contiguous uint8 )?\[?.*64"),
        (b3, "i2", r"w_packed\[0\] \(q_proj\) must"),
        (args, "i3", "format must be"),
    ):
        c = _clone(call_args)
        before = c[4].clone()
        with pytest.raises((ValueError, RuntimeError), match=msg):
            _call(path, list(c), fmt)
        assert torch.equal(c[4], before)


def test_base3_opcheck():
    torch.library.opcheck(torch.ops.accelops.ternary_decode_layer, _as_base3(layer_args()) + ("base3",))


@pytest.mark.skipif(not HAS_EXTENSION, reason="the fused step needs the C++ extension")
def test_generate_fused_base3_model_equals_i2():
    from accelops.nn import TernaryLinear

    model = _model()
    prompts = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 12)]
    i2 = model.generate(prompts, 12, temperature=0, fused=True)
    for m in model.modules():
        if isinstance(m, TernaryLinear):
            m.to_format("base3")
    plan, why = fused_decode_plan(model)
    assert why is None and plan[0][5] == "base3"
    assert torch.equal(model.generate(prompts, 12, temperature=0, fused=True), i2)
    assert torch.equal(model.generate(prompts, 12, temperature=0, fused=False), i2)
    model.blocks[1].attn.o_proj.to_format("i2")  # one layer in another format: the plan says so
    assert "mixes packed formats" in fused_decode_plan(model)[1]
    model.blocks[0].ffn.up_proj.to_format("lut3")
    assert "format 'lut3'" in fused_decode_plan(model)[1]
