"""accelops.save / accelops.load: converted models round-trip bit for bit (tiny random
transformers models and accelops' TransformerLM), ties survive, mismatches and damaged
directories raise errors naming the layer or file, and an interrupted save never leaves a
directory that load accepts."""

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import accelops
import accelops.nn.serialize as serialize
from accelops.models import TransformerLM, TransformerLMConfig
from accelops.nn import BitLinear, Int8Linear, QATLinear, TernaryLinear

transformers = pytest.importorskip("transformers")

MODES = ["int8", "ternary", "bitlinear", "qat-int8"]
VOCAB = 65


def llama(tie=False, intermediate_size=128, vocab_size=VOCAB):
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
    )
    return lambda: transformers.LlamaForCausalLM(cfg)


def qwen2():
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return lambda: transformers.Qwen2ForCausalLM(cfg)


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    return lambda: transformers.GPT2LMHeadModel(cfg)


def tlm(tie=False, quant=None):
    cfg = TransformerLMConfig(
        vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, max_len=32, tie_embeddings=tie, quant=quant
    )
    return lambda: TransformerLM(cfg)


ARCHS = {"llama": llama, "qwen2": qwen2, "gpt2": gpt2, "transformer_lm": tlm}


def logits(model, tokens):
    with torch.no_grad():
        out = model(tokens)
    return out if isinstance(out, torch.Tensor) else out.logits


def tokens():
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


def converted(factory, mode, **kw):
    torch.manual_seed(0)
    model = factory().eval()
    report = accelops.convert(model, mode, **kw)
    assert report.num_swapped > 0
    return model, report


