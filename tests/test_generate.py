"""TransformerLM.generate: the KV-cache path equals the no-cache forward (logits, and greedy
tokens on fp32, int8 and ternary models, batches of prompts of different lengths), sampling
options, eos, streaming, the cache bounds and the argument errors."""

import copy

import pytest
import torch

import accelops
from accelops.models import TransformerLM, TransformerLMConfig
from accelops.models.generate import sample
from accelops.models.layers import KVCache

V = 37
BITNET_ARCH = dict(
    pos_emb="rope", n_kv_heads=2, norm="rmsnorm", activation="relu2", attn_sub_norm=True, ffn_sub_norm=True
)
ARCHS = {"default": {}, "rope-gqa-rmsnorm-relu2": BITNET_ARCH}


def make_model(arch="default", seed=0, **kw):
    cfg = dict(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden=48, max_len=48)
    cfg.update(ARCHS[arch])
    cfg.update(kw)
    torch.manual_seed(seed)
    model = TransformerLM(TransformerLMConfig(**cfg)).eval()
    # GPT-2 init makes an untrained model's next-token distribution nearly flat; larger weights
    # give clear winners, so greedy decoding tests the cache rather than ties between logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(8)
    return model


def greedy_without_cache(model, prompt, n):
    seq = torch.as_tensor(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq[None])[0, -1].argmax()[None]])
    return seq[len(prompt) :].tolist()


