"""accelops.models.TransformerSeq2Seq: shapes, the decoder's causal masking and the source's
padding mask, encoder-decoder sharing (the parameter count and the shared objects), greedy
decoding's stopping, the quant modes (bitlinear -> convert ternary, int8) and bad input."""

import pytest
import torch

import accelops
from accelops.models import TransformerLMConfig, TransformerSeq2Seq
from accelops.nn import BitLinear, Int8Linear, TernaryLinear, count_parameters
from accelops.sharing import ENCODER_DECODER_PARTS, retie, share_encoder_decoder, share_parameters

pytestmark = pytest.mark.one_thread

V = 40


def cfg(**kw):
    return TransformerLMConfig(**{"vocab_size": V, "dim": 32, "n_layers": 2, "n_heads": 4, "max_len": 12, **kw})


def model(seed=0, **kw):
    sharing = kw.pop("sharing", None)
    torch.manual_seed(seed)
    return TransformerSeq2Seq(cfg(**kw), sharing=sharing).eval()


def batch(b=3, s=7, t=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, V, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, 4:] = False
    tgt = torch.randint(4, V, (b, t), generator=g)
    return src, mask, tgt


def test_shapes_and_loss():
    m = model()
    src, mask, tgt = batch()
    logits = m(src, mask, tgt)
    assert logits.shape == (3, 5, V)
    targets = tgt.clone()
    targets[1, 3:] = -100
    logits2, loss = m(src, mask, tgt, targets)
    assert torch.equal(logits, logits2) and loss.ndim == 0 and torch.isfinite(loss)
    assert m.head_kind == "seq2seq"


@pytest.mark.parametrize("sharing", [None, "encoder-decoder"])
def test_decoder_is_causal(sharing):
    """Changing target token j changes no logits at positions < j."""
    m = model(sharing=sharing)
    src, mask, tgt = batch()
    base = m(src, mask, tgt)
    for j in range(1, tgt.shape[1]):
        t2 = tgt.clone()
        t2[:, j] = (t2[:, j] + 7) % (V - 4) + 4
        out = m(src, mask, t2)
        torch.testing.assert_close(out[:, :j], base[:, :j])
        assert not torch.allclose(out[:, j:], base[:, j:])


def test_source_padding_is_masked():
    """A row's outputs do not depend on what stands in its padded source positions, nor on
    how much padding it has."""
    m = model()
    src, mask, tgt = batch()
    src2 = src.clone()
    src2[0, 4:] = 5
    torch.testing.assert_close(m(src, mask, tgt)[0], m(src2, mask, tgt)[0])
    alone = m(src[:1, :4], None, tgt[:1])
    torch.testing.assert_close(alone[0], m(src, mask, tgt)[0], atol=1e-5, rtol=1e-5)


def test_encoder_decoder_sharing_halves_block_parameters():
    plain, shared = model(), model(sharing="encoder-decoder")
    assert shared.sharing == "encoder-decoder" and plain.sharing is None
    p = count_parameters(plain.block_modules()).unique_parameters
    s = count_parameters(shared.block_modules()).unique_parameters
    # what is shared: each decoder block's self-attention projections and FFN
    dropped = sum(
        sum(x.numel() for x in part.parameters())
        for d in plain.decoder_blocks
        for part in [d.ffn, d.attn.q_proj, d.attn.k_proj, d.attn.v_proj, d.attn.o_proj]
    )
    assert s == p - dropped
    assert 0.45 <= s / p <= 0.6, s / p  # "about half": the cross-attention stays the decoder's
    for e, d in zip(shared.encoder_blocks, shared.decoder_blocks):
        assert d.ffn is e.ffn
        for name in ENCODER_DECODER_PARTS["attn"][:4]:
            assert getattr(d.attn, name) is getattr(e.attn, name)
        # separate: the attention modules (causal vs bidirectional), the norms, the cross-attention
        assert d.attn is not e.attn and d.attn.causal and not e.attn.causal
        assert d.norm1 is not e.norm1 and d.norm2 is not e.norm2
        assert all(d.cross_attn is not x for x in e.modules())
    # each shared tensor appears once among the parameters the optimizer gets
    ids = [id(x) for x in shared.parameters()]
    assert len(ids) == len(set(ids)) == len(list(shared.parameters()))
    retie(shared)  # idempotent
    assert shared.decoder_blocks[0].ffn is shared.encoder_blocks[0].ffn


