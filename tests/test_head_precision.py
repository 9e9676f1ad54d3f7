"""convert(model, mode, head=..., embedding=...): the output head and the token embedding in
bf16 or int8 (issue 25). A tied pair keeps ONE weight (Int8Embedding / Bf16Embedding, the
head as TiedHead or, in a tied TransformerLM, head() -> tok_emb.attend); logits stay close
to fp32's, greedy generation still equals the no-cache argmax, state_dict and
accelops.save / load round trips keep the tie, and the report says what happened."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import accelops
from accelops.models import TransformerLM, TransformerLMConfig
from accelops.nn import (
    Bf16Embedding,
    Bf16Linear,
    Int8Embedding,
    Int8Linear,
    TernaryLinear,
    TiedHead,
    convert,
    count_parameters,
)

from .helpers import tiny_hf_config

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

V = 61


def _cos(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def bitnet_tlm(tie=True, seed=0):
    """A small TransformerLM of the 2B4T architecture (tied by default, as 2B4T)."""
    torch.manual_seed(seed)
    cfg = TransformerLMConfig.bitnet_2b4t(
        vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=96, max_len=48, tie_embeddings=tie
    )
    model = TransformerLM(cfg).eval()
    with torch.no_grad():  # clear winners among the logits, so greedy equality tests the cache
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(8)
    return model


def hf_bitnet(tie=True, seed=0):
    torch.manual_seed(seed)
    model = transformers.BitNetForCausalLM(tiny_hf_config(transformers.BitNetConfig, V, tie_word_embeddings=tie)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def tokens(batch=2, t=12, seed=1):
    return torch.randint(0, V, (batch, t), generator=torch.Generator().manual_seed(seed))


def greedy_without_cache(model, prompt, n):
    seq = torch.as_tensor(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq[None])[0, -1].argmax()[None]])
    return seq[len(prompt) :].tolist()


# --------------------------------------------------------------------------- the layers


def test_int8_embedding_lookup_and_attend():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 24)
    q = Int8Embedding.from_embedding(emb)
    ids = torch.randint(0, 50, (3, 7))
    rows = q(ids)
    assert rows.dtype == torch.float32 and rows.shape == (3, 7, 24)
    assert torch.equal(rows, q.weight[ids])  # the dequantized rows
    assert (rows - emb(ids)).abs().max() <= emb.weight.abs().max() / 127  # half a step of the row's scale, at most
    h = torch.randn(5, 24)
    assert torch.equal(q.attend(h), accelops.ops.int8_linear(h, q.w_q, q.w_scale))
    assert _cos(q.attend(h), F.linear(h, emb.weight)) > 0.999
    # model.to(bf16) changes what lookups return, not the stored int8 weight or its fp32 scales
    q.to(torch.bfloat16)
    assert q(ids).dtype == torch.bfloat16 and q.w_q.dtype == torch.int8 and q.w_scale.dtype == torch.float32
    with pytest.raises(TypeError, match="integer ids"):
        q(torch.randn(2, 3))


def test_bf16_layers_keep_their_precision():
    torch.manual_seed(0)
    lin = nn.Linear(24, 40)
    b = Bf16Linear.from_linear(lin)
    x = torch.randn(3, 24)
    assert b(x).dtype == torch.float32 and _cos(b(x), lin(x)) > 0.999
    b.float()
    assert b.weight.dtype == torch.bfloat16 and b.bias.dtype == torch.bfloat16
    emb = nn.Embedding(50, 24)
    e = Bf16Embedding.from_embedding(emb)
    assert e(torch.tensor([3])).dtype == torch.float32
    assert torch.equal(e(torch.tensor([3])), emb.weight[3:4].bfloat16().float())
    e.half()
    assert e.weight.dtype == torch.bfloat16 and e(torch.tensor([3])).dtype == torch.float16


# --------------------------------------------------------------------------- TransformerLM


@pytest.mark.parametrize("precision", ["int8", "bf16"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_transformer_lm_head_precision(precision, tie):
    model = bitnet_tlm(tie=tie)
    fp32_head = copy.deepcopy(model)
    convert(fp32_head, "ternary")  # the same ternary layers, the head left fp32
    report = convert(model, "ternary", head=precision)
    x = tokens()
    with torch.no_grad():
        assert _cos(model(x), fp32_head(x)) > 0.999
    if tie:
        assert model.lm_head is None
        cls = Int8Embedding if precision == "int8" else Bf16Embedding
        assert type(model.tok_emb) is cls  # one weight, the embedding and the head
        swap = report.swapped[0]
        assert swap.fqn == "tok_emb" and swap.to_type == cls.__name__
        assert "tied: also the model's head" in swap.note and f"head={precision!r} sets both" in swap.note
        assert not any(
            isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() == V * 64
            for t in model.state_dict().values()
        )  # the fp32 weight is gone
    else:
        assert type(model.lm_head) is (Int8Linear if precision == "int8" else Bf16Linear)
        assert type(model.tok_emb) is nn.Embedding  # embedding= not given: it stays
        assert report.swapped[-1].fqn == "lm_head"
    assert report.model_bytes_after < fp32_head.parameter_count().fp32_bytes


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_greedy_generation_with_the_quantized_head_equals_no_cache_argmax(precision):
    model = bitnet_tlm()
    convert(model, "ternary", head=precision)
    batch = [tokens(1, n, seed=n)[0] for n in (5, 11, 1)]
    out = model.generate(batch, 12, temperature=0)
    for row, p in zip(out, batch):
        assert row.tolist() == greedy_without_cache(model, p, 12)


def test_int8_head_and_int8_embedding_untied():
    model = bitnet_tlm(tie=False)
    ref = copy.deepcopy(model)
    report = convert(model, "ternary", head="int8", embedding="int8")
    assert type(model.lm_head) is Int8Linear and type(model.tok_emb) is Int8Embedding
    assert {s.fqn for s in report.swapped} >= {"lm_head", "tok_emb"}
    convert(ref, "ternary")
    with torch.no_grad():
        assert _cos(model(tokens()), ref(tokens())) > 0.999


def test_embedding_alone_and_fp32_are_reported():
    model = bitnet_tlm(tie=False)
    report = convert(model, "int8", head="fp32", embedding="bf16")
    assert type(model.lm_head) is nn.Linear and type(model.tok_emb) is Bf16Embedding
    assert dict(report.skipped)["lm_head"] == "the output head stays float32 (head='fp32')"
    assert "skipped lm_head: the output head stays float32" in str(report)


def test_parameter_count_of_the_int8_embedding():
    model = bitnet_tlm()
    before = model.parameter_count()
    convert(model, "ternary", head="int8")
    after = count_parameters(model)
    assert after.unique_parameters == before.unique_parameters
    emb_fp32 = V * 64 * 4
    assert after.deployed_bytes < before.deployed_bytes - emb_fp32 + V * 64 + V * 4 + 1


# --------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_hf_tied_head_keeps_one_weight_and_generates(precision):
    model = hf_bitnet(tie=True)
    ref = copy.deepcopy(model)
    convert(ref, "ternary")
    report = convert(model, "ternary", head=precision)
    emb, head = model.model.embed_tokens, model.lm_head
    assert type(head) is TiedHead and head.embedding is emb
    assert type(emb) is (Int8Embedding if precision == "int8" else Bf16Embedding)
    by = {s.fqn: s for s in report.swapped}
    assert by["lm_head"].to_type == "TiedHead" and "tied to model.embed_tokens" in by["lm_head"].note
    assert by["model.embed_tokens"].note.startswith("tied to lm_head: one")
    state = model.state_dict()
    key = "w_q" if precision == "int8" else "weight"
    assert state[f"lm_head.embedding.{key}"].data_ptr() == state[f"model.embed_tokens.{key}"].data_ptr()
    ids = tokens(2, 7)
    with torch.no_grad():
        assert _cos(model(ids).logits, ref(ids).logits) > 0.999
        out = model.generate(ids, max_new_tokens=10, do_sample=False, attention_mask=torch.ones_like(ids))
    for row, p in zip(out[:, 7:], ids):
        assert row.tolist() == greedy_without_cache(lambda x: model(x).logits, p, 10)


def test_hf_untied_head_int8():
    model = hf_bitnet(tie=False)
    report = convert(model, "ternary", head="int8")
    assert type(model.lm_head) is Int8Linear and type(model.model.embed_tokens) is nn.Embedding
    assert report.swapped[-1].fqn == "lm_head" and report.swapped[-1].runs == "int8_linear"


def test_hf_tied_different_precisions_need_untie():
    model = hf_bitnet(tie=True)
    report = convert(model, "ternary", head="int8", embedding="fp32")
    skipped = dict(report.skipped)
    assert "untie=True" in skipped["lm_head"] and "untie=True" in skipped["model.embed_tokens"]
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    report = convert(hf_bitnet(tie=True), "ternary", head="int8", embedding="fp32", untie=True)
    assert any(s.fqn == "lm_head" and "untied from model.embed_tokens.weight" in s.note for s in report.swapped)


def test_argument_errors():
    with pytest.raises(ValueError, match="head must be None or one of"):
        convert(bitnet_tlm(), "ternary", head="int4")
    with pytest.raises(ValueError, match="inference modes"):
        convert(bitnet_tlm(), "bitlinear", head="int8")
    with pytest.raises(ValueError, match="not both"):
        convert(bitnet_tlm(tie=False), "ternary", head="int8", quantize_output=True)
    with pytest.raises(ValueError, match="give one of them"):
        convert(bitnet_tlm(), "ternary", head="int8", embedding="bf16")
    with pytest.raises(ValueError, match="no output head"):
        convert(nn.Sequential(nn.Linear(4, 4)), "ternary", head="int8")


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("precision", ["int8", "bf16"])
@pytest.mark.parametrize("arch", ["tlm", "hf"])
def test_save_load_round_trip_keeps_the_tie(tmp_path, precision, arch):
    build = bitnet_tlm if arch == "tlm" else hf_bitnet
    model = build()
    convert(model, "ternary", head=precision)
    x = tokens()
    logits = (lambda m: m(x)) if arch == "tlm" else (lambda m: m(x).logits)
    with torch.no_grad():
        want = logits(model)
    accelops.save(model, tmp_path)
    if arch == "tlm":
        cfg = model.config
        loaded = accelops.load(lambda: TransformerLM(cfg), tmp_path).eval()
        assert type(loaded.tok_emb) is type(model.tok_emb)
    else:
        config = model.config
        loaded = accelops.load(lambda: transformers.BitNetForCausalLM(config), tmp_path).eval()
        assert type(loaded.lm_head) is TiedHead and loaded.lm_head.embedding is loaded.model.embed_tokens
    with torch.no_grad():
        assert torch.equal(logits(loaded), want)
    # state_dict into a model converted the same way
    again = build(seed=5)
    convert(again, "ternary", head=precision)
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(logits(again), want)


def test_int8_embedding_loads_a_float_checkpoint():
    emb = nn.Embedding(20, 8)
    q = Int8Embedding(20, 8)
    q.load_state_dict(emb.state_dict())
    ref = Int8Embedding.from_embedding(emb)
    assert torch.equal(q.w_q, ref.w_q) and torch.equal(q.w_scale, ref.w_scale)


def test_ternary_untied_head_runs_its_kernel():
    """head() calls lm_head (before: F.linear on its dequantized weight, fp32 activations)."""
    model = bitnet_tlm(tie=False)
    convert(model, "ternary", quantize_output=True)
    assert type(model.lm_head) is TernaryLinear
    h = torch.randn(2, 64)
    assert torch.equal(model.head(h), model.lm_head(h))


def test_converting_again_leaves_the_converted_ends_alone():
    model = hf_bitnet()
    convert(model, "ternary", head="int8")
    report = convert(model, "ternary", head="int8")
    assert report.num_swapped == 0 and type(model.lm_head) is TiedHead
    assert "a TiedHead, not an nn.Linear" in dict(report.skipped)["lm_head"]
    model = bitnet_tlm()
    convert(model, "ternary", head="bf16")
    report = convert(model, "ternary", head="bf16")
    assert report.num_swapped == 0 and "not an nn.Embedding" in dict(report.skipped)["tok_emb"]
