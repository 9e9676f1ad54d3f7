"""from_hf_bitnet on checkpoints of transformers' bitnet quantizer (quantization_config, as the
published BitNet b1.58 2B4T): random checkpoints packed and written by transformers itself
(no downloads) load straight into TernaryLinear layers whose ternary codes equal
transformers' own unpacking, and whose logits equal transformers' model on the same
checkpoint; unknown methods, classes, modes, shapes and codes are refused by name."""

import json

import pytest
import torch

from accelops import ops
from accelops.models import TransformerLM
from accelops.models.hf import _quantized, config_from_hf_bitnet, read_quantization_config
from accelops.nn import TernaryLinear

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers.integrations import bitnet as hf_bitnet_int  # noqa: E402
from transformers.quantizers.quantizer_bitnet import BitNetHfQuantizer  # noqa: E402

V = 61
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True)
def _eager_transformers(monkeypatch):
    # from_pretrained of a bitnet checkpoint asks for accelerate, which only its device-map
    # handling needs (not installed here); transformers' unpacking and activation
    # quantization are torch.compile'd: run eagerly (the same code; 1 s instead of 40 s a
    # linear class, and the compiled forms gave the same logits when tried)
    monkeypatch.setattr(BitNetHfQuantizer, "validate_environment", lambda *a, **k: None)
    with torch.compiler.set_stance("force_eager"):
        yield


