"""accelops.sharing: patterns, scopes and every invariant a shared model must keep:
state_dict, .to(), meta init + to_empty(), optimizer and DDP seeing a shared tensor once,
and a shared BitLinear quantizing once per step."""

import copy
import os
import pickle
import tempfile

import pytest
import torch
from torch import nn

import accelops.nn.bitlinear as bitlinear_module
from accelops.models import RNNLM, RNNLMConfig, TransformerLM, TransformerLMConfig
from accelops.sharing import retie, share_parameters, sharing_groups

from .helpers import run_forked_ranks

V = 29


def cfg(**kw):
    c = dict(vocab_size=V, dim=16, n_layers=4, n_heads=2, hidden=32, max_len=16)
    c.update(kw)
    return TransformerLMConfig(**c)


def batch(b=2, t=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, t), generator=g), torch.randint(0, V, (b, t), generator=g)


def unique_ids(model):
    return {id(p) for p in model.parameters()}


# ---------------------------------------------------------------------- patterns


@pytest.mark.parametrize(
    "pattern, n, kw, groups",
    [
        ("alternate", 6, {}, [[0, 2, 4], [1, 3, 5]]),
        ("alternate", 3, {}, [[0, 2]]),
        ("sequential", 6, {"interval": 2}, [[0, 1], [2, 3], [4, 5]]),
        ("sequential", 5, {"interval": 3}, [[0, 1, 2], [3, 4]]),
        ("sequential", 4, {"interval": 9}, [[0, 1, 2, 3]]),
        ("sandwich", 5, {}, [[1, 2, 3]]),
        ([[0, 6], [1, 7]], 8, {}, [[0, 6], [1, 7]]),
        ([[3, 1], [2]], 4, {}, [[3, 1]]),
    ],
)
def test_sharing_groups(pattern, n, kw, groups):
    assert sharing_groups(pattern, n, **kw) == groups


@pytest.mark.parametrize(
    "pattern, n, kw, err, match",
    [
        ("sequential", 4, {}, ValueError, "needs interval="),
        ("sequential", 4, {"interval": 1}, ValueError, "int >= 2"),
        ("alternate", 4, {"interval": 2}, ValueError, "interval applies to pattern 'sequential' only"),
        ("sandwich", 3, {}, ValueError, "shares nothing"),
        ("alternate", 2, {}, ValueError, "shares nothing"),
        ("cycle", 4, {}, ValueError, "pattern must be one of"),
        ([[0, 4]], 4, {}, ValueError, "out of range"),
        ([[0, 1], [1, 2]], 4, {}, ValueError, "block 1 appears in groups 0 and 1"),
        ([[0, 0]], 4, {}, ValueError, "twice"),
        ([[0, "1"]], 4, {}, TypeError, "ints"),
        (3, 4, {}, TypeError, "pattern must be"),
    ],
)
def test_sharing_groups_errors(pattern, n, kw, err, match):
    with pytest.raises(err, match=match):
        sharing_groups(pattern, n, **kw)


def test_share_call_errors():
    model = TransformerLM(cfg())
    with pytest.raises(ValueError, match="scope must be one of"):
        share_parameters(model, "alternate", scope="norm")
    with pytest.raises(ValueError, match="has no attn / attention / self_attn"):
        share_parameters(RNNLM(RNNLMConfig(vocab_size=V, dim=8, hidden=8, n_layers=4)), "alternate", scope="attention")
    with pytest.raises(ValueError, match="cannot find the model's list of blocks"):
        share_parameters(nn.Linear(2, 2), "alternate")
    assert len(unique_ids(model)) == len(list(TransformerLM(cfg()).parameters()))  # the failed calls changed nothing


# ---------------------------------------------------------------------- scopes and report


def test_block_alternate_report_and_identity():
    model = TransformerLM(cfg(n_layers=6))
    before = model.parameter_count()
    report = share_parameters(model, "alternate")
    b = model.blocks
    assert b[0] is b[2] is b[4] and b[1] is b[3] is b[5] and b[0] is not b[1]
    per_block = sum(p.numel() for p in b[0].parameters())
    assert report.unique_before == before.unique_parameters
    assert report.unique_after == before.unique_parameters - 4 * per_block
    assert report.bytes_after == 4 * report.unique_after and report.groups == [[0, 2, 4], [1, 3, 5]]
    assert report.after.parameters == before.parameters  # every use still counted there
    assert "unique parameters" in str(report)


