"""accelops.models.encoder: the encoder form of the transformer (bidirectional attention
under a padding mask) and its task heads: shapes, padding invariance, bidirectionality,
losses, quant modes through convert / to_int8, sharing, and the errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from accelops import convert
from accelops.models import (
    BidirectionalSelfAttention,
    EncoderForQuestionAnswering,
    EncoderForSequenceClassification,
    EncoderForTokenClassification,
    TransformerEncoder,
    TransformerLM,
    TransformerLMConfig,
)
from accelops.nn import Int8Linear, TernaryLinear
from accelops.sharing import share_parameters

pytestmark = pytest.mark.one_thread


VOCAB = 50
ARCHS = {
    "default": {},
    "llama": dict(pos_emb="rope", norm="rmsnorm", n_kv_heads=2),
    "bitnet": dict(
        pos_emb="rope", norm="rmsnorm", n_kv_heads=2, activation="relu2", attn_sub_norm=True, ffn_sub_norm=True
    ),
}


def cfg(**kw):
    base = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, max_len=16)
    base.update(kw)
    return TransformerLMConfig(**base)


def build(kind, config, **kw):
    torch.manual_seed(0)
    cls = {
        "encoder": TransformerEncoder,
        "sequence": EncoderForSequenceClassification,
        "token": EncoderForTokenClassification,
        "span": EncoderForQuestionAnswering,
    }[kind]
    if kind in ("sequence", "token"):
        kw.setdefault("num_labels", 5)
    return cls(config, **kw).eval()


def batch(b=3, t=9, lengths=(9, 6, 2)):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, VOCAB, (b, t), generator=g)
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    return tokens.masked_fill(~mask, 0), mask


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes(arch):
    c = cfg(**ARCHS[arch])
    tokens, mask = batch()
    with torch.no_grad():
        assert build("encoder", c)(tokens, mask).shape == (3, 9, 32)
        assert build("sequence", c)(tokens, mask).shape == (3, 5)
        assert build("sequence", c, pooling="first")(tokens, mask).shape == (3, 5)
        assert build("token", c)(tokens, mask).shape == (3, 9, 5)
        assert build("span", c)(tokens, mask).shape == (3, 9, 2)
        assert build("sequence", c)(tokens).shape == (3, 5)  # no mask: every token is real
    assert isinstance(build("encoder", c).blocks[0].attn, BidirectionalSelfAttention)
    assert build("span", c).head_kind == "span" and TransformerEncoder.head_kind is None


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["encoder", "sequence", "token", "span"])
def test_padding_does_not_change_real_tokens(arch, kind):
    """A sequence alone and the same sequence right-padded (with arbitrary pad ids) in a
    batch give the same outputs at its real positions: no position attends to padding."""
    model = build(kind, cfg(**ARCHS[arch]))
    seq = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([seq, torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(3))], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 4])
    with torch.no_grad():
        alone = model(seq)
        in_batch = model(padded, mask)
        unmasked = model(padded)
    if kind in ("sequence",):
        assert torch.allclose(alone, in_batch, atol=1e-5)
        assert not torch.allclose(alone, unmasked, atol=1e-3)  # the mask is what makes it so
    else:
        assert torch.allclose(alone, in_batch[:, :5], atol=1e-5)
        assert not torch.allclose(alone, unmasked[:, :5], atol=1e-3)
    if kind == "span":
        assert (in_batch[:, 5:] == torch.finfo(in_batch.dtype).min).all()  # padding is never an answer


def test_attention_is_bidirectional():
    """Unlike the decoder, an early position's output depends on later tokens."""
    c = cfg()
    enc, dec = build("encoder", c), TransformerLM(c).eval()
    a = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    b = a.clone()
    b[0, -1] = (a[0, -1] + 1) % VOCAB
    with torch.no_grad():
        assert not torch.allclose(enc(a)[:, 0], enc(b)[:, 0])
        assert torch.allclose(dec(a)[:, 0], dec(b)[:, 0])


def test_decoder_block_weights_load_into_the_encoder():
    c = cfg(**ARCHS["bitnet"])
    dec, enc = TransformerLM(c), build("encoder", c)
    enc.blocks.load_state_dict(dec.blocks.state_dict())  # same parameter names, strict
    assert torch.equal(enc.blocks[1].attn.q_proj.weight, dec.blocks[1].attn.q_proj.weight)