def fp_model(tie=False, **kw):
    cfg = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tie,
    )
    cfg.update(kw)
    torch.manual_seed(0)
    model = transformers.BitNetForCausalLM(transformers.BitNetConfig(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    return model


def write_quantized(path, linear_class="bitlinear", mode="offline", packed=True, skip=None, tie=False, **kw):
    """A random BitNet checkpoint as transformers' quantizer stores it: its own
    replace_with_bitnet_linear layers, weights ternarized (absmean) and, for BitLinear,
    packed with its own pack_weights, written by save_pretrained. An AutoBitLinear saves
    its weight unpacked; packed=True repacks it with pack_weights (the published 2B4T form)."""
    fp = fp_model(tie=tie, **kw)
    qc = transformers.BitNetQuantConfig(linear_class=linear_class, quantization_mode=mode, modules_to_not_convert=skip)
    names = {n for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    names = {n for n in names if not skip or not any(n.endswith(s) for s in skip)}
    state = {}
    for name, t in fp.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in names and name.endswith(".weight") and mode == "offline":
            s = t.abs().mean().clamp(min=1e-5)
            tern = (t / s).round().clamp(-1, 1)
            if linear_class == "bitlinear":
                state[name] = hf_bitnet_int.pack_weights(tern.clone())
                state[module + ".weight_scale"] = (1 / s).reshape(1)
            else:
                state[name] = tern
                state[module + ".weight_scale"] = s.reshape(1)
        else:
            state[name] = t
    q = transformers.BitNetForCausalLM(fp.config)
    hf_bitnet_int.replace_with_bitnet_linear(q, modules_to_not_convert=skip or ["lm_head"], quantization_config=qc)
    q.load_state_dict(state, strict=False, assign=True)
    if tie:
        q.tie_weights()
    q.config.quantization_config = qc
    q.save_pretrained(path)
    if linear_class == "autobitlinear" and mode == "offline" and packed:
        sd = load_file(str(path / "model.safetensors"))
        for k in [k for k in sd if k + "_scale" in sd]:
            sd[k] = hf_bitnet_int.pack_weights(sd[k].clone())
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return str(path)


KINDS = {
    "bitlinear": dict(linear_class="bitlinear"),
    "bitlinear-bias-tied": dict(linear_class="bitlinear", attention_bias=True, tie=True),
    "autobitlinear-packed": dict(linear_class="autobitlinear"),
    "autobitlinear-unpacked": dict(linear_class="autobitlinear", packed=False),
    "autobitlinear-online": dict(linear_class="autobitlinear", mode="online"),
    "bitlinear-skip-down": dict(linear_class="bitlinear", skip=["down_proj", "lm_head"]),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    with torch.compiler.set_stance("force_eager"):
        return {k: write_quantized(tmp_path_factory.mktemp(k), **kw) for k, kw in KINDS.items()}


def _hf_module(hf, ours_name):
    i, rest = ours_name.split(".", 2)[1:]
    return hf.get_submodule(f"model.layers.{i}." + rest.replace("attn.", "self_attn.").replace("ffn.", "mlp."))


@pytest.mark.parametrize(
    "kind",
    [k if k in ("bitlinear", "autobitlinear-packed") else pytest.param(k, marks=pytest.mark.slow) for k in KINDS],
)
def test_layers_and_logits_equal_transformers_on_its_packed_checkpoint(checkpoints, kind):
    path = checkpoints[kind]
    hf = transformers.BitNetForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = TransformerLM.from_hf_bitnet(path)
    skip = KINDS[kind].get("skip")
    g = torch.Generator().manual_seed(0)
    n_ternary = 0
    for i, block in enumerate(model.blocks):
        for proj in PROJ:
            parent = block.attn if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else block.ffn
            layer = getattr(parent, proj)
            want = torch.nn.Linear if skip and proj in skip else TernaryLinear
            assert type(layer) is want, (i, proj, type(layer))
            if want is TernaryLinear:
                # integer inputs whose absmax is 127 quantize to themselves in both
                # implementations, so the layers must agree up to the scales' fp32 rounding
                x = torch.randint(-127, 128, (5, layer.in_features), generator=g).float()
                x[:, 0] = 127.0
                with torch.no_grad():
                    ref = _hf_module(hf, f"blocks.{i}.{'attn' if parent is block.attn else 'ffn'}.{proj}")(x)
                torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-4)
                n_ternary += 1
    assert n_ternary == 2 * (len(PROJ) - (1 if skip else 0))
    assert model.lm_head is None or type(model.lm_head) is torch.nn.Linear  # the head stays as stored
    tokens = torch.randint(0, V, (3, 24), generator=g)
    with torch.no_grad():
        ref = hf(tokens).logits
        out = model(tokens)
    assert ref.abs().max() > 1.0
    # Whole model: two float implementations of the same quantized network. Where an
    # activation lands within an ulp of a rounding boundary of its int8 code the two can round
    # it apart (transformers scales by 127 * (1 / absmax), accelops by 127 / absmax), which
    # moves that token's later logits a little: most rows equal, every row close.
    rows = (out - ref).abs().amax(dim=-1) <= 1e-4 + 1e-4 * ref.abs().amax(dim=-1)
    assert rows.float().mean() >= 0.9, rows
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    assert cos.min() > 0.999, cos.min()


@pytest.mark.parametrize("kind", ["bitlinear", "autobitlinear-packed", "autobitlinear-unpacked"])
def test_codes_and_scales_equal_transformers_unpacking(checkpoints, kind):
    path = checkpoints[kind]
    state = load_file(path + "/model.safetensors")
    model = TransformerLM.from_hf_bitnet(path)
    n_checked = 0
    for name, module in model.named_modules():
        if type(module) is not TernaryLinear:
            continue
        i, rest = name.split(".", 2)[1:]
        hf_name = f"model.layers.{i}." + rest.replace("attn.", "self_attn.").replace("ffn.", "mlp.")
        w, s = state[hf_name + ".weight"], state[hf_name + ".weight_scale"]
        # transformers' own unpacking (the code its BitLinear / BitNetDeserialize run)
        codes = hf_bitnet_int.unpack_weights(w, dtype=torch.float32) if w.dtype == torch.uint8 else w
        assert torch.equal(ops.unpack_ternary(module.w_packed, module.in_features).float(), codes)
        if kind == "bitlinear":
            assert torch.equal(module.w_scale, 1.0 / s.float())  # BitLinear divides by weight_scale
        else:
            assert torch.equal(module.w_scale, s.float())  # AutoBitLinear multiplies
        n_checked += 1
    assert n_checked == 2 * len(PROJ)


def test_loaded_model_generates_its_own_argmax(checkpoints):
    model = TransformerLM.from_hf_bitnet(checkpoints["autobitlinear-packed"])
    prompt = torch.randint(0, V, (6,), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompt, 8, temperature=0)[0].tolist()
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq[None])[0, -1].argmax()[None]])
    assert out == seq[6:].tolist()


def test_which_modules_transformers_quantizes():
    assert _quantized("model.layers.0.mlp.up_proj", None)
    assert not _quantized("lm_head", None)  # default: the LM head stays
    assert _quantized("lm_head", ["down_proj"])  # an explicit list replaces the default
    assert not _quantized("model.layers.3.mlp.down_proj", ["down_proj"])  # suffix
    assert not _quantized("model.layers.1.self_attn.q_proj", ["model.layers.1"])  # prefix at a boundary
    assert _quantized("model.layers.11.self_attn.q_proj", ["model.layers.1"])
    assert not _quantized("model.layers.11.self_attn.q_proj", [r"model\.layers\.1\d"])  # a regex