@pytest.mark.parametrize("scope, part", [("attention", "attn"), ("ffn", "ffn")])
def test_part_scopes(scope, part):
    model = TransformerLM(cfg())
    report = share_parameters(model, "sequential", scope=scope, interval=2)
    b = model.blocks
    assert getattr(b[0], part) is getattr(b[1], part) and getattr(b[2], part) is getattr(b[3], part)
    assert getattr(b[1], part) is not getattr(b[2], part)
    assert b[0] is not b[1] and b[0].norm1 is not b[1].norm1
    shared = sum(p.numel() for p in getattr(b[0], part).parameters())
    assert report.unique_before - report.unique_after == 2 * shared
    _, loss = model(*batch())
    loss.backward()


def test_explicit_groups_sandwich_and_tie():
    model = TransformerLM(cfg(n_layers=5))
    n = model.parameter_count().unique_parameters
    report = share_parameters(model, "sandwich", tie_embeddings=True)
    b = model.blocks
    assert b[1] is b[2] is b[3] and b[0] is not b[1] and b[4] is not b[3]
    assert model.lm_head is None and model.config.tie_embeddings and report.tied_embeddings
    per_block = sum(p.numel() for p in b[0].parameters())
    assert report.unique_after == n - 2 * per_block - V * 16
    model2 = TransformerLM(cfg(n_layers=8))
    share_parameters(model2, [[0, 6], [1, 7]], scope="ffn")
    assert model2.blocks[0].ffn is model2.blocks[6].ffn and model2.blocks[2].ffn is not model2.blocks[0].ffn


def test_shared_rnn():
    model = RNNLM(RNNLMConfig(vocab_size=V, dim=8, hidden=12, n_layers=4, cell="lstm", quant="bitlinear"))
    report = share_parameters(model, "alternate", tie_embeddings=True)
    assert model.blocks[0] is model.blocks[2] and model.lm_head is None
    assert report.unique_after < report.unique_before
    _, loss = model(*batch())
    loss.backward()
    assert model.blocks[0].rnn.weight_hh_l0.grad is not None


# ---------------------------------------------------------------------- invariants


def test_optimizer_sees_each_shared_tensor_once():
    model = TransformerLM(cfg())
    share_parameters(model, "alternate", tie_embeddings=True)
    params = list(model.parameters())
    assert len(params) == len({id(p) for p in params})
    assert sum(p.numel() for p in params) == model.parameter_count().unique_parameters
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)
    w = model.blocks[0].attn.q_proj.weight
    w0 = w.detach().clone()
    _, loss = model(*batch())
    loss.backward()
    # the gradient of a shared weight is the sum over its uses, and the step applies it once
    unshared = TransformerLM(cfg(tie_embeddings=True))
    unshared.load_state_dict(model.state_dict())
    unshared(*batch())[1].backward()
    g = unshared.blocks[0].attn.q_proj.weight.grad + unshared.blocks[2].attn.q_proj.weight.grad
    torch.testing.assert_close(w.grad, g)
    opt.step()
    torch.testing.assert_close(w.detach(), w0 - 0.1 * g)


def test_state_dict_round_trip_and_unshared_checkpoints():
    model = TransformerLM(cfg())
    share_parameters(model, "alternate")
    tokens, _ = batch()
    sd = model.state_dict()
    assert torch.equal(sd["blocks.0.attn.q_proj.weight"], sd["blocks.2.attn.q_proj.weight"])
    fresh = TransformerLM(cfg())
    share_parameters(fresh, "alternate")
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(tokens), model(tokens))
    assert fresh.blocks[0] is fresh.blocks[2]
    # torch.save / torch.load of the whole dict, and of the model object
    with tempfile.TemporaryDirectory() as d:
        torch.save(sd, os.path.join(d, "sd.pt"))
        fresh.load_state_dict(torch.load(os.path.join(d, "sd.pt")))
    # a shared checkpoint loads into an unshared model (the shared tensor under each name)
    unshared = TransformerLM(cfg())
    unshared.load_state_dict(sd)
    assert torch.equal(unshared(tokens), model(tokens))
    # an unshared checkpoint into a shared model: refused, not silently the last name's values
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(RuntimeError, match="blocks.0.+blocks.2.+saved from a model without that sharing"):
        fresh.load_state_dict(TransformerLM(cfg()).state_dict())
    # ... and it is refused before anything is copied
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())
    # the documented route: load unshared, then share
    src = TransformerLM(cfg())
    target = TransformerLM(cfg())
    target.load_state_dict(src.state_dict())
    share_parameters(target, "alternate")
    assert torch.equal(target.blocks[2].attn.q_proj.weight, src.blocks[0].attn.q_proj.weight)