# The parameter names checkpoints are saved under (the encoder reuses the decoder's block and
# attention classes: a refactor of either must keep these).
BLOCK_KEYS = {
    "default": [
        "norm1.weight", "norm1.bias",
        "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.o_proj.weight",
        "norm2.weight", "norm2.bias",
        "ffn.gate_proj.weight", "ffn.up_proj.weight", "ffn.down_proj.weight",
    ],
    "bitnet": [
        "norm1.weight",
        "attn.q_proj.weight", "attn.q_proj.bias", "attn.k_proj.weight", "attn.k_proj.bias",
        "attn.v_proj.weight", "attn.v_proj.bias", "attn.attn_sub_norm.weight",
        "attn.o_proj.weight", "attn.o_proj.bias",
        "norm2.weight",
        "ffn.gate_proj.weight", "ffn.gate_proj.bias", "ffn.up_proj.weight", "ffn.up_proj.bias",
        "ffn.down_proj.weight", "ffn.down_proj.bias", "ffn.ffn_sub_norm.weight",
    ],
}  # fmt: skip


@pytest.mark.parametrize("arch", ["default", "bitnet"])
def test_state_dict_names_of_decoder_and_encoder(arch):
    c = cfg(**ARCHS[arch], bias=arch == "bitnet")
    blocks = [f"blocks.{i}.{k}" for i in range(c.n_layers) for k in BLOCK_KEYS[arch]]
    pos = ["pos_emb.weight"] if c.pos_emb == "learned" else []
    norm = ["norm.weight", "norm.bias"] if c.norm == "layernorm" else ["norm.weight"]
    body = ["tok_emb.weight", *pos, *blocks, *norm]
    assert list(TransformerLM(c).state_dict()) == [*body, "lm_head.weight"]
    assert list(build("encoder", c).state_dict()) == body
    assert list(build("sequence", c).state_dict()) == [*body, "classifier.weight", "classifier.bias"]
    assert list(build("span", c).state_dict()) == [*body, "qa_outputs.weight", "qa_outputs.bias"]


@pytest.mark.parametrize("arch", ARCHS)
def test_last_position_attends_as_the_decoders(arch):
    """The last position attends to every key either way: with the decoder's weights, a
    one-layer encoder's output there is the decoder's final hidden state (the same attention
    code; one layer, as a second would read the earlier positions, which differ)."""
    c = cfg(**ARCHS[arch], n_layers=1)
    dec, enc = TransformerLM(c).eval(), build("encoder", c)
    enc.load_state_dict({k: v for k, v in dec.state_dict().items() if k != "lm_head.weight"})
    tokens, _ = batch()
    with torch.no_grad():
        # SDPA's causal and unmasked paths may sum in another order
        assert torch.allclose(enc(tokens)[:, -1], dec._hidden(tokens)[:, -1], rtol=1e-5, atol=1e-6)


def test_losses():
    c = cfg()
    tokens, mask = batch()
    logits, loss = build("sequence", c)(tokens, mask, torch.tensor([0, 4, 2]))
    assert torch.isclose(loss, F.cross_entropy(logits, torch.tensor([0, 4, 2])))
    model = build("token", c)
    labels = torch.randint(0, 5, (3, 9))
    logits, loss = model(tokens, mask, labels)
    # padded positions take no part, whatever their labels say; -100 marks others to skip
    keep = mask.clone()
    keep[0, 1] = False
    labels[0, 1] = -100
    ref = F.cross_entropy(logits[keep], labels[keep])
    assert torch.isclose(model(tokens, mask, labels)[1], ref)
    model = build("span", c)
    spans = torch.tensor([[0, 3], [2, 2], [1, 1]])
    logits, loss = model(tokens, mask, spans)
    ref = (F.cross_entropy(logits[..., 0], spans[:, 0]) + F.cross_entropy(logits[..., 1], spans[:, 1])) / 2
    assert torch.isfinite(loss) and torch.isclose(loss, ref)
    loss.backward()
    assert model.qa_outputs.weight.grad is not None


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    model = EncoderForSequenceClassification(cfg(), 3).train()
    tokens, mask = batch()
    labels = torch.tensor([0, 1, 2])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(10):
        _, loss = model(tokens, mask, labels)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 4


