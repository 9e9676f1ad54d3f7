"""Loading transformers' BitNet checkpoints into TransformerLM.

    model = TransformerLM.from_hf_bitnet("path/to/save_pretrained_dir")    # or from_hf_bitnet(...)
    accelops.convert(model, "ternary")                                   # packed ternary inference

What transformers' BitNetForCausalLM computes (transformers 5.23, modeling_bitnet.py) and
how it maps: token embedding; per layer input_layernorm (RMSNorm) -> norm1, self_attn with
q/k/v/o_proj (grouped-query, rotate-half RoPE with rope_parameters.rope_theta) and
attn_sub_norm (RMSNorm before o_proj) -> attn, post_attention_layernorm -> norm2, mlp
(gate_proj, up_proj, ffn_sub_norm, down_proj; down(sub_norm(act(gate(x)) * up(x))) with
hidden_act "relu2" = relu(x)^2) -> ffn; final RMSNorm -> norm; lm_head (absent when tied).
BitNetForCausalLM built from a config without quantization_config (as save_pretrained of a
model built in Python writes it) uses plain nn.Linear layers: no weight or activation
quantization happens in its forward, so this fp32 TransformerLM gives its logits up to fp32
rounding. The ternary / int8 quantization is accelops.convert's, afterwards.

Checkpoints with a quantization_config (the published microsoft/bitnet-b1.58-2B-4T: weights
packed 4 ternary values a byte, plus weight_scale) are refused with a clear error: their
packed layout is not read here (yet).
"""

from __future__ import annotations

import json
import os
import re

import torch

from .config import TransformerLMConfig
from .transformer import TransformerLM

__all__ = ["from_hf_bitnet", "config_from_hf_bitnet", "hf_bitnet_name"]