def test_to_and_deepcopy_keep_sharing():
    model = TransformerLM(cfg())
    share_parameters(model, "alternate", scope="attention")
    model.to(torch.float64)
    assert model.blocks[0].attn is model.blocks[2].attn
    assert model.blocks[0].attn.q_proj.weight.dtype == torch.float64
    assert len(list(model.parameters())) == len(unique_ids(model))
    clone = copy.deepcopy(model).float()
    assert clone.blocks[0].attn is clone.blocks[2].attn and clone.blocks[0].attn is not model.blocks[0].attn
    with pytest.raises(RuntimeError, match="saved from a model without that sharing"):
        clone.load_state_dict(TransformerLM(cfg()).state_dict())  # the checking hook came along


@pytest.mark.parametrize("quant", [None, "bitlinear"])
def test_meta_init_to_empty_keeps_sharing(quant):
    with torch.device("meta"):
        model = TransformerLM(cfg(quant=quant))
    share_parameters(model, "alternate", tie_embeddings=True)
    share_parameters(model, [[1, 3]], scope="ffn")
    n_unique = len(unique_ids(model))
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.blocks[0] is model.blocks[2] and model.blocks[1].ffn is model.blocks[3].ffn
    assert len(unique_ids(model)) == n_unique and not any(p.is_meta for p in model.parameters())
    assert model.lm_head is None  # tied structurally: the head reads tok_emb.weight
    _, loss = model(*batch())
    loss.backward()
    assert torch.isfinite(loss)


