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

Checkpoints with a quantization_config (transformers' bitnet quantizer; the published
microsoft/bitnet-b1.58-2B-4T is one) load their projections straight into TernaryLinear
layers, never through a float weight. What transformers 5.23 stores and computes
(integrations/bitnet.py):

- Packing (pack_weights / unpack_weights): a ternary weight [N, K] is stored as uint8
  [N / 4, K]: the code w + 1 in {0, 1, 2} of row i * N/4 + r sits in byte [r, k] at bits
  2i .. 2i+1 (four row blocks, not four neighbouring rows). Code 3 would unpack to 2, which
  no ternary weight is: refused here.
- weight_scale: one number a layer (shape [1]), whose meaning depends on linear_class.
  "bitlinear" (BitLinear): y = (int8(x) @ W^T) / (weight_scale * x_scale'), x_scale' = 127 /
  absmax(x): the weight is W / weight_scale. "autobitlinear" with quantization_mode
  "offline" (AutoBitLinear; the published 2B4T): y = (fake-int8(x) @ W^T) * weight_scale,
  the weight W * weight_scale, where W comes either packed (uint8 [N / 4, K], unpacked on
  load) or unpacked (float [N, K] of -1, 0, 1).
- "autobitlinear" with "online" (the -bf16 master weights): float weights, quantized to
  ternary at every forward (absmean per tensor, as TernaryLinear's quantize_weight_ternary)
  and no weight_scale; they load into TernaryLinear through that quantization.
- Activations: per-token absmax int8, as TernaryLinear's (transformers clamps to
  [-128, 127], accelops to [-127, 127]; round(x * 127 / absmax) never reaches -128).

So the TernaryLinear gets the same ternary codes (repacked into accelops' layout, uint8 to
uint8) and w_scale = 1 / weight_scale ("bitlinear") or weight_scale ("autobitlinear"), and
computes transformers' layer up to fp32 rounding of the scales. Which linear layers are
quantized follows transformers: every projection except those matching
modules_to_not_convert (default: the LM head). use_rms_norm=True (a norm inside each
layer) is refused.
"""

from __future__ import annotations

import json
import os
import re

import torch

from .config import TransformerLMConfig
from .transformer import TransformerLM

__all__ = ["from_hf_bitnet", "config_from_hf_bitnet", "hf_bitnet_name", "read_quantization_config"]

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


_LINEAR_CLASSES = ("bitlinear", "autobitlinear")
_MODES = ("offline", "online")


def read_quantization_config(qc) -> dict | None:
    """A BitNet config's quantization_config (a dict or transformers' BitNetQuantConfig;
    None / empty: none) -> a dict with quant_method, linear_class, quantization_mode and
    modules_to_not_convert, checked: ValueError naming what is not supported."""
    if not qc:
        return None
    if hasattr(qc, "to_dict"):
        qc = qc.to_dict()
    if not isinstance(qc, dict):
        raise ValueError(f"quantization_config must be a dict, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method != "bitnet":
        raise ValueError(
            f"quantization_config: quant_method {method!r} is not supported (only transformers' 'bitnet' "
            "quantizer: packed ternary weights); use a checkpoint of unpacked weights"
        )
    linear_class = qc.get("linear_class", "bitlinear")
    if linear_class not in _LINEAR_CLASSES:
        raise ValueError(
            f"quantization_config: linear_class {linear_class!r} is not supported (supported: {_LINEAR_CLASSES})"
        )
    mode = qc.get("quantization_mode", "offline")
    if mode not in _MODES:
        raise ValueError(f"quantization_config: quantization_mode {mode!r} is not supported (supported: {_MODES})")
    if mode == "online" and linear_class != "autobitlinear":
        raise ValueError("quantization_config: quantization_mode 'online' needs linear_class 'autobitlinear'")
    if qc.get("use_rms_norm"):
        raise ValueError("quantization_config: use_rms_norm=True (an RMSNorm inside every BitLinear) is not supported")
    skip = qc.get("modules_to_not_convert")
    if skip is not None and (not isinstance(skip, (list, tuple)) or not all(isinstance(m, str) for m in skip)):
        raise ValueError(f"quantization_config: modules_to_not_convert must be a list of names, got {skip!r}")
    return {
        "quant_method": method,
        "linear_class": linear_class,
        "quantization_mode": mode,
        "modules_to_not_convert": None if skip is None else list(skip),
    }


def _quantized(module: str, skip: list[str] | None) -> bool:
    """Whether transformers' bitnet quantizer swaps linear `module` (its name, e.g.
    model.layers.0.mlp.up_proj): not when a modules_to_not_convert entry matches it from the
    start up to a name boundary (also as a regular expression) or as a suffix. Without the
    list, transformers skips the LM head (the output embedding, also the last module)."""
    if skip is None:
        skip = ["lm_head"]
    for key in skip:
        if module.endswith(key):
            return False
        try:
            if re.match(rf"(?:{key})(?:(?<=\.)|(?=\.|$))", module):
                return False
        except re.error:
            continue
    return True


def _codes_from_hf(name: str, weight: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """transformers' packed weight uint8 [n / 4, k] -> int8 [n, k] in {-1, 0, 1}: the value of
    row i * n/4 + r is bits 2i .. 2i+1 of byte [r, :] minus 1 (integer ops only)."""
    if n % 4:
        raise ValueError(
            f"{name}: out_features {n} is not a multiple of 4, which transformers' packed layout (4 rows a byte) needs"
        )
    if tuple(weight.shape) != (n // 4, k):
        raise ValueError(
            f"{name} has shape {tuple(weight.shape)}, but a packed ternary weight of this config needs "
            f"{(n // 4, k)} (uint8, 4 rows a byte, for out_features={n}, in_features={k}); "
            "the checkpoint and its config disagree"
        )
    codes = torch.cat([(weight >> (2 * i)) & 3 for i in range(4)])  # [n, k]: block i is rows i*n/4 ..
    if bool((codes == 3).any()):
        raise ValueError(f"{name}: holds the 2-bit code 3, which is no ternary weight (codes 0, 1, 2 are -1, 0, 1)")
    return codes.view(torch.int8) - 1


def _packed_layer(name: str, weight, scale, n: int, k: int, linear_class: str) -> dict:
    """A transformers' quantized linear layer's weight and weight_scale -> TernaryLinear's
    buffers {w_packed, w_scale}."""
    from .. import ops

    if not isinstance(scale, torch.Tensor) or scale.numel() != 1:
        shape = tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise ValueError(f"{name}_scale must hold one number a layer (shape (1,)), got {shape}")
    s = scale.detach().reshape(1).to(torch.float32)
    if not bool(torch.isfinite(s).all()) or float(s) == 0:
        raise ValueError(f"{name}_scale is {float(s)}: a weight scale must be finite and nonzero")
    if weight.dtype == torch.uint8:
        wq = _codes_from_hf(name, weight, n, k)
    elif linear_class == "autobitlinear" and weight.dtype.is_floating_point:
        if tuple(weight.shape) != (n, k):
            raise ValueError(
                f"{name} has shape {tuple(weight.shape)}, but the model of this config needs {(n, k)} "
                f"(or a packed uint8 weight of shape {(n // 4, k)}); the checkpoint and its config disagree"
            )
        wq = weight.to(torch.int8)
        if not bool((wq == weight).all()) or bool((wq.abs() > 1).any()):
            raise ValueError(
                f"{name}: an offline-quantized weight must hold only -1, 0 and 1 (weight_scale carries the scale)"
            )
    else:
        raise ValueError(
            f"{name} is {weight.dtype}; linear_class {linear_class!r} stores packed ternary weights as uint8 "
            f"[out_features / 4, in_features]"
        )
    w_scale = s if linear_class == "autobitlinear" else 1.0 / s  # BitLinear divides by weight_scale
    return {"w_packed": ops.pack_ternary(wq.contiguous()), "w_scale": w_scale}


def config_from_hf_bitnet(hf: dict, **overrides) -> TransformerLMConfig:
    """A TransformerLMConfig from a BitNet config.json (a dict; a transformers BitNetConfig
    works too). overrides replace fields (e.g. max_len, quant)."""
    if hasattr(hf, "to_dict"):
        hf = hf.to_dict()
    if not isinstance(hf, dict):
        raise TypeError(f"config must be a TransformerLMConfig or a BitNet config dict, got {type(hf).__name__}")
    if hf.get("model_type", "bitnet") != "bitnet":
        raise ValueError(f"config: model_type is {hf.get('model_type')!r}, not 'bitnet'")
    read_quantization_config(hf.get("quantization_config"))  # a clear error for what is not read
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


def from_hf_bitnet(path_or_state_dict, config=None, quantization_config=None) -> TransformerLM:
    """A TransformerLM (eval mode, on the CPU) holding a transformers BitNetForCausalLM
    checkpoint: fp32 layers for a plain checkpoint, TernaryLinear projections for one written
    by transformers' bitnet quantizer (see the module docstring).

    path_or_state_dict: a directory written by save_pretrained (config.json and
        model.safetensors, or sharded model-*.safetensors with their index), or a state dict
        of BitNetForCausalLM's names (then config is required).
    config: a TransformerLMConfig (must describe the checkpoint's shapes), a BitNet config
        dict / BitNetConfig, or None (the directory's config.json).
    quantization_config: how a quantized checkpoint's weights are stored (a dict or
        BitNetQuantConfig); None: the BitNet config's own (config.json's).

    Errors: ValueError naming the tensor for a weight of the wrong shape or dtype, a missing
    weight or a name that is not BitNet's, and naming the setting for a quantization
    method / linear class / mode that is not read."""
    hf_config = None
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
        hf_config = config.to_dict() if hasattr(config, "to_dict") else config
        config = config_from_hf_bitnet(config)
    if quantization_config is None and isinstance(hf_config, dict):
        quantization_config = hf_config.get("quantization_config")
    qc = read_quantization_config(quantization_config)

    if qc is None:
        packed = sorted(k for k in state if k.endswith("weight_scale"))
        if packed:
            raise ValueError(
                f"{packed[0]}: the checkpoint holds quantized weights with scales (transformers' bitnet "
                "quantizer), but no quantization_config says how they are stored: pass the checkpoint's "
                "BitNet config (with its quantization_config) or quantization_config="
            )
    elif config.quant is not None:
        raise ValueError(
            f"config.quant must be None for a quantized checkpoint (its projections load as TernaryLinear), "
            f"got {config.quant!r}"
        )
    # fp32 projections: built on the meta device, so nothing is initialised only to be
    # overwritten (2.4e9 weights for 2B4T); other quant modes build normally (their layers
    # may hold state that load_state_dict does not fill) and quantize on load.
    with torch.device("meta" if config.quant is None else "cpu"):
        model = TransformerLM(config)
    ternary = {}  # our module name -> transformers' module name, for the quantized layers
    if qc is not None:
        from ..nn import TernaryLinear

        for name, module in list(model.named_modules()):
            if type(module) is not torch.nn.Linear:
                continue
            hf_module = _hf_name(name + ".weight").removesuffix(".weight")
            if _quantized(hf_module, qc["modules_to_not_convert"]):
                new = TernaryLinear(
                    module.in_features, module.out_features, bias=module.bias is not None, device="meta"
                )
                model.set_submodule(name, new)
                ternary[name] = hf_module
    online = qc is not None and qc["quantization_mode"] == "online"
    expected = {k: v.shape for k, v in model.state_dict().items()}
    ours, unknown = {}, []
    for name, tensor in state.items():
        if name.endswith("rotary_emb.inv_freq"):  # recomputed from rope_theta (older checkpoints saved it)
            continue
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # tied: transformers reads the head from the embedding as well
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, got {type(tensor).__name__}")
        scale = name.endswith(".weight_scale")
        target = hf_bitnet_name(name.removesuffix("_scale") if scale else name)
        module = None if target is None else target.rsplit(".", 1)[0]
        if module in ternary and target.endswith(".weight"):
            if online:  # float weights, quantized as transformers does at every forward
                if scale:
                    unknown.append(name)
                    continue
                layer = model.get_submodule(module)
                _check_shape(name, tensor, target, (layer.out_features, layer.in_features), config)
                ours[target] = tensor.to(torch.float32)
            elif scale:
                weight_name = name.removesuffix("_scale")
                if weight_name not in state:
                    raise ValueError(f"{weight_name} is missing from the checkpoint (it has {name})")
                layer = model.get_submodule(module)
                buffers = _packed_layer(
                    weight_name, state[weight_name], tensor, layer.out_features, layer.in_features, qc["linear_class"]
                )
                ours.update({f"{module}.{k}": v for k, v in buffers.items()})
            elif name.replace(".weight", ".weight_scale") not in state:
                raise ValueError(
                    f"{name.replace('.weight', '.weight_scale')} is missing from the checkpoint: "
                    f"quantization_config ({qc['linear_class']}, {qc['quantization_mode']}) quantizes {ternary[module]}"
                )
            continue
        if scale or target is None or target not in expected:
            unknown.append(name)
            continue
        _check_shape(name, tensor, target, expected[target], config)
        ours[target] = tensor.to(torch.float32)
    if unknown:
        raise ValueError(
            f"{unknown[0]} is not a weight of a BitNet model of this config"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            + f" (n_layers={config.n_layers}, tie_embeddings={config.tie_embeddings}"
            + ("" if qc is None else f", quantization {qc['linear_class']} {qc['quantization_mode']}")
            + ")"
        )
    loaded = set(ours) | {f"{m}.{b}" for m in ternary for b in ("w_packed", "w_scale") if f"{m}.weight" in ours}
    missing = [k for k in expected if k not in loaded]
    if missing:
        module = missing[0].rsplit(".", 1)[0]
        hf_name = ternary[module] + ".weight" if module in ternary else _hf_name(missing[0])
        raise ValueError(
            f"{hf_name} is missing from the checkpoint (the model's {missing[0]})"
            + (f", and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    if config.quant is None:
        model.to_empty(device="cpu")
    model.load_state_dict(ours, strict=True)  # online: TernaryLinear quantizes a float "weight" on load
    return model.eval()


def _check_shape(name, tensor, target, shape, config) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)}, but the model of this config needs "
            f"{tuple(shape)} for {target} (vocab_size={config.vocab_size}, "
            f"dim={config.dim}, n_heads={config.n_heads}, n_kv_heads={config.kv_heads}, "
            f"hidden={config.hidden}); the checkpoint and its config disagree"
        )


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
