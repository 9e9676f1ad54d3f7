"""convert() on whole models: accelops' TransformerLM (FusedFFN), Hugging Face transformers
models built from configs with random weights (Llama, Qwen2, GPT-2 with its Conv1D, BitNet),
the output head, tied weights, atomicity and the report's account of what runs.
Regression tests for issue 22, items 1, 3, 4 and 5."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import accelops
from accelops.models import TransformerLM, TransformerLMConfig
from accelops.nn import BitLinear, FusedFFN, Int8Linear, QATLinear, TernaryLinear, convert

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _cosine(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def _tlm(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=65, dim=128, n_layers=2, n_heads=4, max_len=64)
    cfg.update(kw)
    return TransformerLM(TransformerLMConfig(**cfg)).eval()


def _tokens(vocab=65, t=16):
    return torch.randint(0, vocab, (2, t), generator=torch.Generator().manual_seed(1))


def _llama(tie=False, cls_name="Llama"):
    torch.manual_seed(0)
    cfg_cls = getattr(transformers, f"{cls_name}Config")
    model_cls = getattr(transformers, f"{cls_name}ForCausalLM")
    cfg = cfg_cls(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return model_cls(cfg).eval()


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def _unique_bytes(model):
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


# --------------------------------------------------------------------------- 1. FusedFFN


def test_bitlinear_reaches_the_fused_ffn():
    """Before: the FusedFFN's projections were swapped for BitLinear but FusedFFN.forward read
    p.weight, so the FFN ran in fp32 (its output equal to the fp32 FFN's)."""
    model = _tlm()
    x = torch.randn(2, 8, 128)
    fp32_ffn = copy.deepcopy(model.blocks[0].ffn)
    report = convert(model, "bitlinear")
    ffn = model.blocks[0].ffn
    assert type(ffn) is FusedFFN and ffn.quant == "bitlinear"
    with torch.no_grad():
        y = ffn(x)
        assert not torch.equal(y, fp32_ffn(x))
        # the fused bitlinear FFN is three BitLinear layers composed, up to fp32 rounding
        unfused = FusedFFN.from_module(fp32_ffn.to_module(), quant="bitlinear").to_module()
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(unfused, name, BitLinear.from_linear(getattr(unfused, name)))
        assert _cosine(y, unfused(x)) > 0.9999
    row = next(s for s in report.swapped if s.fqn == "blocks.0.ffn")
    assert row.to_type == "FusedFFN" and "ternary fake-quant" in row.runs and "'bitlinear'" in row.note
    assert "blocks.0.ffn" in str(report) and "fused_ffn(ternary fake-quant weights" in str(report)
    # still trains: gradients reach the latent (shared) Parameters
    params = {id(p) for p in model.parameters()}
    logits, loss = model.train()(_tokens(), _tokens())
    loss.backward()
    assert {id(p) for p in model.parameters()} == params
    assert ffn.up_proj.weight.grad is not None and ffn.up_proj.weight.grad.abs().sum() > 0


def test_qat_int8_reaches_the_fused_ffn():
    model = _tlm()
    x = torch.randn(2, 8, 128)
    fp32_ffn = copy.deepcopy(model.blocks[0].ffn)
    convert(model, "qat-int8")
    ffn = model.blocks[0].ffn
    assert type(ffn) is FusedFFN and ffn.quant == "qat-int8"
    assert all(type(p) is QATLinear for p in (ffn.gate_proj, ffn.up_proj, ffn.down_proj))
    with torch.no_grad():
        y = ffn(x)
        assert not torch.equal(y, fp32_ffn(x))
        unfused = fp32_ffn.to_module()
        convert(unfused, "qat-int8")  # three QATLinear layers, unfused
        assert _cosine(y, unfused(x)) > 0.9999
    # then the trained codes: int8-from-qat gives the int8 fused FFN
    report = convert(model, "int8-from-qat")
    assert model.blocks[0].ffn.quant == "int8" and any(s.fqn == "blocks.0.ffn" for s in report.swapped)
    with torch.no_grad():
        assert _cosine(model.blocks[0].ffn(x), y) > 0.9999


def test_int8_convert_equals_to_int8():
    """Before: convert(model, 'int8') put Int8Linear under a FusedFFN whose forward read the
    dequantized `weight` property (slower than fp32). Now it is the fused int8 form, the same
    module model.to_int8() builds, with bit-identical logits."""
    model, other = _tlm(), _tlm()
    tokens = _tokens()
    convert(model, "int8", quantize_output=False)
    other.to_int8()
    assert model.blocks[1].ffn.quant == "int8" and type(model.blocks[1].ffn.down_proj) is Int8Linear
    with torch.no_grad():
        assert torch.equal(model(tokens), other(tokens))


def test_ternary_fused_ffn_matches_its_bitlinear_form():
    model = _tlm()
    convert(model, "bitlinear", per_channel=True)
    tokens = _tokens()
    with torch.no_grad():
        y_bit = model(tokens)
    report = convert(model, "ternary")
    ffn = model.blocks[0].ffn
    assert ffn.quant == "ternary" and ffn.per_channel and type(ffn.up_proj) is TernaryLinear
    assert ffn.up_proj.per_channel
    row = next(s for s in report.swapped if s.fqn == "blocks.0.ffn")
    assert row.runs == "ternary_matmul x3 + ffn_activation"
    with torch.no_grad():
        assert _cosine(model(tokens), y_bit) > 0.9999
    # each projection equals its TernaryLinear alone (the fused form only fuses the activation)
    x = torch.randn(3, 128)
    with torch.no_grad():
        h = accelops.ops.ffn_activation(ffn.gate_proj(x), ffn.up_proj(x), "swiglu")
        assert torch.equal(ffn(x), ffn.down_proj(h))


def test_hugging_face_model_with_fused_ffn():
    model = _llama()
    for layer in model.model.layers:
        layer.mlp = FusedFFN.from_module(layer.mlp)
    x = torch.randn(1, 4, 64)
    fp32_mlp = copy.deepcopy(model.model.layers[0].mlp)
    report = convert(model, "bitlinear")
    mlp = model.model.layers[0].mlp
    assert mlp.quant == "bitlinear"
    with torch.no_grad():
        assert not torch.equal(mlp(x), fp32_mlp(x))
    assert {s.fqn for s in report.swapped} >= {"model.layers.0.mlp", "model.layers.1.mlp"}


def test_filter_must_agree_on_a_fused_ffn():
    model = _tlm()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"FusedFFN blocks\.0\.ffn.*same answer"):
        convert(model, "int8", filter=lambda m, fqn: not fqn.endswith("up_proj"))
    assert [type(m) for m in model.modules()] == before
    report = convert(model, "int8", filter=lambda m, fqn: ".ffn." not in fqn)
    assert ("blocks.0.ffn", "filter returned False for its projections") in report.skipped
    assert model.blocks[0].ffn.quant is None