@pytest.mark.parametrize(
    "qc, match",
    [
        ({"quant_method": "gptq"}, "quant_method 'gptq' is not supported"),
        ({"quant_method": "bitnet", "linear_class": "fancy"}, "linear_class 'fancy' is not supported"),
        ({"quant_method": "bitnet", "quantization_mode": "lazy"}, "quantization_mode 'lazy' is not supported"),
        ({"quant_method": "bitnet", "quantization_mode": "online"}, "'online' needs linear_class 'autobitlinear'"),
        ({"quant_method": "bitnet", "use_rms_norm": True}, "use_rms_norm=True"),
        ({"quant_method": "bitnet", "modules_to_not_convert": "lm_head"}, "modules_to_not_convert must be a list"),
        ("bitnet", "quantization_config must be a dict"),
    ],
)
def test_unsupported_quantization_configs_are_named(qc, match):
    with pytest.raises(ValueError, match=match):
        read_quantization_config(qc)
    cfg = fp_model().config.to_dict()
    with pytest.raises(ValueError, match=match):
        config_from_hf_bitnet(dict(cfg, quantization_config=qc))


def test_config_reads_the_quantization_config():
    qc = transformers.BitNetQuantConfig(linear_class="autobitlinear")
    assert read_quantization_config(qc)["linear_class"] == "autobitlinear"
    assert read_quantization_config({"quant_method": "bitnet"}) == {
        "quant_method": "bitnet",
        "linear_class": "bitlinear",
        "quantization_mode": "offline",
        "modules_to_not_convert": None,
    }
    assert read_quantization_config(None) is None and read_quantization_config({}) is None


def _state_and_config(path):
    with open(path + "/config.json") as f:
        return load_file(path + "/model.safetensors"), json.load(f)


Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda sd: sd.update({Q + ".weight": sd[Q + ".weight"][:4]}),
            r"q_proj\.weight has shape \(4, 32\).*\(8, 32\)",
        ),
        (lambda sd: sd.update({Q + ".weight": sd[Q + ".weight"] | 3}), r"q_proj\.weight: holds the 2-bit code 3"),
        (lambda sd: sd.update({Q + ".weight": sd[Q + ".weight"].float()}), r"q_proj\.weight is torch\.float32"),
        (lambda sd: sd.pop(Q + ".weight_scale"), r"q_proj\.weight_scale is missing"),
        (lambda sd: sd.pop(Q + ".weight"), r"q_proj\.weight is missing from the checkpoint \(it has"),
        (lambda sd: sd.update({Q + ".weight_scale": torch.ones(2)}), r"q_proj\.weight_scale must hold one number"),
        (lambda sd: sd.update({Q + ".weight_scale": torch.zeros(1)}), r"q_proj\.weight_scale is 0\.0"),
        (
            lambda sd: sd.update({"lm_head.weight_scale": torch.ones(1)}),
            r"lm_head\.weight_scale is not a weight of a BitNet model.*quantization bitlinear offline",
        ),
    ],
)
def test_bad_packed_tensors_are_named(checkpoints, edit, match):
    sd, cfg = _state_and_config(checkpoints["bitlinear"])
    edit(sd)
    with pytest.raises(ValueError, match=match):
        TransformerLM.from_hf_bitnet(sd, cfg)


def test_offline_float_weights_must_be_ternary(checkpoints):
    sd, cfg = _state_and_config(checkpoints["autobitlinear-unpacked"])
    sd[Q + ".weight"] = sd[Q + ".weight"] * 0.5
    with pytest.raises(ValueError, match=r"q_proj\.weight: an offline-quantized weight must hold only -1, 0 and 1"):
        TransformerLM.from_hf_bitnet(sd, cfg)
    sd[Q + ".weight"] = torch.zeros(32, 16)
    with pytest.raises(ValueError, match=r"q_proj\.weight has shape \(32, 16\), but .* needs \(32, 32\)"):
        TransformerLM.from_hf_bitnet(sd, cfg)


def test_packed_weights_need_their_quantization_config(checkpoints):
    sd, cfg = _state_and_config(checkpoints["bitlinear"])
    del cfg["quantization_config"]
    with pytest.raises(ValueError, match=r"weight_scale: .*no quantization_config"):
        TransformerLM.from_hf_bitnet(sd, cfg)
    # given separately, it loads
    model = TransformerLM.from_hf_bitnet(sd, cfg, quantization_config={"quant_method": "bitnet"})
    assert type(model.blocks[0].attn.q_proj) is TernaryLinear
    with pytest.raises(ValueError, match="config.quant must be None for a quantized checkpoint"):
        TransformerLM.from_hf_bitnet(
            sd, config_from_hf_bitnet(cfg, quant="int8"), quantization_config={"quant_method": "bitnet"}
        )