def snapshot(directory):
    return {p.name: p.read_bytes() for p in Path(directory).iterdir()}


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("how", ["instance", "factory"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_round_trip_is_bit_identical(tmp_path, arch, mode, how):
    factory = ARCHS[arch]()
    model, report = converted(factory, mode)
    if arch == "gpt2" and not any(s.from_type == "Conv1D" for s in report.swapped):
        pytest.skip("this convert() does not swap transformers' Conv1D yet (GPT-2's attention and MLP)")
    x = tokens()
    want = logits(model, x)
    accelops.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accelops.json", "model.safetensors"]

    torch.manual_seed(123)  # a fresh model with other random weights: all must come from the file
    fresh = factory() if how == "instance" else factory
    loaded = accelops.load(fresh, tmp_path).eval()
    if how == "instance":
        assert loaded is fresh
    assert torch.equal(logits(loaded, x), want)

    swapped = {s.fqn: s.to_type for s in report.swapped}
    modules = dict(loaded.named_modules())
    assert {fqn: type(modules[fqn]).__name__ for fqn in swapped} == swapped
    assert not any(t.is_meta for t in loaded.state_dict().values())
    manifest = json.loads((tmp_path / "accelops.json").read_text())
    assert set(swapped) <= {r["name"] for r in manifest["modules"]}


def test_manifest_records_versions_checksum_and_constructor_arguments(tmp_path):
    model, _ = converted(tlm(), "qat-int8", weight="int4", group_size=32)
    accelops.save(model, tmp_path)
    m = json.loads((tmp_path / "accelops.json").read_text())
    assert m["format"] == "accelops" and m["format_version"] == 1
    assert m["accelops_version"] == accelops.__version__ and m["torch_version"] == torch.__version__
    import hashlib

    data = (tmp_path / "model.safetensors").read_bytes()
    assert m["weights"] == {"file": "model.safetensors", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    by_name = {r["name"]: r for r in m["modules"]}
    assert by_name["blocks.0.attn.q_proj"]["class"] == "QATLinear"
    assert by_name["blocks.0.attn.q_proj"]["kwargs"] == {
        "in_features": 64,
        "out_features": 64,
        "bias": False,
        "activation": "per_token",
        "weight": "int4",
        "group_size": 32,
    }
    assert by_name["blocks.1.ffn"]["class"] == "FusedFFN"
    assert by_name["blocks.1.ffn"]["kwargs"] == {
        "dim": 64,
        "hidden": 256,
        "activation": "swiglu",
        "bias": False,
        "quant": "qat-int8",
        "per_channel": False,
        "qat_weight": "int4",
        "group_size": 32,
    }


def test_qat_per_tensor_observer_state_round_trips(tmp_path):
    # The observers' running min/max and the fake-quant scale are state, not constructor
    # arguments: they must come back from the file.
    model, _ = converted(tlm(), "qat-int8", activation="per_tensor", weight="int4", group_size=32)
    model.train()
    model(tokens())  # observe once
    model.eval()
    want = logits(model, tokens())
    accelops.save(model, tmp_path)
    loaded = accelops.load(tlm(), tmp_path).eval()
    assert torch.equal(logits(loaded, tokens()), want)
    q = loaded.blocks[0].attn.q_proj
    assert isinstance(q, QATLinear) and q.activation == "per_tensor" and q.weight_bits == "int4"
    assert torch.equal(q.act_fake_quant.scale, model.blocks[0].attn.q_proj.act_fake_quant.scale)


def test_ternary_per_channel_and_bitlinear_to_ternary(tmp_path):
    model, _ = converted(llama(), "bitlinear", per_channel=True)
    accelops.convert(model, "ternary")  # from BitLinear: keeps per_channel
    want = logits(model, tokens())
    accelops.save(model, tmp_path)
    loaded = accelops.load(llama(), tmp_path).eval()
    assert torch.equal(logits(loaded, tokens()), want)
    q = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q, TernaryLinear) and q.per_channel and q.w_scale.shape == (64,)


def test_transformer_lm_to_int8_round_trips(tmp_path):
    # to_int8() makes FusedFFN(quant="int8") holding Int8Linear layers: parent and children
    # are rebuilt from the manifest, parents first.
    torch.manual_seed(0)
    model = tlm()().eval().to_int8()
    want = logits(model, tokens())
    accelops.save(model, tmp_path)
    loaded = accelops.load(tlm(), tmp_path).eval()
    assert loaded.blocks[0].ffn.quant == "int8" and isinstance(loaded.blocks[0].ffn.up_proj, Int8Linear)
    assert torch.equal(logits(loaded, tokens()), want)


@pytest.mark.parametrize("quant,deploy", [("bitlinear", "ternary"), ("qat-int8", "int8-from-qat")])
def test_transformer_lm_trained_in_a_quant_mode_then_deployed(tmp_path, quant, deploy):
    # The architecture itself holds accelops layers (BitLinear / QATLinear, FFN); the saved
    # model is its inference form; load gets the training architecture.
    torch.manual_seed(0)
    model = tlm(quant=quant)().eval()
    accelops.convert(model, deploy)
    want = logits(model, tokens())
    accelops.save(model, tmp_path)
    loaded = accelops.load(tlm(quant=quant), tmp_path).eval()
    assert type(loaded.blocks[0].attn.q_proj) is type(model.blocks[0].attn.q_proj)
    assert torch.equal(logits(loaded, tokens()), want)


def test_dtypes_come_from_the_file(tmp_path):
    model, _ = converted(llama(), "int8")
    model.to(torch.bfloat16)
    want = logits(model, tokens())
    accelops.save(model, tmp_path)
    loaded = accelops.load(llama(), tmp_path).eval()
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.layers[0].mlp.up_proj.w_scale.dtype == torch.float32  # kept fp32 by Int8Linear
    assert torch.equal(logits(loaded, tokens()), want)


def test_gpt2_conv1d_is_replaced_by_the_saved_layers(tmp_path):
    # Independent of convert(): GPT-2's Conv1D layers (weight [in, out]) swapped by hand for
    # TernaryLinear, as a Conv1D-aware convert does; load maps each Conv1D to its layer.
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = gpt2()().eval()
    for name, m in list(model.named_modules()):
        if isinstance(m, Conv1D):
            linear = nn.Linear(m.weight.shape[0], m.weight.shape[1])
            with torch.no_grad():
                linear.weight.copy_(m.weight.t())
                linear.bias.copy_(m.bias)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, TernaryLinear.from_linear(linear))
    want = logits(model, tokens())
    accelops.save(model, tmp_path)
    loaded = accelops.load(gpt2(), tmp_path).eval()
    assert isinstance(loaded.transformer.h[0].attn.c_attn, TernaryLinear)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # GPT-2's own tie, kept
    assert torch.equal(logits(loaded, tokens()), want)
    with pytest.raises(
        ValueError,
        match=r"layer 'transformer\.h\.0\.attn\.c_attn': the model's Conv1D expects "
        r"in_features 32, the file has 64",
    ):
        accelops.load(
            lambda: transformers.GPT2LMHeadModel(
                transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4)
            ),
            tmp_path,
        )


