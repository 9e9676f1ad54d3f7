"""Issue 22, item 2: an x whose K differs from the K a layer or a packed weight was made for
is refused, including a smaller K that fits the padding of the packed layout's last
128-block (K=4000 on in_features=4096), which used to be read as zero-padded."""

import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from accelops import ops
from accelops import reference as R
from accelops.nn import BitLinear, Int8Linear, TernaryLinear
from accelops.ops import ternary as ops_ternary

from .helpers import assert_close_to_reference

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _nonzero_ternary(n, k):
    """Random ternary weights whose every column holds a non-zero weight, so any position
    past a smaller K holds one too."""
    wq = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    wq[0] = torch.where(wq[0] == 0, torch.ones_like(wq[0]), wq[0])
    return wq


# ------------------------------------------------------------------ the issue's repros


def test_issue_repro_ternary_linear_4096_x_4000():
    layer = TernaryLinear.from_linear(nn.Linear(4096, 64))
    with pytest.raises(ValueError, match=r"in_features=4096, got K=4000"):
        layer(torch.randn(2, 4000))


def test_issue_repro_op_k100_on_weights_packed_for_128(backend):
    packed, scale = ops.quantize_weight_ternary(torch.randn(8, 128))
    x = torch.randn(2, 100)
    with pytest.raises(ValueError, match=r"packed for a larger K than x's: x has K=100.*padded K=128.*pass k="):
        ops.ternary_matmul(x, packed, scale)
    with pytest.raises(ValueError, match=r"must equal k=128 .*got K=100"):
        ops.ternary_matmul(x, packed, scale, k=128)


# ------------------------------------------------------------------ the op


@pytest.mark.parametrize("k_w, k_x", [(128, 100), (128, 1), (300, 257), (300, 299), (4096, 4000)])
def test_op_without_k_refuses_weights_in_the_padding(backend, k_w, k_x):
    packed = ops.pack_ternary(_nonzero_ternary(5, k_w))
    assert packed.shape[1] == ops.packed_cols(k_x)  # the shapes alone agree
    with pytest.raises(
        ValueError,
        match=rf"x has K={k_x}, .*padded K={ops.packed_cols(k_w) * 4}\) .*"
        rf"positions {k_x}\.\.{ops.packed_cols(k_w) * 4 - 1}",
    ):
        ops.ternary_matmul(torch.randn(3, k_x), packed, torch.ones(1))


@pytest.mark.parametrize("k", [1, 5, 100, 127, 129, 300, 4000])
def test_op_accepts_its_own_k_with_and_without_k(backend, k):
    wq = torch.randint(-1, 2, (6, k), dtype=torch.int8)
    packed, scale = ops.pack_ternary(wq), torch.rand(6) + 0.5
    x, bias = torch.randn(2, 3, k), torch.randn(6)
    y = ops.ternary_matmul(x, packed, scale, bias)
    assert torch.equal(ops.ternary_matmul(x, packed, scale, bias, k=k), y)
    assert_close_to_reference(y, R.ternary_matmul(x, packed, scale, bias))


@pytest.mark.parametrize("k", [128, 256, 4096])
def test_block_multiple_k_is_unaffected(backend, k):
    # No padding: nothing to check beyond the column count, with or without k.
    packed = ops.pack_ternary(_nonzero_ternary(4, k))
    x = torch.randn(3, k)
    y = ops.ternary_matmul(x, packed, torch.ones(1))
    assert torch.equal(ops.ternary_matmul(x, packed, torch.ones(1), k=k), y)
    assert_close_to_reference(y, R.ternary_matmul(x, packed, torch.ones(1)))
    # one less: inside the last block, so the padding check; one more: another block count
    with pytest.raises(ValueError, match=rf"x has K={k - 1}, .*padded K={k}"):
        ops.ternary_matmul(torch.randn(3, k - 1), packed, torch.ones(1))
    with pytest.raises(ValueError, match=rf"w_packed must have {ops.packed_cols(k + 1)} columns"):
        ops.ternary_matmul(torch.randn(3, k + 1), packed, torch.ones(1))


def test_op_x_longer_than_the_packed_k():
    # Weights packed for K=100 with x of K=120: without k the padding holds zeros, which a
    # weight of K=120 with 20 trailing zeros would too, so only k= can tell.
    packed = ops.pack_ternary(_nonzero_ternary(4, 100))
    x = torch.randn(2, 120)
    ops.ternary_matmul(x, packed, torch.ones(1))
    with pytest.raises(ValueError, match=r"must equal k=100 .*got K=120 \(x of shape \(2, 120\)\)"):
        ops.ternary_matmul(x, packed, torch.ones(1), k=100)


def test_op_k_argument_checks():
    packed = ops.pack_ternary(_nonzero_ternary(4, 100))
    x = torch.randn(2, 100)
    for bad in (-1, 1.5, True, "100"):
        with pytest.raises(ValueError, match=r"k must be a non-negative int"):
            ops.ternary_matmul(x, packed, torch.ones(1), k=bad)
    # k agrees with x but not with w_packed: the column check names the K and the shape
    with pytest.raises(ValueError, match=r"w_packed must have 64 columns .* K=200, got shape \(4, 32\)"):
        ops.ternary_matmul(torch.randn(2, 200), packed, torch.ones(1), k=200)
    with pytest.raises(TypeError):
        ops.ternary_matmul(x, packed, torch.ones(1), None, 100)  # k is keyword-only