def _cos(a, b):
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("kind", ["sequence", "token", "span"])
def test_convert_to_ternary_and_int8(kind):
    tokens, mask = batch()
    # ternary: train with BitLinear (quant="bitlinear"), deploy with convert(model, "ternary")
    model = build(kind, cfg(quant="bitlinear"))
    with torch.no_grad():
        y_bit = model(tokens, mask)
    report = convert(model, "ternary")
    assert type(model.blocks[0].attn.q_proj) is TernaryLinear and model.blocks[0].ffn.quant == "ternary"
    head = model.get_output_embeddings()
    assert type(head) is nn.Linear  # the task head stays fp32, as BitNet keeps its LM head
    assert any(why.startswith("the output head stays") for _, why in report.skipped)
    with torch.no_grad():
        y = model(tokens, mask)
    real = mask if kind != "sequence" else slice(None)
    assert _cos(y[real], y_bit[real]) > 0.999
    # int8: a trained fp32 model, by convert or by to_int8
    fp32 = build(kind, cfg())
    with torch.no_grad():
        y32 = fp32(tokens, mask)
    a, b = build(kind, cfg()), build(kind, cfg())
    convert(a, "int8", quantize_output=False)
    b.to_int8()
    assert type(a.blocks[1].attn.o_proj) is Int8Linear and b.config.quant == "int8"
    with torch.no_grad():
        ya, yb = a(tokens, mask), b(tokens, mask)
    assert torch.equal(ya, yb)
    assert _cos(ya[real], y32[real]) > 0.99


def test_quant_configs_train():
    tokens, mask = batch()
    for quant in ("bitlinear", "qat-int8"):
        model = build("token", cfg(quant=quant)).train()
        _, loss = model(tokens, mask, torch.randint(0, 5, (3, 9)))
        loss.backward()
        assert torch.isfinite(loss)


def test_sharing_strategies_apply():
    model = build("sequence", cfg(n_layers=4))
    before = sum(p.numel() for p in model.parameters())
    report = share_parameters(model, "alternate")
    assert report.groups == [[0, 2], [1, 3]] and model.blocks[0] is model.blocks[2]
    assert sum(p.numel() for p in model.parameters()) < before
    tokens, mask = batch()
    with torch.no_grad():
        assert model(tokens, mask).shape == (3, 5)
    model = build("token", cfg(n_layers=3))
    share_parameters(model, "sequential", scope="ffn", interval=3)
    assert model.blocks[0].ffn is model.blocks[2].ffn


def test_meta_device_build():
    with torch.device("meta"):
        model = EncoderForTokenClassification(cfg(), 4)
    model.to_empty(device="cpu").init_weights()
    tokens, mask = batch()
    with torch.no_grad():
        assert torch.isfinite(model(tokens, mask)).all()


def test_errors():
    with pytest.raises(ValueError, match="tie_embeddings=True: an encoder has no LM head"):
        TransformerEncoder(cfg(tie_embeddings=True))
    with pytest.raises(TypeError, match="config must be a TransformerLMConfig"):
        TransformerEncoder({"vocab_size": 5})
    with pytest.raises(ValueError, match="num_labels must be a positive int, got 0"):
        EncoderForSequenceClassification(cfg(), 0)
    with pytest.raises(ValueError, match="pooling must be one of"):
        EncoderForSequenceClassification(cfg(), 3, pooling="max")
    model = build("span", cfg())
    tokens, mask = batch()
    with pytest.raises(ValueError, match=r"attention_mask must be a tensor of the tokens' shape \(3, 9\)"):
        model(tokens, mask[:, :4])
    with pytest.raises(ValueError, match="every row needs at least one real token"):
        model(tokens, torch.zeros_like(mask))
    with pytest.raises(ValueError, match=r"labels must have shape \(3, 2\)"):
        model(tokens, mask, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"positions in \[0, 9\)"):
        model(tokens, mask, torch.tensor([[0, 9], [0, 0], [0, 0]]))
    with pytest.raises(ValueError, match="exceeds the model's max_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="takes no KV cache"):
        model.blocks[0].attn(torch.zeros(1, 2, 32), cache=object())