class _ReadsItsWeights(nn.Module):
    """A constructor that reads its parameters' values: it cannot run on the meta device."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = float(self.lin.weight.detach().norm())

    def forward(self, x):
        return self.lin(x)


def test_factory_that_cannot_run_on_meta_is_built_plainly(tmp_path):
    model = _ReadsItsWeights()
    accelops.convert(model, "int8")
    x = torch.randn(2, 4)
    accelops.save(model, tmp_path)
    assert torch.equal(accelops.load(_ReadsItsWeights, tmp_path)(x), model(x))


# ---------------------------------------------------------------------------- ties and sharing


@pytest.mark.parametrize("how", ["instance", "factory"])
def test_llama_tied_embeddings_survive(tmp_path, how):
    # bitlinear shares the Parameters, so lm_head's weight stays the embedding's.
    model, _ = converted(llama(tie=True), "bitlinear", quantize_output=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    want = logits(model, tokens())
    accelops.save(model, tmp_path)
    manifest = json.loads((tmp_path / "accelops.json").read_text())
    assert manifest["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()

    loaded = accelops.load(llama(tie=True)() if how == "instance" else llama(tie=True), tmp_path).eval()
    assert isinstance(loaded.lm_head, BitLinear)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded, tokens()), want)


def test_llama_tie_with_unquantized_head_survives(tmp_path):
    model, _ = converted(llama(tie=True), "int8", filter=lambda m, name: name != "lm_head")
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    want = logits(model, tokens())
    accelops.save(model, tmp_path)
    loaded = accelops.load(llama(tie=True), tmp_path).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert isinstance(loaded.model.layers[1].mlp.down_proj, Int8Linear)
    assert torch.equal(logits(loaded, tokens()), want)


def test_transformer_lm_tied_embeddings_survive(tmp_path):
    model, _ = converted(tlm(tie=True), "ternary")
    want = logits(model, tokens())
    accelops.save(model, tmp_path)
    loaded = accelops.load(tlm(tie=True), tmp_path).eval()
    assert loaded.lm_head is None
    assert torch.equal(logits(loaded, tokens()), want)


class _Shared(nn.Module):
    """One Linear reachable as .a and .b (a layer applied twice)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = self.a
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.b(self.a(x)))


@pytest.mark.parametrize("mode", ["bitlinear", "int8"])
def test_shared_layer_is_rebuilt_once(tmp_path, mode):
    torch.manual_seed(0)
    model = _Shared()
    accelops.convert(model, mode)
    assert model.a is model.b
    x = torch.randn(3, 16)
    want = model(x)
    accelops.save(model, tmp_path)
    manifest = json.loads((tmp_path / "accelops.json").read_text())
    assert [(r["name"], r["also_at"]) for r in manifest["modules"]] == [("a", ["b"]), ("out", [])]
    loaded = accelops.load(_Shared, tmp_path)
    assert loaded.a is loaded.b
    assert torch.equal(loaded(x), want)


# ---------------------------------------------------------------------------- mismatches


def test_wrong_shape_names_the_layer_and_leaves_the_model_alone(tmp_path):
    model, _ = converted(llama(), "int8")
    accelops.save(model, tmp_path)
    other = llama(intermediate_size=256)()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"layer 'model\.layers\.0\.mlp\.gate_proj': the model's Linear expects "
        r"out_features 256, the file has 128 \(Int8Linear",
    ):
        accelops.load(other, tmp_path)
    assert type(other.model.layers[0].mlp.gate_proj) is nn.Linear  # nothing swapped
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_wrong_bias_names_the_layer(tmp_path):
    model, _ = converted(llama(), "ternary")
    accelops.save(model, tmp_path)
    with pytest.raises(
        ValueError,
        match=r"layer 'model\.layers\.0\.self_attn\.q_proj': the model's Linear expects "
        r"bias True, the file has False",
    ):
        accelops.load(qwen2(), tmp_path)  # Qwen2 has q/k/v biases