def test_op_with_k_reads_no_weight_data(monkeypatch):
    # With k the checks are on shapes only: nothing that would wait for a GPU.
    def refuse(*args):
        raise AssertionError("the padding check ran although k was given")

    monkeypatch.setattr(ops_ternary, "_check_padding", refuse)
    packed = ops.pack_ternary(_nonzero_ternary(4, 100))
    ops.ternary_matmul(torch.randn(2, 100), packed, torch.ones(1), k=100)
    with pytest.raises(AssertionError, match="padding check ran"):
        ops.ternary_matmul(torch.randn(2, 100), packed, torch.ones(1))


def test_op_without_k_under_torch_compile_fullgraph():
    # The padding check needs data; a trace skips it rather than breaking the graph.
    packed = ops.pack_ternary(_nonzero_ternary(4, 100))
    x = torch.randn(2, 100)
    compiled = torch.compile(lambda x: ops.ternary_matmul(x, packed, torch.ones(1)), fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), ops.ternary_matmul(x, packed, torch.ones(1), k=100))


@given(k_w=st.integers(1, 520), data=st.data(), zero_tail=st.booleans(), use_k=st.booleans())
@SETTINGS
def test_op_refuses_exactly_the_mismatches_it_can_see(backend, k_w, data, zero_tail, use_k):
    """Over x's K within w_packed's block count: with k=, anything but K equal to k is refused;
    without it, exactly the x whose K leaves a non-zero weight in the padding."""
    lo = (ops.packed_cols(k_w) // 32 - 1) * 128 + 1
    k_x = data.draw(st.integers(lo, ops.packed_cols(k_w) * 4), label="k_x")
    wq = torch.randint(-1, 2, (3, k_w), dtype=torch.int8)
    if zero_tail and k_x < k_w:
        wq[:, k_x:] = 0  # a weight whose trailing weights quantized to 0: indistinguishable without k
    packed = ops.pack_ternary(wq)
    x = torch.randn(2, k_x)
    if use_k:
        if k_x != k_w:
            with pytest.raises(ValueError, match=rf"must equal k={k_w} .*got K={k_x}"):
                ops.ternary_matmul(x, packed, torch.ones(1), k=k_w)
            return
        y = ops.ternary_matmul(x, packed, torch.ones(1), k=k_w)
    elif k_x < k_w and bool((wq[:, k_x:] != 0).any()):
        with pytest.raises(ValueError, match=rf"x has K={k_x}, .*positions {k_x}\.\."):
            ops.ternary_matmul(x, packed, torch.ones(1))
        return
    else:
        y = ops.ternary_matmul(x, packed, torch.ones(1))
    assert_close_to_reference(y, R.ternary_matmul(x, packed, torch.ones(1)))


# ------------------------------------------------------------------ the layers


def _layers(k, n):
    lin = nn.Linear(k, n)
    return {
        "TernaryLinear": TernaryLinear.from_linear(lin),
        "Int8Linear": Int8Linear.from_linear(lin),
        "BitLinear": BitLinear.from_linear(nn.Linear(k, n)),
    }


@pytest.mark.parametrize("name", ["TernaryLinear", "Int8Linear", "BitLinear"])
@pytest.mark.parametrize("k_x", [100, 129, 127, 0])
def test_layers_refuse_another_k(backend, name, k_x):
    layer = _layers(128, 8)[name]
    x = torch.randn(2, 3, k_x)
    for grad in (True, False):  # BitLinear: the training path and the packed inference path
        with torch.set_grad_enabled(grad):
            with pytest.raises(
                ValueError,
                match=rf"{name}: x's last dim must equal in_features=128, got K={k_x} "
                rf"\(x of shape \(2, 3, {k_x}\)\)",
            ):
                layer(x)


@pytest.mark.parametrize("name", ["TernaryLinear", "Int8Linear", "BitLinear"])
def test_layers_still_run_their_own_k(backend, name):
    layer = _layers(100, 8)[name]
    x = torch.randn(4, 100)
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (4, 8) and torch.isfinite(y).all()


def test_ternary_linear_state_dict_round_trip_keeps_working():
    for k in (100, 128, 4000):
        layer = TernaryLinear.from_linear(nn.Linear(k, 16), per_channel=True)
        buf = io.BytesIO()
        torch.save(layer.state_dict(), buf)
        buf.seek(0)
        fresh = TernaryLinear(k, 16, per_channel=True)
        fresh.load_state_dict(torch.load(buf))
        x = torch.randn(3, k)
        assert torch.equal(fresh(x), layer(x))
        with pytest.raises(ValueError, match=rf"in_features={k}, got K={k - 1}"):
            fresh(torch.randn(3, k - 1))