# transformers' hidden_act -> TransformerLMConfig.activation (the MLP is gated: act(gate) * up)
_ACTS = {"relu2": "relu2", "silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}

_TOP = {
    "model.embed_tokens.weight": "tok_emb.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER = {
    "input_layernorm.weight": "norm1.weight",
    "post_attention_layernorm.weight": "norm2.weight",
    "self_attn.attn_sub_norm.weight": "attn.attn_sub_norm.weight",
    "mlp.ffn_sub_norm.weight": "ffn.ffn_sub_norm.weight",
    **{
        f"self_attn.{p}.{t}": f"attn.{p}.{t}"
        for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        for t in ("weight", "bias")
    },
    **{f"mlp.{p}.{t}": f"ffn.{p}.{t}" for p in ("gate_proj", "up_proj", "down_proj") for t in ("weight", "bias")},
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def hf_bitnet_name(name: str) -> str | None:
    """transformers' BitNet parameter name -> TransformerLM's (None: not a BitNet weight)."""
    if name in _TOP:
        return _TOP[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER:
        return f"blocks.{m.group(1)}.{_LAYER[m.group(2)]}"
    return None


def config_from_hf_bitnet(hf: dict, **overrides) -> TransformerLMConfig:
    """A TransformerLMConfig from a BitNet config.json (a dict; a transformers BitNetConfig
    works too). overrides replace fields (e.g. max_len, quant)."""
    if hasattr(hf, "to_dict"):
        hf = hf.to_dict()
    if not isinstance(hf, dict):
        raise TypeError(f"config must be a TransformerLMConfig or a BitNet config dict, got {type(hf).__name__}")
    if hf.get("model_type", "bitnet") != "bitnet":
        raise ValueError(f"config: model_type is {hf.get('model_type')!r}, not 'bitnet'")
    if hf.get("quantization_config"):
        raise ValueError(
            "config: the checkpoint has a quantization_config "
            f"({hf['quantization_config']!r}): its weights are stored packed (transformers' bitnet "
            "quantizer), which from_hf_bitnet does not read; use a checkpoint of unpacked weights"
        )
    act = hf.get("hidden_act", "relu2")
    if act not in _ACTS:
        raise ValueError(f"config: hidden_act {act!r} is not supported (supported: {sorted(_ACTS)})")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"config: rope_type {rope['rope_type']!r} is not supported (only 'default' RoPE)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 500000.0))  # BitNetConfig.default_theta
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, dim // heads):
        raise ValueError(
            f"config: head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads = "
            f"{dim // heads}; TransformerLM's head size is dim / n_heads"
        )
    fields = dict(
        vocab_size=hf["vocab_size"],
        dim=dim,
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        hidden=hf["intermediate_size"],
        max_len=hf.get("max_position_embeddings", 2048),
        activation=_ACTS[act],
        pos_emb="rope",
        rope_theta=float(theta),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-5),
        attn_sub_norm=True,
        ffn_sub_norm=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bias=False,
        attn_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=False,
    )
    fields.update(overrides)
    return TransformerLMConfig(**fields)


def _read_dir(path: str):
    """(config dict, state dict) of a save_pretrained directory."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path!r} has no config.json: pass a directory written by save_pretrained")
    with open(cfg_path) as f:
        hf_config = json.load(f)
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            files = [os.path.join(path, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    else:
        raise FileNotFoundError(f"{path!r} has no model.safetensors (nor model.safetensors.index.json)")
    from safetensors.torch import load_file

    state = {}
    for file in files:
        state.update(load_file(file))
    return hf_config, state


def from_hf_bitnet(path_or_state_dict, config=None) -> TransformerLM:
    """A TransformerLM (fp32, eval mode, on the CPU) holding a transformers BitNetForCausalLM
    checkpoint.

    path_or_state_dict: a directory written by save_pretrained (config.json and
        model.safetensors, or sharded model-*.safetensors with their index), or a state dict
        of BitNetForCausalLM's names (then config is required).
    config: a TransformerLMConfig (must describe the checkpoint's shapes), a BitNet config
        dict / BitNetConfig, or None (the directory's config.json).

    Errors: ValueError naming the tensor for a weight of the wrong shape, a missing weight
    or a name that is not BitNet's; the quantized (packed) checkpoint format is refused."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path!r} is not a directory written by save_pretrained")
        hf_config, state = _read_dir(path)
        if config is None:
            config = hf_config
    elif isinstance(path_or_state_dict, dict):
        state = path_or_state_dict
        if config is None:
            raise ValueError("config is required with a state dict: a TransformerLMConfig or the BitNet config")
    else:
        raise TypeError(
            f"path_or_state_dict must be a directory path or a state dict, got {type(path_or_state_dict).__name__}"
        )
    if not isinstance(config, TransformerLMConfig):
        config = config_from_hf_bitnet(config)

    packed = sorted(k for k in state if k.endswith("weight_scale"))
    if packed:
        raise ValueError(
            f"{packed[0]}: the checkpoint holds packed ternary weights with scales (transformers' bitnet "
            "quantizer), which from_hf_bitnet does not read; use a checkpoint of unpacked weights"
        )
    # fp32 projections: built on the meta device, so nothing is initialised only to be
    # overwritten (2.4e9 weights for 2B4T); other quant modes build normally (their layers
    # may hold state that load_state_dict does not fill) and quantize on load.
    with torch.device("meta" if config.quant is None else "cpu"):
        model = TransformerLM(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    ours, unknown = {}, []
    for name, tensor in state.items():
        if name.endswith("rotary_emb.inv_freq"):  # recomputed from rope_theta (older checkpoints saved it)
            continue
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # tied: transformers reads the head from the embedding as well
        target = hf_bitnet_name(name)
        if target is None or target not in expected:
            unknown.append(name)
            continue
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != tuple(expected[target]):
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, but the model of this config needs "
                f"{tuple(expected[target])} for {target} (vocab_size={config.vocab_size}, "
                f"dim={config.dim}, n_heads={config.n_heads}, n_kv_heads={config.kv_heads}, "
                f"hidden={config.hidden}); the checkpoint and its config disagree"
            )
        ours[target] = tensor.to(torch.float32)
    if unknown:
        raise ValueError(
            f"{unknown[0]} is not a weight of a BitNet model of this config"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f" (n_layers={config.n_layers}, tie_embeddings={config.tie_embeddings})"
        )
    missing = [k for k in expected if k not in ours]
    if missing:
        hf_name = _hf_name(missing[0])
        raise ValueError(
            f"{hf_name} is missing from the checkpoint (the model's {missing[0]})"
            + (f", and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    if config.quant is None:
        model.to_empty(device="cpu")
    model.load_state_dict(ours, strict=True)
    return model.eval()


def _hf_name(ours: str) -> str:
    for hf, name in _TOP.items():
        if name == ours:
            return hf
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", ours)
    if m:
        for hf, name in _LAYER.items():
            if name == m.group(2):
                return f"model.layers.{m.group(1)}.{hf}"
    return ours
