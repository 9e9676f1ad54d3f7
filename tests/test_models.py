"""accelops.models: TransformerLM and RNNLM under every quant, tied and untied: build,
forward/backward, loss, causality, state_dict round trip, errors, sizes, int8 conversion."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from accelops.models import QUANTS, RNNLM, RNNLMConfig, TransformerLM, TransformerLMConfig
from accelops.nn import FFN, BitLinear, FusedFFN, Int8Linear, QATLinear

V, T, B = 37, 12, 2


def tiny_transformer(**kw):
    cfg = dict(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden=48, max_len=16)
    cfg.update(kw)
    return TransformerLMConfig(**cfg)


def tiny_rnn(**kw):
    cfg = dict(vocab_size=V, dim=24, hidden=40, n_layers=2, max_len=16)
    cfg.update(kw)
    return RNNLMConfig(**cfg)


CONFIGS = [
    pytest.param(TransformerLM, tiny_transformer(quant=q, tie_embeddings=tie), id=f"transformer-{q}-tied{tie}")
    for q in QUANTS
    for tie in (False, True)
] + [
    pytest.param(RNNLM, tiny_rnn(quant=q, tie_embeddings=tie, cell=cell), id=f"rnn-{cell}-{q}-tied{tie}")
    for cell in ("lstm", "gru")
    for q in QUANTS
    for tie in (False, True)
]


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


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(dim=30, n_heads=4), ValueError, r"dim \(30\) must be divisible by n_heads \(4\)"),
        (dict(quant="int4"), ValueError, "quant must be one of"),
        (dict(dropout=1.0), ValueError, "dropout"),
        (dict(n_layers=0), ValueError, "n_layers must be a positive int"),
        (dict(vocab_size=2.5), ValueError, "vocab_size"),
        (dict(activation="relu"), ValueError, "activation must be one of"),
        (dict(tie_embeddings=1), TypeError, "tie_embeddings must be a bool"),
    ],
)
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
    kinds = {
        None: (nn.Linear, FusedFFN),
        "bitlinear": (BitLinear, FusedFFN),
        "int8": (Int8Linear, FusedFFN),
        "qat-int8": (QATLinear, FFN),
    }
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


# ---------------------------------------------------------------------------- architecture options

BITNET_ARCH = dict(
    pos_emb="rope",
    rope_theta=500000.0,
    norm="rmsnorm",
    n_kv_heads=2,
    activation="relu2",
    attn_sub_norm=True,
    ffn_sub_norm=True,
)


def test_default_architecture_keeps_its_state_dict():
    # existing checkpoints load: the defaults are the original model, name for name
    sd = TransformerLM(tiny_transformer()).state_dict()
    assert "pos_emb.weight" in sd and "blocks.0.norm1.bias" in sd and "norm.bias" in sd
    assert sd["blocks.0.attn.k_proj.weight"].shape == (32, 32)
    assert not any("sub_norm" in k for k in sd)
    block = TransformerLM(tiny_transformer()).blocks[0]
    assert type(block.norm1) is nn.LayerNorm and type(block.ffn) is FusedFFN


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("tie", [False, True])
def test_bitnet_architecture_trains_and_round_trips(quant, tie):
    cfg = tiny_transformer(quant=quant, tie_embeddings=tie, attn_bias=True, **BITNET_ARCH)
    model = TransformerLM(cfg)
    assert model.pos_emb is None and type(model.norm) is nn.RMSNorm
    tokens, targets = batch()
    logits, loss = model(tokens, targets)
    assert logits.shape == (B, T, V) and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.blocks[0].attn.k_proj.bias is not None and model.blocks[0].ffn.up_proj.bias is None
    fresh = TransformerLM(cfg)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(tokens), logits)
    # causal with rotary positions too
    model.eval()
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % V
    assert torch.equal(model(tokens)[:, :7], model(changed)[:, :7])


def test_relu2_and_ffn_sub_norm_run_unfused():
    from accelops.models.layers import UnfusedFFN

    model = TransformerLM(tiny_transformer(norm="rmsnorm", activation="relu2", ffn_sub_norm=True, norm_eps=1e-6))
    ffn = model.blocks[0].ffn
    assert type(ffn) is UnfusedFFN and ffn.ffn_sub_norm.eps == 1e-6
    x = torch.randn(2, 5, 32)
    g, u = x @ ffn.gate_proj.weight.T, x @ ffn.up_proj.weight.T
    h = torch.relu(g) ** 2 * u
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * ffn.ffn_sub_norm.weight
    torch.testing.assert_close(ffn(x), h @ ffn.down_proj.weight.T)
    # swiglu with a sub-norm is unfused as well; without, it stays fused
    assert type(TransformerLM(tiny_transformer(ffn_sub_norm=True)).blocks[0].ffn) is UnfusedFFN
    assert type(TransformerLM(tiny_transformer(activation="relu2")).blocks[0].ffn) is UnfusedFFN


def test_grouped_query_attention_equals_repeated_heads():
    # GQA with 2 key/value heads == MHA whose k/v heads are each repeated for their group
    gqa = TransformerLM(tiny_transformer(n_kv_heads=2, pos_emb="rope")).eval()
    mha = TransformerLM(tiny_transformer(pos_emb="rope")).eval()
    sd = gqa.state_dict()
    hd = 8
    for i in range(2):
        for p in ("k_proj", "v_proj"):
            w = sd[f"blocks.{i}.attn.{p}.weight"]  # [2 * hd, dim]
            sd[f"blocks.{i}.attn.{p}.weight"] = w.view(2, hd, 32).repeat_interleave(2, dim=0).reshape(4 * hd, 32)
    mha.load_state_dict(sd)
    tokens, _ = batch()
    torch.testing.assert_close(mha(tokens), gqa(tokens))
    assert gqa.blocks[0].attn.k_proj.weight.shape == (16, 32)


def test_rope_depends_on_relative_positions_only():
    from accelops.models.layers import apply_rope, rope_cos_sin

    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i, j):
        cq, sq = rope_cos_sin(torch.tensor([i]), 16, 10000.0, torch.float32)
        ck, sk = rope_cos_sin(torch.tensor([j]), 16, 10000.0, torch.float32)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10))
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_blocks_run_alone_with_rope():
    # a pipeline stage calls block(x): the attention then computes the rotary angles itself
    model = TransformerLM(tiny_transformer(**BITNET_ARCH)).eval()
    tokens, _ = batch()
    x = model.tok_emb(tokens)
    for block in model.blocks:
        x = block(x)
    torch.testing.assert_close(model.head(model.norm(x)), model(tokens))


def test_new_architecture_converts_to_int8_and_ternary():
    import accelops
    from accelops.nn import TernaryLinear

    tokens, _ = batch()
    model = TransformerLM(tiny_transformer(**BITNET_ARCH)).eval()
    ref = model(tokens)
    int8 = TransformerLM(tiny_transformer(**BITNET_ARCH)).eval()
    int8.load_state_dict(model.state_dict())
    int8.to_int8()
    assert type(int8.blocks[0].ffn.gate_proj) is Int8Linear and type(int8.blocks[0].attn.k_proj) is Int8Linear
    assert (int8(tokens) - ref).norm() / ref.norm() < 0.05
    report = accelops.convert(model, "ternary")
    assert type(model.blocks[1].ffn.down_proj) is TernaryLinear and type(model.blocks[1].attn.o_proj) is TernaryLinear
    assert report.num_swapped == 2 * 7 and torch.isfinite(model(tokens)).all()


def test_trainer_config_takes_the_new_options():
    from accelops.train.config import build_model

    model = build_model(
        dict(
            dim=32,
            n_layers=1,
            n_heads=4,
            pos_emb="rope",
            norm="rmsnorm",
            n_kv_heads=1,
            activation="relu2",
            attn_sub_norm=True,
            ffn_sub_norm=True,
            rope_theta=1e4,
        ),
        V,
        16,
    )
    assert model.config.kv_heads == 1 and model.pos_emb is None


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(n_kv_heads=3), ValueError, r"n_kv_heads \(3\) must divide n_heads \(4\)"),
        (dict(n_kv_heads=0), ValueError, "n_kv_heads must be a positive int"),
        (dict(pos_emb="alibi"), ValueError, "pos_emb must be one of"),
        (dict(rope_theta=0), ValueError, "rope_theta must be a finite number > 0"),
        (dict(rope_theta=float("inf")), ValueError, "rope_theta"),
        (dict(dim=36, n_heads=4, pos_emb="rope"), ValueError, "even head size"),
        (dict(norm="batchnorm"), ValueError, "norm must be one of"),
        (dict(norm_eps=-1e-5), ValueError, "norm_eps"),
        (dict(attn_sub_norm=1), TypeError, "attn_sub_norm must be a bool"),
        (dict(mlp_bias="yes"), TypeError, "mlp_bias must be a bool or None"),
        (dict(activation="relu"), ValueError, "relu2"),
    ],
)
def test_architecture_config_errors(kw, err, match):
    with pytest.raises(err, match=match):
        tiny_transformer(**kw)


def test_bitnet_2b4t_shape():
    cfg = TransformerLMConfig.bitnet_2b4t()
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.hidden, cfg.max_len) == (
        128256,
        2560,
        30,
        20,
        5,
        6912,
        4096,
    )
    assert (cfg.activation, cfg.pos_emb, cfg.rope_theta, cfg.norm, cfg.norm_eps) == (
        "relu2",
        "rope",
        500000.0,
        "rmsnorm",
        1e-5,
    )
    assert cfg.tie_embeddings and cfg.attn_sub_norm and cfg.ffn_sub_norm and not cfg.attention_bias
    assert TransformerLMConfig.bitnet_2b4t(n_layers=2).n_layers == 2
    with torch.device("meta"):
        model = TransformerLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    # 128256 x 2560 embedding (tied) + 30 x (attention 2560 x (2560 + 2 x 640 + 2560) + FFN 3 x 2560 x 6912
    # + norms 3 x 2560 + 6912) + the final norm
    assert n == 128256 * 2560 + 30 * (2560 * 6400 + 3 * 2560 * 6912 + 3 * 2560 + 6912) + 2560


def test_bitnet_2b4t_against_transformers_bitnet_config():
    transformers = pytest.importorskip("transformers")
    hf = transformers.BitNetConfig()
    cfg = TransformerLMConfig.bitnet_2b4t()
    assert (
        hf.vocab_size,
        hf.hidden_size,
        hf.num_hidden_layers,
        hf.num_attention_heads,
        hf.num_key_value_heads,
        hf.intermediate_size,
        hf.hidden_act,
        hf.rms_norm_eps,
        hf.attention_bias,
    ) == (
        cfg.vocab_size,
        cfg.dim,
        cfg.n_layers,
        cfg.n_heads,
        cfg.kv_heads,
        cfg.hidden,
        cfg.activation,
        cfg.norm_eps,
        cfg.attention_bias,
    )
    assert hf.rope_parameters["rope_theta"] == cfg.rope_theta
    # the two documented differences: the 2B4T checkpoint's config.json has 4096 positions and tied embeddings
    assert (hf.max_position_embeddings, hf.tie_word_embeddings) == (2048, False)


def test_rope_model_trains_under_cpu_autocast():
    model = TransformerLM(tiny_transformer(**BITNET_ARCH))
    tokens, targets = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(tokens, targets)
    loss.backward()
    assert torch.isfinite(loss) and logits.shape == (B, T, V)