def test_wrong_shape_of_a_plain_tensor_names_the_key(tmp_path):
    model, _ = converted(llama(), "int8", filter=lambda m, name: name != "lm_head")
    accelops.save(model, tmp_path)
    with pytest.raises(
        ValueError,
        match=r"model\.embed_tokens\.weight: the model expects shape \(96, 64\), "
        r".*model\.safetensors has \(65, 64\)",
    ):
        accelops.load(llama(vocab_size=96), tmp_path)


def test_wrong_mode_names_the_layer(tmp_path):
    # Saved from a float TransformerLM; the model to load into builds Int8Linear layers.
    torch.manual_seed(0)
    accelops.save(tlm()(), tmp_path)
    with pytest.raises(
        ValueError,
        match=r"layer 'blocks\.0\.attn\.q_proj': the model has a Int8Linear, .*accelops"
        r"\.json records no accelops layer there .*another mode",
    ):
        accelops.load(tlm(quant="int8"), tmp_path)


def test_layer_that_cannot_be_mapped(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    accelops.convert(model, "ternary")
    accelops.save(model, tmp_path)
    with pytest.raises(
        ValueError,
        match=r"layer '2': .* has a TernaryLinear there, the model has a Conv1d, which a "
        r"TernaryLinear cannot replace",
    ):
        accelops.load(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Conv1d(16, 4, 1)), tmp_path)
    with pytest.raises(ValueError, match=r"layer '2': .* the model has no module at that name"):
        accelops.load(nn.Sequential(nn.Linear(8, 16), nn.ReLU()), tmp_path)


def test_missing_and_extra_keys_are_named(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))
    accelops.convert(model, "int8")
    accelops.save(model, tmp_path)
    with pytest.raises(ValueError, match=r"the file has 1\.bias, 1\.weight \(2 in all\), which the model lacks"):
        accelops.load(lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), tmp_path)


# ---------------------------------------------------------------------------- damaged directories


@pytest.fixture
def saved(tmp_path):
    model, _ = converted(tlm(), "int8")
    accelops.save(model, tmp_path)
    return tmp_path


def _rewrite_manifest(directory, **changes):
    path = directory / "accelops.json"
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


