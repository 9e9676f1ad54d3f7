"""accelops.models: TransformerLM and RNNLM under every quant, tied and untied: build,
forward/backward, loss, causality, state_dict round trip, errors, sizes, int8 conversion."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from accelops.models import QUANTS, RNNLM, RNNLMConfig, TransformerLM, TransformerLMConfig
from accelops.nn import BitLinear, FFN, FusedFFN, Int8Linear, QATLinear

V, T, B = 37, 12, 2


def tiny_transformer(**kw):
    cfg = dict(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden=48, max_len=16)
    cfg.update(kw)
    return TransformerLMConfig(**cfg)


def tiny_rnn(**kw):
    cfg = dict(vocab_size=V, dim=24, hidden=40, n_layers=2, max_len=16)
    cfg.update(kw)
    return RNNLMConfig(**cfg)


CONFIGS = (
    [pytest.param(TransformerLM, tiny_transformer(quant=q, tie_embeddings=tie), id=f"transformer-{q}-tied{tie}")
     for q in QUANTS for tie in (False, True)]
    + [pytest.param(RNNLM, tiny_rnn(quant=q, tie_embeddings=tie, cell=cell), id=f"rnn-{cell}-{q}-tied{tie}")
       for cell in ("lstm", "gru") for q in QUANTS for tie in (False, True)]
)


def batch(seq=T):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (B, seq), generator=g), torch.randint(0, V, (B, seq), generator=g)


@pytest.mark.parametrize("cls, cfg", CONFIGS)
def test_forward_backward_loss_and_state_dict(cls, cfg):
    model = cls(cfg)
    tokens, targets = batch()
    logits = model(tokens)
    assert logits.shape == (B, T, V) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    logits2, loss = model(tokens, targets)
    assert torch.equal(logits, logits2)
    assert torch.equal(loss, F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1)))
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # int8 projections are frozen buffers: everything else still learns, and the embedding
    # gets a gradient through them (straight-through to x).
    assert model.tok_emb.weight.grad.abs().sum() > 0
    assert (model.lm_head is None) == cfg.tie_embeddings
    assert ("lm_head.weight" in model.state_dict()) != cfg.tie_embeddings

    fresh = cls(cfg)  # other random weights
    assert not torch.equal(fresh(tokens), logits)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(tokens), logits)


@pytest.mark.parametrize("cls, cfg", [p for p in CONFIGS if "tiedFalse" in p.id])
def test_causal(cls, cfg):
    model = cls(cfg).eval()
    tokens, _ = batch()
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % V
    a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.equal(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("cls, cfg", [(TransformerLM, tiny_transformer()), (RNNLM, tiny_rnn())])
def test_bad_input(cls, cfg):
    model = cls(cfg)
    tokens, targets = batch(16)
    model(tokens)  # max_len itself is fine
    with pytest.raises(ValueError, match="sequence length 17 exceeds the model's max_len=16"):
        model(torch.zeros(B, 17, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        model(tokens.float())
    with pytest.raises(ValueError, match=r"2-D \[batch, seq\]"):
        model(tokens[0])
    with pytest.raises(ValueError, match=r"\[0, vocab_size=37\)"):
        model(tokens + V)
    with pytest.raises(ValueError, match="targets must have the tokens' shape"):
        model(tokens, targets[:, :-1])


@pytest.mark.parametrize("kw, err, match", [
    (dict(dim=30, n_heads=4), ValueError, r"dim \(30\) must be divisible by n_heads \(4\)"),
    (dict(quant="int4"), ValueError, "quant must be one of"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(n_layers=0), ValueError, "n_layers must be a positive int"),
    (dict(vocab_size=2.5), ValueError, "vocab_size"),
    (dict(activation="relu"), ValueError, "activation must be one of"),
    (dict(tie_embeddings=1), TypeError, "tie_embeddings must be a bool"),
])
def test_transformer_config_errors(kw, err, match):
    with pytest.raises(err, match=match):
        tiny_transformer(**kw)


def test_rnn_config_errors():
    with pytest.raises(ValueError, match="cell must be one of"):
        tiny_rnn(cell="rnn")
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        tiny_rnn(hidden=0)
    with pytest.raises(TypeError, match="TransformerLMConfig"):
        TransformerLM(tiny_rnn())
    assert TransformerLMConfig(vocab_size=10, dim=16, n_heads=2).hidden == 64


def test_layers_follow_quant():
    kinds = {None: (nn.Linear, FusedFFN), "bitlinear": (BitLinear, FusedFFN), "int8": (Int8Linear, FusedFFN),
             "qat-int8": (QATLinear, FFN)}
    for q, (linear, ffn) in kinds.items():
        block = TransformerLM(tiny_transformer(quant=q)).blocks[0]
        assert all(type(getattr(block.attn, n)) is linear for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        assert type(block.ffn) is ffn and type(block.ffn.down_proj) is linear
        assert type(RNNLM(tiny_rnn(quant=q)).blocks[0].out_proj) is linear


def test_init_is_gpt2_style():
    torch.manual_seed(0)
    model = TransformerLM(tiny_transformer(dim=64, hidden=256, n_layers=8, max_len=64))
    assert abs(model.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 0.002
    resid = 0.02 / math.sqrt(16)
    assert abs(model.blocks[0].attn.o_proj.weight.std().item() - resid) < 0.1 * resid
    assert abs(model.blocks[3].ffn.down_proj.weight.std().item() - resid) < 0.1 * resid
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 0.002
    # an untrained model predicts close to uniformly
    _, loss = model(*batch())
    assert abs(loss.item() - math.log(V)) < 0.1


def test_meta_init_then_to_empty():
    cfg = tiny_transformer(quant="int8")
    with torch.device("meta"):
        model = TransformerLM(cfg)
    assert model.tok_emb.weight.is_meta
    model.to_empty(device="cpu").init_weights()
    _, loss = model(*batch())
    assert abs(loss.item() - math.log(V)) < 0.2
    assert model.blocks[0].attn.q_proj.w_q.abs().max() == 127


def test_parameter_count():
    cfg = tiny_transformer()
    fp32 = TransformerLM(cfg).parameter_count()
    n = sum(p.numel() for p in TransformerLM(cfg).parameters())
    assert fp32.parameters == fp32.unique_parameters == n and fp32.fp32_bytes == fp32.deployed_bytes == 4 * n
    tied = TransformerLM(dataclasses.replace(cfg, tie_embeddings=True)).parameter_count()
    assert tied.unique_parameters == n - V * cfg.dim
    # Projections: 4 d^2 attention + 3 d h FFN a block. Ternary: a row of K weights packs into
    # ceil(K/128) * 32 bytes, plus one fp32 scale a layer; int8: a byte a weight + a scale a row.
    d, h, L = cfg.dim, cfg.hidden, cfg.n_layers
    proj = L * (4 * d * d + 3 * d * h)
    rows = L * (4 * d + 2 * h + d)  # output rows: q k v o (d each), gate/up (h), down (d)
    rest = n - proj
    bit = TransformerLM(dataclasses.replace(cfg, quant="bitlinear")).parameter_count()
    packed = L * (4 * d * 32 + 2 * h * 32 + d * 32)  # K = d or h < 128: one 32-byte block a row
    assert bit.unique_parameters == n and bit.deployed_bytes == 4 * rest + packed + 4 * L * 7
    for q in ("int8", "qat-int8"):
        c = TransformerLM(dataclasses.replace(cfg, quant=q)).parameter_count()
        assert c.unique_parameters == n and c.deployed_bytes == 4 * rest + proj + 4 * rows, q
    r = RNNLM(tiny_rnn(quant="int8")).parameter_count()
    assert r.unique_parameters == sum(p.numel() for p in RNNLM(tiny_rnn()).parameters())


@pytest.mark.parametrize("cls, cfg", [(TransformerLM, tiny_transformer()), (RNNLM, tiny_rnn(cell="gru"))])
def test_to_int8_from_fp32(cls, cfg):
    model = cls(cfg)
    tokens, _ = batch()
    ref = model(tokens)
    by_load = cls(dataclasses.replace(cfg, quant="int8"))
    by_load.load_state_dict(model.state_dict())  # Int8Linear quantizes nn.Linear weights on load
    assert model.to_int8() is model and model.config.quant == "int8"
    assert all(type(m) is not nn.Linear for n, m in model.blocks.named_modules())
    out = model(tokens)
    assert torch.equal(out, by_load(tokens))
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.02, rel


def test_to_int8_from_qat_keeps_outputs():
    model = TransformerLM(tiny_transformer(quant="qat-int8"))
    tokens, targets = batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):  # trained weights, not just the init
        opt.zero_grad()
        model(tokens, targets)[1].backward()
        opt.step()
    model.eval()
    ref = model(tokens)
    model.to_int8()
    assert type(model.blocks[0].ffn) is FusedFFN and model.blocks[0].ffn.quant == "int8"
    out = model(tokens)
    # Attention projections are bit-exact (QATLinear runs Int8Linear's GEMM); the FFN's
    # activation between its GEMMs is computed by another routine, a few ulps apart.
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_to_int8_refuses_bitlinear():
    with pytest.raises(ValueError, match="ternary"):
        TransformerLM(tiny_transformer(quant="bitlinear")).to_int8()


def test_dropout_only_in_training():
    model = TransformerLM(tiny_transformer(dropout=0.5))
    tokens, _ = batch()
    assert not torch.equal(model(tokens), model(tokens))
    model.eval()
    assert torch.equal(model(tokens), model(tokens))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnnlm_trains_under_cpu_autocast(cell, dtype):
    # torch's CPU autocast cannot run nn.LSTM in bf16/fp16 here; RNNBlock runs the cell in fp32
    model = RNNLM(RNNLMConfig(vocab_size=11, dim=8, hidden=12, n_layers=2, max_len=16, cell=cell))
    tokens = torch.randint(0, 11, (2, 5))
    with torch.autocast("cpu", dtype=dtype):
        logits, loss = model(tokens, tokens)
    loss.backward()
    assert torch.isfinite(loss) and logits.shape == (2, 5, 11)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
