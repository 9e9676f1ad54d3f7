"""accelops.models.hf: transformers' BitNetForCausalLM checkpoints (written by transformers
itself, random weights) load into TransformerLM and give the same logits; wrong shapes,
missing and foreign tensors are refused naming the tensor. Packed (quantized) checkpoints:
tests/test_hf_bitnet_packed.py."""

import dataclasses

import pytest
import torch

from accelops.models import TransformerLM, TransformerLMConfig
from accelops.models.hf import config_from_hf_bitnet, hf_bitnet_name

from .helpers import tiny_hf_config

transformers = pytest.importorskip("transformers")

V = 61


def hf_bitnet(tie=False, seed=0, **kw):
    cfg = tiny_hf_config(transformers.BitNetConfig, V, eos_token_id=2, pad_token_id=None, tie_word_embeddings=tie, **kw)
    torch.manual_seed(seed)
    model = transformers.BitNetForCausalLM(cfg).eval()
    # transformers initialises the norms to 1 and the projections small: random values
    # everywhere, so a weight loaded into the wrong place shows in the logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for tie in (False, True):
        model = hf_bitnet(tie=tie)
        path = tmp_path_factory.mktemp(f"bitnet-tie{tie}")
        model.save_pretrained(path)
        out[tie] = (model, str(path))
    return out


@pytest.mark.parametrize("tie", [False, True])
def test_logits_equal_transformers(saved, tie):
    hf, path = saved[tie]
    model = TransformerLM.from_hf_bitnet(path)
    cfg = model.config
    assert (cfg.pos_emb, cfg.norm, cfg.kv_heads, cfg.activation, cfg.tie_embeddings, cfg.rope_theta) == (
        "rope",
        "rmsnorm",
        2,
        "relu2",
        tie,
        500000.0,
    )
    assert not model.training and (model.lm_head is None) == tie
    tokens = torch.randint(0, V, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
    out = model(tokens)
    assert ref.abs().max() > 1.0  # not a trivially small comparison
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_state_dict_with_config(saved):
    hf, _ = saved[False]
    model = TransformerLM.from_hf_bitnet(hf.state_dict(), hf.config)  # a BitNetConfig works as config
    tokens = torch.randint(0, V, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-5, atol=1e-5)
    # a TransformerLMConfig too (here with a shorter context)
    cfg = dataclasses.replace(config_from_hf_bitnet(hf.config.to_dict()), max_len=16)
    assert TransformerLM.from_hf_bitnet(hf.state_dict(), cfg).config.max_len == 16
    with pytest.raises(ValueError, match="config is required"):
        TransformerLM.from_hf_bitnet(hf.state_dict())


def test_names():
    assert hf_bitnet_name("model.layers.3.self_attn.q_proj.weight") == "blocks.3.attn.q_proj.weight"
    assert hf_bitnet_name("model.layers.0.mlp.ffn_sub_norm.weight") == "blocks.0.ffn.ffn_sub_norm.weight"
    assert hf_bitnet_name("model.layers.0.post_attention_layernorm.weight") == "blocks.0.norm2.weight"
    assert hf_bitnet_name("model.embed_tokens.weight") == "tok_emb.weight"
    assert hf_bitnet_name("model.layers.0.self_attn.rotary.weight") is None


def test_wrong_shape_names_the_tensor(saved):
    hf, path = saved[False]
    cfg = config_from_hf_bitnet(hf.config.to_dict(), hidden=64)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.(down|gate|up)_proj\.weight has shape .* needs"):
        TransformerLM.from_hf_bitnet(path, cfg)
    other = hf_bitnet(num_key_value_heads=4)
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(32, 32\).*"
        r"needs \(16, 32\)",
    ):
        TransformerLM.from_hf_bitnet(other.state_dict(), hf.config)


def test_missing_and_foreign_tensors(saved):
    hf, _ = saved[False]
    sd = dict(hf.state_dict())
    del sd["model.layers.1.mlp.ffn_sub_norm.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.ffn_sub_norm\.weight is missing"):
        TransformerLM.from_hf_bitnet(sd, hf.config)
    sd = dict(hf.state_dict(), **{"model.layers.2.input_layernorm.weight": torch.ones(32)})
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.2\.input_layernorm\.weight is not a weight of a BitNet "
        r"model of this config",
    ):
        TransformerLM.from_hf_bitnet(sd, hf.config)
    sd = dict(hf.state_dict())
    del sd["lm_head.weight"]
    with pytest.raises(ValueError, match=r"lm_head\.weight is missing"):
        TransformerLM.from_hf_bitnet(sd, hf.config)


def test_scales_without_quantization_config_and_bad_configs_are_refused(saved, tmp_path):
    hf, _ = saved[False]
    cfg = hf.config.to_dict()
    with pytest.raises(ValueError, match="quantization_config: quant_method 'gptq' is not supported"):
        config_from_hf_bitnet(dict(cfg, quantization_config={"quant_method": "gptq"}))
    sd = dict(hf.state_dict(), **{"model.layers.0.self_attn.q_proj.weight_scale": torch.ones(1)})
    with pytest.raises(ValueError, match=r"q_proj\.weight_scale: .*no quantization_config"):
        TransformerLM.from_hf_bitnet(sd, hf.config)
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        config_from_hf_bitnet(dict(cfg, model_type="llama"))
    with pytest.raises(ValueError, match="hidden_act 'tanh'"):
        config_from_hf_bitnet(dict(cfg, hidden_act="tanh"))
    with pytest.raises(ValueError, match="rope_type 'llama3'"):
        config_from_hf_bitnet(dict(cfg, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4}))
    with pytest.raises(FileNotFoundError, match="config.json"):
        TransformerLM.from_hf_bitnet(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        TransformerLM.from_hf_bitnet(str(tmp_path / "nope"))


def test_bitnet_2b4t_config_reads_back():
    # the 2B4T config.json's numbers, as transformers' BitNetConfig holds them, give bitnet_2b4t()
    hf = transformers.BitNetConfig(max_position_embeddings=4096, tie_word_embeddings=True)
    assert config_from_hf_bitnet(hf) == TransformerLMConfig.bitnet_2b4t(attn_bias=False, mlp_bias=False)