def test_shared_tensors_get_gradients():
    m = model(sharing="encoder-decoder").train()
    src, mask, tgt = batch()
    _, loss = m(src, mask, tgt, tgt)
    loss.backward()
    for w in [*m.encoder_blocks[0].ffn.parameters(), m.encoder_blocks[0].attn.q_proj.weight]:
        assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_sharing_errors():
    with pytest.raises(ValueError, match="sharing must be one of"):
        TransformerSeq2Seq(cfg(), sharing="alternate")
    with pytest.raises(ValueError, match="encoder_blocks and decoder_blocks"):
        share_encoder_decoder(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="cannot find the model's list of blocks"):
        share_parameters(model(), "alternate")  # no single `blocks` list to share into


def test_greedy_decode_stops_at_eos_and_max_len():
    m = model()
    src, mask, _ = batch()
    # force EOS as the first token: an empty output
    with torch.no_grad():  # logits = lm_head's bias alone
        m.lm_head.weight.zero_()
        m.dec_norm.weight.zero_()
        m.dec_norm.bias.zero_()
    bias = torch.full((V,), -1.0)
    bias[m.eos_id] = 1.0
    m.lm_head.bias = torch.nn.Parameter(bias)
    assert m.greedy_decode(src, mask) == [[], [], []]
    # never EOS: stops after max_new_tokens, or max_len tokens at most
    bias = torch.full((V,), -1.0)
    bias[7] = 1.0
    m.lm_head.bias = torch.nn.Parameter(bias)
    assert m.greedy_decode(src, mask, 4) == [[7] * 4] * 3
    assert m.greedy_decode(src, mask) == [[7] * 12] * 3
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.greedy_decode(src, mask, 13)


def test_greedy_decode_matches_teacher_forcing():
    """Each greedy token is the argmax of the full forward on the prefix it was chosen from."""
    m = model(sharing="encoder-decoder")
    src, mask, _ = batch()
    out = m.greedy_decode(src, mask, 6)
    for i, row in enumerate(out):
        prefix = torch.tensor([[m.bos_id] + row])
        logits = m(src[i : i + 1, : int(mask[i].sum())], None, prefix[:, : len(row) + 1][:, : m.config.max_len])
        pred = logits[0].argmax(-1).tolist()
        assert pred[: len(row)] == row


@pytest.mark.parametrize("sharing", [None, "encoder-decoder"])
def test_bitlinear_converts_to_ternary(sharing):
    m = model(quant="bitlinear", sharing=sharing)
    assert any(isinstance(x, BitLinear) for x in m.modules())
    src, mask, tgt = batch()
    before = m(src, mask, tgt)
    accelops.convert(m, "ternary")
    assert not any(type(x) is BitLinear for x in m.modules())
    assert any(isinstance(x, TernaryLinear) for x in m.modules())
    assert type(m.lm_head) is torch.nn.Linear  # the output head keeps its precision
    if sharing:
        for e, d in zip(m.encoder_blocks, m.decoder_blocks):
            assert d.ffn is e.ffn and d.attn.q_proj is e.attn.q_proj
    after = m(src, mask, tgt)
    torch.testing.assert_close(after, before, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("sharing", [None, "encoder-decoder"])
def test_to_int8_keeps_sharing(sharing):
    m = model(sharing=sharing)
    src, mask, tgt = batch()
    before = m(src, mask, tgt)
    n_before = count_parameters(m).unique_parameters
    m.to_int8()
    assert m.config.quant == "int8"
    assert any(isinstance(x, Int8Linear) for x in m.modules())
    if sharing:
        e, d = m.encoder_blocks[0], m.decoder_blocks[0]
        assert d.ffn is e.ffn and d.attn.q_proj is e.attn.q_proj and isinstance(e.attn.q_proj, Int8Linear)
    assert count_parameters(m).unique_parameters == n_before
    after = m(src, mask, tgt)
    assert (after - before).abs().max() < 0.1 * before.abs().max()


def test_bad_input():
    m = model()
    src, mask, tgt = batch()
    with pytest.raises(ValueError, match="tgt .* is required"):
        m(src, mask)
    with pytest.raises(ValueError, match="src must lie in"):
        m(src + V, mask, tgt)
    with pytest.raises(ValueError, match="attention_mask must be a tensor"):
        m(src, mask[:, :3], tgt)
    with pytest.raises(ValueError, match="exceeds the model's max_len"):
        m(src, mask, torch.ones(3, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must be a tensor of tgt's shape"):
        m(src, mask, tgt, tgt[:, :2])
    with pytest.raises(ValueError, match="rows"):
        m(src, mask, tgt[:2])
    with pytest.raises(ValueError, match="tie_embeddings"):
        TransformerSeq2Seq(cfg(tie_embeddings=True))
    with pytest.raises(ValueError, match="eos_id"):
        TransformerSeq2Seq(cfg(), eos_id=V)
