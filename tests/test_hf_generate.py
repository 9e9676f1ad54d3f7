"""Hugging Face models converted by accelops keep working with their own generate(): tiny
LlamaForCausalLM and BitNetForCausalLM, accelops.convert(model, "ternary" / "int8"), then
greedy model.generate(...) (transformers' KV cache) equals a no-cache argmax loop (no eos
token, so every step is compared)."""

import pytest
import torch

import accelops
from accelops.nn import Int8Linear, TernaryLinear

from .helpers import tiny_hf_config

transformers = pytest.importorskip("transformers")

V = 53


def llama():
    return transformers.LlamaForCausalLM(tiny_hf_config(transformers.LlamaConfig, V))


def bitnet():
    return transformers.BitNetForCausalLM(tiny_hf_config(transformers.BitNetConfig, V))


def greedy_without_cache(model, ids, n):
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("build", [llama, bitnet], ids=["llama", "bitnet"])
@pytest.mark.parametrize("mode", ["ternary", "int8"])
def test_converted_hf_model_generates(build, mode):
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():  # clear winners among the logits (the default init makes them nearly flat)
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)
    report = accelops.convert(model, mode)
    layer = TernaryLinear if mode == "ternary" else Int8Linear
    assert type(model.model.layers[0].self_attn.q_proj) is layer and type(model.model.layers[1].mlp.down_proj) is layer
    assert report.num_swapped >= 14
    ids = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
    assert out.shape == (2, 7 + 12)
    assert torch.equal(out, greedy_without_cache(model, ids, 12))