def test_fused_ffn_with_a_tied_projection_is_skipped_unless_untie():
    """A copying mode would leave a quantized copy beside the float weight another module
    reads: the FFN is skipped with the projection named, or converted with untie=True."""

    def model():
        torch.manual_seed(0)
        m = nn.Module()
        m.ffn = FusedFFN(16, 32)
        m.reader = nn.Embedding(32, 16)  # [32, 16], the shape of up_proj's weight
        m.reader.weight = m.ffn.up_proj.weight
        return m

    report = convert(model(), "int8")
    why = dict(report.skipped)["ffn"]
    assert why.startswith("up_proj.weight is tied to reader.weight") and "untie=True" in why
    m = model()
    report = convert(m, "int8", untie=True)
    assert [s.fqn for s in report.swapped] == ["ffn"] and m.ffn.quant == "int8"
    m = model()
    convert(m, "bitlinear")  # shares the Parameter: the tie survives, nothing to refuse
    assert m.ffn.quant == "bitlinear" and m.ffn.up_proj.weight is m.reader.weight


# --------------------------------------------------------------------------- 3. Conv1D


def test_gpt2_conv1d_int8_keeps_the_tie():
    """Before: only lm_head was swapped (untied from wte, growing the model); the 8 Conv1D
    layers were skipped without a line."""
    model = _gpt2()
    tokens = _tokens(128)
    with torch.no_grad():
        y0 = model(tokens).logits
    size_before = _unique_bytes(model)
    report = convert(model, "int8")
    conv_names = [
        f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert [s.fqn for s in report.swapped] == conv_names
    assert all(s.from_type == "Conv1D" and s.to_type == "Int8Linear" for s in report.swapped)
    c_fc = model.transformer.h[0].mlp.c_fc
    assert (c_fc.in_features, c_fc.out_features) == (64, 256)
    assert (
        report.skipped == [("lm_head", report.skipped[0][1])]
        and "tied to transformer.wte.weight" in report.skipped[0][1]
    )
    assert model.lm_head.weight is model.transformer.wte.weight  # the tie is kept
    assert report.model_bytes_before == size_before
    assert report.model_bytes_after == _unique_bytes(model) < size_before
    with torch.no_grad():
        assert _cosine(model(tokens).logits, y0) > 0.999
    text = str(report)
    assert "swapped 8 layer(s)" in text and "skipped lm_head: its weight is tied" in text


def test_gpt2_untie_converts_the_head_and_says_so():
    model = _gpt2()
    report = convert(model, "int8", untie=True)
    assert type(model.lm_head) is Int8Linear and report.num_swapped == 9
    row = report.swapped[-1]
    assert row.fqn == "lm_head" and "untied from transformer.wte.weight" in row.note


@pytest.mark.parametrize("mode", ["bitlinear", "qat-int8", "ternary"])
def test_gpt2_conv1d_every_mode(mode):
    model = _gpt2()
    tokens = _tokens(128)
    conv = model.transformer.h[0].attn.c_attn
    w, b = conv.weight.detach().clone(), conv.bias
    x = torch.randn(3, 64)
    linear = nn.Linear(64, 192)
    with torch.no_grad():
        linear.weight.copy_(w.t())
        linear.bias.copy_(b)
    expected = nn.Sequential(linear)
    convert(expected, mode, quantize_output=True)
    report = convert(model, mode)
    new = model.transformer.h[0].attn.c_attn
    # qat-int8 quantizes the output head too (int8 modes), sharing the tied Parameter
    assert (
        report.num_swapped == (9 if mode == "qat-int8" else 8)
        and type(new) is {"bitlinear": BitLinear, "qat-int8": QATLinear, "ternary": TernaryLinear}[mode]
    )
    if mode != "ternary":
        # the transposed weight is a new Parameter; the bias Parameter is shared
        assert torch.equal(new.weight.detach(), w.t()) and new.bias is b
        assert "Conv1D weight transposed into a new Parameter" in report.swapped[0].note
        out = model.train()(tokens, labels=tokens)
        out.loss.backward()
        assert new.weight.grad is not None
    if mode == "qat-int8":
        assert model.lm_head.weight is model.transformer.wte.weight and "still tied" in report.swapped[-1].note
        report = convert(model, "int8-from-qat")  # a quantized copy would untie it: skipped, with the reason
        assert type(model.lm_head) is QATLinear and "tied to transformer.wte.weight" in dict(report.skipped)["lm_head"]
        assert type(model.transformer.h[0].attn.c_attn) is Int8Linear
    with torch.no_grad():
        assert torch.equal(new.eval()(x), expected[0].eval()(x))


def test_conv1d_layer_outputs_match_its_linear_form():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(48, 32)
    linear = nn.Linear(32, 48)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    a, b = nn.Sequential(conv), nn.Sequential(linear)
    for mode in ("int8", "ternary"):
        ca, cb = copy.deepcopy(a), copy.deepcopy(b)
        convert(ca, mode)
        convert(cb, mode)
        x = torch.randn(5, 32)
        with torch.no_grad():
            assert torch.equal(ca(x), cb(x))


# --------------------------------------------------------------------------- 4. output heads


@pytest.mark.parametrize("name", ["Llama", "Qwen2", "BitNet"])
def test_hugging_face_reports_tell_the_truth(name):
    model = _llama(cls_name=name)
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    report = convert(model, "ternary")
    assert [s.fqn for s in report.swapped] == [n for n in linears if n != "lm_head"]
    assert report.skipped[0][0] == "lm_head" and "quantize_output=True" in report.skipped[0][1]
    assert type(model.lm_head) is nn.Linear
    assert all(s.runs == "ternary_matmul" for s in report.swapped)
    assert report.model_bytes_after == _unique_bytes(model)

    model = _llama(cls_name=name)
    report = convert(model, "int8")  # the int8 modes quantize the head, as torchao does
    assert report.num_swapped == len(linears) and type(model.lm_head) is Int8Linear
    model = _llama(cls_name=name)
    report = convert(model, "int8", quantize_output=False)
    assert type(model.lm_head) is nn.Linear and "(quantize_output=False)" in report.skipped[0][1]
    model = _llama(cls_name=name)
    report = convert(model, "bitlinear", quantize_output=True)
    assert type(model.lm_head) is BitLinear


def test_tied_llama_head_is_kept_tied():
    model = _llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    report = convert(model, "int8")
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert "tied to model.embed_tokens.weight" in dict(report.skipped)["lm_head"]
    model = _llama(tie=True)
    report = convert(model, "bitlinear", quantize_output=True)  # shares the Parameter: the tie survives
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "still tied" in report.swapped[-1].note


# --------------------------------------------------------------------------- 5. atomic, repeat, meta


def test_nan_weight_leaves_the_model_unchanged_and_names_the_layer():
    """Before: the model was left half converted and the error did not name the layer."""
    model = _tlm()
    with torch.no_grad():
        model.blocks[0].attn.v_proj.weight[3, 5] = float("nan")
    before = [type(m) for m in model.modules()]
    for mode in ("int8", "ternary", "bitlinear"):
        with pytest.raises(ValueError, match=r"blocks\.0\.attn\.v_proj\.weight holds NaN.*convert changed nothing"):
            convert(model, mode)
        assert [type(m) for m in model.modules()] == before


def test_a_failing_build_leaves_the_model_unchanged(monkeypatch):
    model = _tlm()
    before = [type(m) for m in model.modules()]
    calls = []

    def boom(linear):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return original(linear)

    original = Int8Linear.from_linear
    monkeypatch.setattr(Int8Linear, "from_linear", staticmethod(boom))
    with pytest.raises(
        RuntimeError, match=r"blocks\.0\.attn\.v_proj \(Linear\): out of memory; convert changed nothing"
    ):
        convert(model, "int8")
    assert [type(m) for m in model.modules()] == before


def test_converting_twice_says_why_nothing_was_swapped():
    model = _tlm()
    convert(model, "int8")
    report = convert(model, "int8")
    assert report.num_swapped == 0
    reasons = dict(report.skipped)
    assert "already an Int8Linear" in reasons["blocks.0.attn.q_proj"]
    assert "quant='int8'" in reasons["blocks.0.ffn"]
    assert "nothing was converted: see the skipped layers below" in str(report)


@pytest.mark.parametrize("mode", ["ternary", "int8"])
def test_meta_device_model_converts_empty_then_loads(mode):
    """Before: 'ternary' on a meta model failed inside Tensor.item()."""
    reference = _tlm()
    state = reference.state_dict()
    convert(reference, mode, quantize_output=True)
    with torch.device("meta"):
        model = TransformerLM(TransformerLMConfig(vocab_size=65, dim=128, n_layers=2, n_heads=4, max_len=64))
    report = convert(model, mode, quantize_output=True)
    assert report.num_swapped == 11
    assert model.blocks[0].attn.q_proj.w_scale.device.type == "meta"
    model.to_empty(device="cpu")
    model.load_state_dict(state)  # float weights quantize on load
    model.eval()
    tokens = _tokens()
    with torch.no_grad():
        assert torch.equal(model(tokens), reference(tokens))


def test_bad_switches():
    with pytest.raises(TypeError, match="quantize_output must be None or a bool"):
        convert(_tlm(), "int8", quantize_output="yes")
    with pytest.raises(TypeError, match="untie must be a bool"):
        convert(_tlm(), "int8", untie=1)
    with pytest.raises(ValueError, match="model is itself a FusedFFN"):
        convert(FusedFFN(8, 16), "int8")