class _HFStyle(nn.Module):
    """A model that is not an accelops one: embeddings tied by Parameter."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, 8)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4))
        self.out = nn.Linear(8, V, bias=False)

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.out


def test_parameter_tie_is_re_established_by_retie():
    with torch.device("meta"):
        model = _HFStyle()
    report = share_parameters(model, "alternate", tie_embeddings=True)
    assert "retie" in report.notes[0]
    assert model.out.weight is model.embed.weight and model.layers[0] is model.layers[2]
    model.to_empty(device="cpu")
    # torch's to_empty gives each module its own new Parameter: a Parameter tie breaks,
    # module sharing does not.
    assert model.out.weight is not model.embed.weight and model.layers[0] is model.layers[2]
    retie(model)
    assert model.out.weight is model.embed.weight


# ---------------------------------------------------------------------- quantize once per step


def _count_quantizations(monkeypatch):
    calls = []
    real = bitlinear_module.quantize_weight_ternary_values

    def counting(w, per_channel=False):
        calls.append(w.shape)
        return real(w, per_channel)

    monkeypatch.setattr(bitlinear_module, "quantize_weight_ternary_values", counting)
    return calls


def test_shared_bitlinear_quantizes_once_per_step(monkeypatch):
    torch.manual_seed(0)
    model = TransformerLM(cfg(quant="bitlinear"))
    reference = copy.deepcopy(model)  # unshared, uncached: the spec for outputs and gradients
    share_parameters(model, "alternate")
    share_parameters(reference, "alternate")
    for m in reference.modules():
        if isinstance(m, bitlinear_module.BitLinear):
            m.cache_quantization = False
    calls = _count_quantizations(monkeypatch)
    tokens, targets = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    unique_quantized = 2 * 7  # two unique blocks x (q, k, v, o, gate, up, down)
    for step in range(3):
        calls.clear()
        opt.zero_grad()
        _, loss = model(tokens, targets)
        loss.backward()
        assert len(calls) == unique_quantized, step  # not 4 blocks x 7 uses
        calls.clear()
        opt_ref.zero_grad()
        _, loss_ref = reference(tokens, targets)
        loss_ref.backward()
        assert len(calls) == 2 * unique_quantized  # uncached: once per use
        # the cache changes nothing but the count, and is refreshed after each step
        assert torch.equal(loss, loss_ref), step
        for (n, p), p_ref in zip(model.named_parameters(), reference.parameters()):
            assert torch.equal(p.grad, p_ref.grad), n
        opt.step()
        opt_ref.step()


def test_quantization_cache_follows_weight_changes(monkeypatch):
    layer = bitlinear_module.BitLinear(16, 8)
    layer.cache_quantization = True
    calls = _count_quantizations(monkeypatch)
    x = torch.randn(3, 16)

    def uncached():
        ref = copy.deepcopy(layer)
        ref.cache_quantization = False
        return ref(x)

    layer(x)
    layer(x)
    assert len(calls) == 1
    with torch.no_grad():
        layer.weight.mul_(-1)  # an in-place write (as an optimizer step) bumps the version
    assert torch.equal(layer(x), uncached())
    assert len(calls) == 3  # the cached layer's one, the uncached copy's one
    layer.weight.data.copy_(torch.randn(8, 16))  # behind autograd's back: version unchanged
    layer.clear_quantization_cache()  # what share_parameters' pre-forward hook does
    assert torch.equal(layer(x), uncached())
    assert pickle.loads(pickle.dumps(layer))._quant_cache is None


# ---------------------------------------------------------------------- DDP


def _ddp_worker(rank, world, port, result_dir):
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    from accelops.distributed import BucketedAllReducer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = TransformerLM(cfg())
        share_parameters(model, "alternate", tie_embeddings=True)
        reference = copy.deepcopy(model)
        reduced = []

        def counting_hook(state, bucket):
            reduced.append(bucket.buffer().numel())
            return allreduce_hook(state, bucket)

        ddp = DDP(model)
        ddp.register_comm_hook(None, counting_hook)
        data = [batch(seed=10 + r) for r in range(world)]
        _, loss = ddp(*data[rank])
        loss.backward()
        # the same step in one process over both ranks' data: DDP averages the gradients
        for tokens, targets in data:
            (reference(tokens, targets)[1] / world).backward()
        unique = sum(p.numel() for p in model.parameters())
        errors = []
        if sum(reduced) != unique:
            errors.append(f"reduced {sum(reduced)} elements, the model has {unique} unique")
        for (n, p), p_ref in zip(model.named_parameters(), reference.parameters()):
            if not torch.allclose(p.grad, p_ref.grad, rtol=1e-5, atol=1e-7):
                errors.append(f"DDP {n}: max diff {(p.grad - p_ref.grad).abs().max().item()}")

        # accelops' own reducer on the same shared model: each shared tensor in one bucket
        # slot (hooked once however many blocks use it), gradients the same as DDP's.
        torch.manual_seed(0)
        model = TransformerLM(cfg())
        share_parameters(model, "alternate", tie_embeddings=True)
        reducer = BucketedAllReducer(model, bucket_cap_mb=0.05, first_bucket_mb=0.01)
        _, loss = model(*data[rank])
        loss.backward()
        reducer.finish()
        if sum(reducer.bucket_sizes) != unique:
            errors.append(f"reducer buckets hold {sum(reducer.bucket_sizes)} elements, the model has {unique} unique")
        for (n, p), p_ref in zip(model.named_parameters(), reference.parameters()):
            if not torch.allclose(p.grad, p_ref.grad, rtol=1e-5, atol=1e-7):
                errors.append(f"reducer {n}: max diff {(p.grad - p_ref.grad).abs().max().item()}")
        reducer.remove()
        with open(os.path.join(result_dir, f"rank{rank}.txt"), "w") as f:
            f.write("\n".join(errors) if errors else "ok")
    finally:
        dist.destroy_process_group()


def test_ddp_and_reducer_reduce_shared_parameters_once_with_correct_grads():
    with tempfile.TemporaryDirectory() as d:
        run_forked_ranks(_ddp_worker, d)
        for r in range(2):
            with open(os.path.join(d, f"rank{r}.txt")) as f:
                assert f.read() == "ok", f"rank {r}"