def test_missing_manifest(saved):
    (saved / "accelops.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"accelops\.json: missing"):
        accelops.load(tlm(), saved)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        accelops.load(tlm(), saved / "nope")


def test_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors: missing"):
        accelops.load(tlm(), saved)


def test_unknown_format_version(saved):
    _rewrite_manifest(saved, format_version=2)
    with pytest.raises(ValueError, match=r"accelops\.json: unknown format version 2 .*reads version 1"):
        accelops.load(tlm(), saved)


def test_corrupt_manifest(saved):
    (saved / "accelops.json").write_text('{"format": "accelops", ')
    with pytest.raises(ValueError, match=r"accelops\.json: not a valid accelops manifest \(corrupt JSON"):
        accelops.load(tlm(), saved)
    _rewrite_manifest_path = saved / "accelops.json"
    _rewrite_manifest_path.write_text(
        json.dumps(
            {"format": "accelops", "format_version": 1, "weights": {}, "modules": [], "tied": {}, "buffer_dtypes": {}}
        )
    )
    with pytest.raises(ValueError, match="malformed manifest"):
        accelops.load(tlm(), saved)


def test_unknown_layer_class(saved):
    m = json.loads((saved / "accelops.json").read_text())
    m["modules"][0]["class"] = "Int3Linear"
    (saved / "accelops.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"is a Int3Linear, which this accelops cannot rebuild"):
        accelops.load(tlm(), saved)


def test_truncated_weights(saved):
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        ValueError,
        match=r"model\.safetensors: \d+ bytes, .*accelops\.json records \d+: the file is "
        r"truncated",
    ):
        accelops.load(tlm(), saved)


def test_checksum_mismatch(saved):
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one weight byte: still a readable safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors: SHA-256 [0-9a-f]{64} does not match"):
        accelops.load(tlm(), saved)


def test_corrupt_weights_with_matching_checksum(saved):
    # A file that passes the checksum (the manifest re-written for it) but is not safetensors.
    import hashlib

    path = saved / "model.safetensors"
    data = b"\xff" * 8 + path.read_bytes()[8:]  # header length now absurd
    path.write_bytes(data)
    _rewrite_manifest(
        saved, weights={"file": "model.safetensors", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    )
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot be read as safetensors"):
        accelops.load(tlm(), saved)


# ---------------------------------------------------------------------------- atomic writes


def _fail_on_call(n):
    """An os.replace that raises on its n-th call (1-based)."""
    real = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == n:
            raise OSError(f"simulated failure renaming to {dst}")
        return real(src, dst)

    return replace


def test_failed_weights_rename_leaves_the_directory_untouched(saved, monkeypatch):
    old = snapshot(saved)
    want = logits(accelops.load(tlm(), saved).eval(), tokens())
    other, _ = converted(tlm(), "ternary")
    monkeypatch.setattr(os, "replace", _fail_on_call(1))
    with pytest.raises(OSError, match="simulated failure"):
        accelops.save(other, saved)
    monkeypatch.undo()
    assert snapshot(saved) == old  # same files, same bytes, no temporaries left
    assert torch.equal(logits(accelops.load(tlm(), saved).eval(), tokens()), want)


def test_failed_manifest_rename_is_refused_by_load(saved, monkeypatch):
    other, _ = converted(tlm(), "ternary")
    monkeypatch.setattr(os, "replace", _fail_on_call(2))  # new weights in place, old manifest kept
    with pytest.raises(OSError, match="simulated failure"):
        accelops.save(other, saved)
    monkeypatch.undo()
    assert sorted(p.name for p in saved.iterdir()) == ["accelops.json", "model.safetensors"]
    with pytest.raises(ValueError, match=r"model\.safetensors: .* \(an interrupted save"):
        accelops.load(tlm(), saved)


def test_failure_while_writing_weights_leaves_the_directory_untouched(saved, monkeypatch):
    old = snapshot(saved)
    other, _ = converted(tlm(), "ternary")

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)
        raise OSError("simulated failure: disk full")

    monkeypatch.setattr(serialize, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        accelops.save(other, saved)
    assert snapshot(saved) == old


def test_failed_first_save_leaves_no_loadable_directory(tmp_path, monkeypatch):
    model, _ = converted(tlm(), "int8")
    monkeypatch.setattr(os, "replace", _fail_on_call(2))
    with pytest.raises(OSError, match="simulated failure"):
        accelops.save(model, tmp_path / "new")
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match=r"accelops\.json: missing"):
        accelops.load(tlm(), tmp_path / "new")


def test_save_keeps_other_files_and_overwrites_a_previous_save(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    first, _ = converted(tlm(), "int8")
    accelops.save(first, tmp_path)
    second, _ = converted(tlm(), "ternary")
    accelops.save(second, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accelops.json", "model.safetensors", "tokenizer.json"]
    loaded = accelops.load(tlm(), tmp_path).eval()
    assert isinstance(loaded.blocks[0].attn.q_proj, TernaryLinear)
    assert torch.equal(logits(loaded, tokens()), logits(second, tokens()))


# ---------------------------------------------------------------------------- save's refusals


def test_save_refuses_what_it_cannot_record(tmp_path):
    layer = TernaryLinear(8, 4)
    with pytest.raises(ValueError, match="model is itself a TernaryLinear"):
        accelops.save(layer, tmp_path)
    with pytest.raises(ValueError, match=r"'0\.weight' is on the meta device"):
        accelops.save(nn.Sequential(nn.Linear(4, 4, device="meta")), tmp_path)

    class MyInt8(Int8Linear):
        pass

    with pytest.raises(ValueError, match=r"0: .*MyInt8 subclasses an accelops layer"):
        accelops.save(nn.Sequential(MyInt8(4, 4)), tmp_path)
    assert not any(tmp_path.iterdir())