def prompts(*lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", [None, "int8", "ternary"])
def test_greedy_equals_no_cache_argmax(arch, mode):
    model = make_model(arch)
    if mode is not None:
        accelops.convert(model, mode)
    batch = prompts(5, 11, 1)
    out = model.generate(batch, 16, temperature=0)
    assert out.shape == (3, 16) and out.dtype == torch.long
    for row, p in zip(out, batch):
        assert row.tolist() == greedy_without_cache(model, p, 16)
    # one prompt alone gives its row of the batch
    assert torch.equal(model.generate(batch[1], 16, temperature=0)[0], out[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_logits_equal_the_forward(arch):
    # prefill + decode steps through the cache, against model(full sequence) at every position
    model = make_model(arch)
    seq = prompts(20)[0][None]
    ref = model(seq)
    p = 7
    cache = KVCache(2, 1, model.config.kv_heads, 20, model.config.head_dim)
    with torch.no_grad():
        h = model._hidden(seq[:, :p], positions=torch.arange(p)[None], cache=cache)
        torch.testing.assert_close(model.head(h), ref[:, :p])
        for i in range(p, 20):
            pos = torch.tensor([[i]])
            mask = (torch.arange(20) <= pos[:, :, None])[:, None]
            h = model._hidden(seq[:, i : i + 1], positions=pos, cache=cache, mask=mask)
            torch.testing.assert_close(model.head(h)[:, 0], ref[:, i], rtol=1e-5, atol=1e-5)


def test_batch_rows_equal_their_prompts_alone_with_learned_positions():
    model = make_model("default")
    batch = prompts(3, 8, 6, seed=4)
    out = model.generate(batch, 10, temperature=0)
    for row, p in zip(out, batch):
        assert torch.equal(row, model.generate(p[None], 10, temperature=0)[0])


def test_shared_blocks_get_a_cache_each():
    from accelops.sharing import share_parameters

    model = make_model("rope-gqa-rmsnorm-relu2", n_layers=4)
    share_parameters(model, "alternate")
    assert model.blocks[0] is model.blocks[2]
    p = prompts(6)[0]
    assert model.generate(p, 12, temperature=0)[0].tolist() == greedy_without_cache(model, p, 12)


def test_accepted_prompt_forms():
    model = make_model()
    p = prompts(4)[0]
    ref = model.generate(p[None], 5, temperature=0)
    assert torch.equal(model.generate(p, 5, temperature=0), ref)
    assert torch.equal(model.generate(p.tolist(), 5, temperature=0), ref)
    assert torch.equal(model.generate([p.tolist()], 5, temperature=0), ref)
    assert torch.equal(model.generate(p[None].int(), 5, temperature=0), ref)


def test_sampling_is_reproducible_with_a_seed():
    model = make_model()
    batch = prompts(3, 6)
    a = model.generate(batch, 12, temperature=1.5, seed=7)
    assert torch.equal(a, model.generate(batch, 12, temperature=1.5, seed=7))
    assert not torch.equal(a, model.generate(batch, 12, temperature=1.5, seed=8))
    greedy = model.generate(batch, 12, temperature=0)
    assert not torch.equal(a, greedy)
    # top_k=1 and a tiny nucleus leave only the most likely token: greedy
    assert torch.equal(model.generate(batch, 12, temperature=2.0, top_k=1, seed=1), greedy)
    assert torch.equal(model.generate(batch, 12, temperature=2.0, top_p=1e-6, seed=1), greedy)


def test_sample_restricts_to_top_k_and_top_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample(logits, 1.0, top_p=0.7, generator=g).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(sample(logits, 1.0, top_p=0.45, generator=g).tolist()) == {0}
    assert set(sample(logits, 1.0, top_p=0.9, generator=g).tolist()) == {0, 1, 2}
    full = sample(logits, 1.0, generator=g)
    assert set(full.tolist()) == {0, 1, 2, 3}
    freq = torch.bincount(full, minlength=4) / 4000
    torch.testing.assert_close(freq, probs[0], atol=0.03, rtol=0)
    # the temperature sharpens: at 0.25 the most likely token dominates
    assert (sample(logits, 0.25, generator=g) == 0).float().mean() > 0.8
    assert sample(logits, 0.0).eq(0).all()


def test_eos_stops_rows_and_the_batch():
    model = make_model()
    batch = prompts(4, 9)
    free = model.generate(batch, 12, temperature=0)
    eos = int(free[0, 3])  # what row 0 says at its 4th step
    out = model.generate(batch, 12, temperature=0, eos_token_id=eos)
    first = (free[0] == eos).nonzero()[0].item()
    assert out[0, : first + 1].tolist() == free[0, : first + 1].tolist()
    assert (out[0, first:] == eos).all()
    # row 1 continues unaffected until it emits eos itself
    hit = (free[1] == eos).nonzero()
    stop = hit[0].item() + 1 if len(hit) else 12
    assert out[1, :stop].tolist() == free[1, :stop].tolist()
    # a single prompt stops right after eos
    single = model.generate(batch[0], 12, temperature=0, eos_token_id=eos)
    assert single.shape == (1, first + 1)


def test_stream_gets_every_step():
    model = make_model()
    seen = []
    out = model.generate(prompts(3, 5), 9, temperature=0.8, seed=3, stream=seen.append)
    assert len(seen) == 9 and all(t.shape == (2,) and t.device.type == "cpu" for t in seen)
    assert torch.equal(torch.stack(seen, dim=1), out)


def test_generate_runs_in_eval_mode_and_restores_the_mode():
    model = make_model(dropout=0.3).train()
    p = prompts(5)[0]
    a = model.generate(p, 8, temperature=0)
    assert model.training
    assert torch.equal(a, model.generate(p, 8, temperature=0))
    model.eval()
    assert a[0].tolist() == greedy_without_cache(model, p, 8)


def test_the_cache_is_sized_and_never_written_past(monkeypatch):
    model = make_model()
    seen = []
    update = KVCache.update

    def spy(self, layer, k, v, positions):
        seen.append((self.size, int(positions.max())))
        return update(self, layer, k, v, positions)

    monkeypatch.setattr(KVCache, "update", spy)
    model.generate(prompts(4, 10), 6, temperature=0)
    sizes = {s for s, _ in seen}
    assert sizes == {10 + 6 - 1}  # the last new token is never fed back
    assert max(p for _, p in seen) == 14
    cache = KVCache(1, 1, 2, 4, 8)
    cache.check_positions(torch.tensor([[3]]))
    with pytest.raises(ValueError, match="outside its 4 slots"):
        cache.check_positions(torch.tensor([[4]]))
    # the longest that fits: prompt + new tokens == max_len
    assert model.generate(prompts(40)[0], 8, temperature=0).shape == (1, 8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(tokens=torch.zeros(1, 49, dtype=torch.long)),
            "tokens: prompt 0 has 49 tokens, longer than the model's context max_len=48",
        ),
        (dict(max_new_tokens=46), r"max_new_tokens=46 runs past the model's context.*at most 45 new tokens"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(max_new_tokens=2.0), "max_new_tokens must be an int"),
        (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.1), "top_p"),
        (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(tokens=torch.zeros(1, 0, dtype=torch.long)), "tokens: prompt 0 is empty"),
        (dict(tokens=[[1, 2], []]), "tokens: prompt 1 is empty"),
        (dict(tokens=[]), "at least one prompt"),
        (
            dict(tokens=torch.tensor([[1, V]])),
            r"tokens: prompt 0 holds ids in \[1, 37\], outside the vocabulary "
            r"\[0, vocab_size=37\)",
        ),
        (dict(tokens=[[3, -1]]), r"outside the vocabulary"),
        (dict(tokens=torch.ones(1, 3)), "tokens must hold integer token ids"),
        (dict(tokens=torch.ones(1, 2, 3, dtype=torch.long)), r"tokens must be a \[batch, seq\] or \[seq\] tensor"),
        (dict(tokens=[[1.5, 2]]), r"tokens\[0\] must be a 1-D integer tensor or a list of ints"),
        (dict(tokens="hello"), "tokens must be an integer tensor or a list of prompts"),
        (dict(eos_token_id=V), r"eos_token_id must lie in \[0, vocab_size=37\)"),
        (dict(seed="1"), "seed must be an int"),
        (dict(stream=5), "stream must be a callable"),
        (dict(compile=1), "compile must be a bool"),
        (
            dict(temperature=0, top_k=5),
            r"temperature=0 is greedy decoding, which takes no sampling options \(top_k=5\)",
        ),
        (dict(temperature=0, top_p=0.9), r"temperature=0 is greedy .*\(top_p=0.9\)"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    model = make_model()
    args = dict(tokens=torch.tensor([[1, 2, 3], [4, 5, 6]]), max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        model.generate(**args)


def test_generate_does_not_touch_the_weights_or_grad_state():
    model = make_model("rope-gqa-rmsnorm-relu2")
    before = copy.deepcopy(model.state_dict())
    model.generate(prompts(4)[0], 5, temperature=1.0, seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.is_grad_enabled()


@pytest.mark.slow
def test_compiled_decode_equals_eager_and_the_no_cache_argmax():
    """generate(compile=True): the decode steps through torch.compile give the eager tokens,
    which equal the no-cache argmax; a second call of the same shapes does not recompile."""
    from torch._dynamo.utils import counters

    model = make_model("rope-gqa-rmsnorm-relu2")
    accelops.convert(model, "ternary", head="int8")
    batch = prompts(5, 11, 1)
    out = model.generate(batch, 12, temperature=0, compile=True)
    assert torch.equal(out, model.generate(batch, 12, temperature=0))
    for row, p in zip(out, batch):
        assert row.tolist() == greedy_without_cache(model, p, 12)
    graphs = counters["stats"]["unique_graphs"]
    assert torch.equal(model.generate(batch, 12, temperature=0, compile=True), out)
    assert counters["stats"]["unique_graphs"] == graphs


def test_eager_decode_attends_over_the_filled_slots_only(monkeypatch):
    """Eager decode steps pass a mask over the slots filled so far (longest prompt + step),
    not the whole cache; the tokens still equal the no-cache argmax."""
    from accelops.models.transformer import CausalSelfAttention

    model = make_model("rope-gqa-rmsnorm-relu2")
    widths, ints = [], []
    forward = CausalSelfAttention.forward

    def spy(self, x, rope=None, cache=None, mask=None):
        if isinstance(mask, torch.Tensor):
            widths.append(mask.shape[-1])
        elif mask is not None:
            ints.append(mask)
        return forward(self, x, rope, cache, mask)

    monkeypatch.setattr(CausalSelfAttention, "forward", spy)
    batch = prompts(7, 4)
    out = model.generate(batch, 6, temperature=0)
    n_layers = model.config.n_layers
    assert widths == [w for w in range(8, 13) for _ in range(n_layers)]  # cache size 7 + 6 - 1 = 12
    for row, p in zip(out, batch):
        assert row.tolist() == greedy_without_cache(model, p, 6)
    # prompts of one length: every row sees all filled slots, so no mask (an int: how many)
    widths.clear()
    batch = prompts(5, 5, seed=2)
    out = model.generate(batch, 4, temperature=0)
    assert widths == [] and ints == [w for w in range(6, 9) for _ in range(n_layers)]
    assert all(row.tolist() == greedy_without_cache(model, p, 4) for row, p in zip(out, batch))
