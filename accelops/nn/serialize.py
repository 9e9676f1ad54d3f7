"""save(model, directory) / load(model_or_factory, directory): a converted model's round trip.

A converted model's state_dict holds int8/uint8 buffers under layer names that an
unconverted architecture does not have, so a plain state_dict (or Hugging Face's
save_pretrained) cannot rebuild it. save() writes the state as safetensors plus a manifest
of every accelops layer (qualified name, class, constructor arguments); load() takes the
unconverted architecture, rebuilds those layers at their names and loads the state
strictly. The directory holds:

    model.safetensors  the state_dict, each shared (tied) tensor stored once
    accelops.json      {"format": "accelops", "format_version": 1, "accelops_version",
                        "torch_version", "model_class",
                        "weights": {"file", "bytes", "sha256"},
                        "modules": [{"name", "also_at", "class", "kwargs"}, ...],
                        "tied": {alias key: stored key},
                        "buffer_dtypes": {non-persistent buffer: dtype}}

The manifest is written last and names the weights' SHA-256, so a directory whose save was
interrupted (or whose weights changed since) is refused by load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import __version__
from .bitlinear import BitLinear
from .embedding import Bf16Embedding, Bf16Linear, Int8Embedding, TiedHead
from .ffn import FFN, FusedFFN, infer_activation
from .qat import QATLinear
from .quantized_linear import Int8Linear, TernaryLinear

__all__ = ["save", "load", "FORMAT_VERSION", "WEIGHTS_FILE", "MANIFEST_FILE"]

FORMAT = "accelops"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "accelops.json"


# ---------------------------------------------------------------------------- the table
#
# Each accelops layer class -> how to read its constructor arguments from an instance, and
# what kind of module of the unconverted model it may stand in for ("linear": nn.Linear,
# transformers' Conv1D or another accelops linear layer; "ffn": a Llama-style MLP). The
# arguments are read from attributes, so new values (a new FusedFFN quant mode) need no
# change here; a new class needs one row.


def _linear_kwargs(m) -> dict:
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}


@dataclass(frozen=True)
class _Layer:
    kwargs: Callable[[nn.Module], dict]
    replaces: str  # "linear", "ffn" or "embedding"


def _embedding_kwargs(m) -> dict:
    return {
        "num_embeddings": m.num_embeddings,
        "embedding_dim": m.embedding_dim,
        "padding_idx": m.padding_idx,
        "dtype": str(m.dtype).removeprefix("torch."),
    }


_TABLE: dict[type, _Layer] = {
    TernaryLinear: _Layer(lambda m: {**_linear_kwargs(m), "per_channel": m.per_channel}, "linear"),
    Int8Linear: _Layer(_linear_kwargs, "linear"),
    BitLinear: _Layer(lambda m: {**_linear_kwargs(m), "per_channel": m.per_channel}, "linear"),
    QATLinear: _Layer(
        lambda m: {
            **_linear_kwargs(m),
            "activation": m.activation,
            "weight": m.weight_bits,
            "group_size": m.group_size,
        },
        "linear",
    ),
    FusedFFN: _Layer(
        lambda m: {
            "dim": m.dim,
            "hidden": m.hidden,
            "activation": m.activation,
            "bias": m.up_proj.bias is not None,
            "quant": m.quant,
            "per_channel": m.per_channel,
            "qat_weight": m.qat_weight,
            "group_size": m.group_size,
        },
        "ffn",
    ),
    FFN: _Layer(
        lambda m: {"dim": m.dim, "hidden": m.hidden, "activation": m.activation, "bias": m.up_proj.bias is not None},
        "ffn",
    ),
    Int8Embedding: _Layer(_embedding_kwargs, "embedding"),
    Bf16Embedding: _Layer(_embedding_kwargs, "embedding"),
    Bf16Linear: _Layer(_linear_kwargs, "linear"),
    # Built with a placeholder embedding; the tied one (recorded at the embedding's name, and
    # under also_at at "<head>.embedding") is put in its place, so the tie is restored.
    TiedHead: _Layer(
        lambda m: {"in_features": m.in_features, "out_features": m.out_features, "precision": m.precision}, "linear"
    ),
}
_BY_NAME = {cls.__name__: cls for cls in _TABLE}


def _is_conv1d(m: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2): a linear layer whose weight is [in_features, out_features].
    # Matched by name so that accelops does not import transformers.
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")


def _as_linear(m) -> dict | None:
    """The linear shape {in_features, out_features, bias} of a module a linear accelops layer
    can replace, or None when it is not such a module."""
    if isinstance(m, (nn.Linear, TernaryLinear, Int8Linear, Bf16Linear, TiedHead)):
        return _linear_kwargs(m)
    if _is_conv1d(m):
        return {"in_features": m.weight.shape[0], "out_features": m.weight.shape[1], "bias": m.bias is not None}
    return None


def _as_ffn(m) -> dict | None:
    """{dim, hidden, activation, bias} of a Llama-style MLP (up_proj / down_proj, gate_proj
    when gated), or None when `m` is not one."""
    up, down = _as_linear(getattr(m, "up_proj", None)), _as_linear(getattr(m, "down_proj", None))
    if up is None or down is None:
        return None
    activation = m.activation if isinstance(m, (FFN, FusedFFN)) else infer_activation(m)
    return {
        "dim": up["in_features"],
        "hidden": up["out_features"],
        "activation": activation if activation is not None else f"unknown (act_fn={getattr(m, 'act_fn', None)!r})",
        "bias": up["bias"],
    }


def _as_embedding(m) -> dict | None:
    if isinstance(m, (nn.Embedding, Int8Embedding, Bf16Embedding)):
        return {"num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim}
    return None


_SHAPE_OF = {
    "linear": (_as_linear, "nn.Linear, transformers Conv1D or an accelops linear layer"),
    "embedding": (_as_embedding, "nn.Embedding or an accelops embedding"),
    "ffn": (_as_ffn, "a Llama-style MLP (up_proj, down_proj, gate_proj when gated), FFN or FusedFFN"),
}


# ---------------------------------------------------------------------------- save


def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write `model` (converted by accelops.convert, or built from accelops layers) to
    `directory`: model.safetensors (its state_dict, tied tensors once) and accelops.json
    (the accelops layers and their constructor arguments, versions, the weights' SHA-256).

    Atomic: both files are written under temporary names and fsynced, then renamed over the
    old ones, the manifest last. A failure before the renames leaves the directory as it
    was; a crash between them leaves a manifest whose checksum does not match the weights,
    which load() refuses. Other files in `directory` (a tokenizer, config.json) are left
    alone. Returns the directory's Path."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    directory = Path(directory)
    modules = _module_records(model)
    state = model.state_dict()
    tensors, tied = _unique_tensors(state)
    # Non-persistent buffers (rotary frequencies) are not state: the model recomputes them.
    # But model.to(torch.bfloat16) casts them, which changes the outputs, so their dtypes
    # are recorded and load casts the recomputed ones alike.
    buffer_dtypes = {
        name: str(b.dtype).removeprefix("torch.")
        for name, b in model.named_buffers(remove_duplicate=False)
        if name not in state
    }
    directory.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}.{secrets.token_hex(4)}.tmp"  # unique per call: concurrent saves do not collide
    tmp_weights = directory / f".{WEIGHTS_FILE}.{tag}"
    tmp_manifest = directory / f".{MANIFEST_FILE}.{tag}"
    try:
        save_file(tensors, tmp_weights, metadata={"format": "pt"})
        size, sha256 = _fsync_and_hash(tmp_weights)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "accelops_version": __version__,
            "torch_version": torch.__version__,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "weights": {"file": WEIGHTS_FILE, "bytes": size, "sha256": sha256},
            "modules": modules,
            "tied": tied,
            "buffer_dtypes": buffer_dtypes,
        }
        with open(tmp_manifest, "x", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        # The commit: weights first, manifest last. Until the manifest is renamed the old
        # manifest (if any) names the old weights' checksum, so a half-done save is refused.
        os.replace(tmp_weights, directory / WEIGHTS_FILE)
        os.replace(tmp_manifest, directory / MANIFEST_FILE)
        _fsync_dir(directory)
    finally:
        for tmp in (tmp_weights, tmp_manifest):
            tmp.unlink(missing_ok=True)
    return directory


def _module_records(model: nn.Module) -> list[dict]:
    """One record per accelops layer object, parents before children; a layer reachable
    under several names (shared) is recorded once, with its other names in also_at."""
    if type(model) in _TABLE:
        raise ValueError(
            f"model is itself a {type(model).__name__}: save the module that holds it "
            "(nn.Sequential(layer)), so load can put a rebuilt layer in its place"
        )
    records: dict[int, dict] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        cls = type(m)
        if cls not in _TABLE:
            if isinstance(m, tuple(_TABLE)):
                raise ValueError(
                    f"{name}: {cls.__qualname__} subclasses an accelops layer but is not one; save "
                    "cannot record how to rebuild it"
                )
            continue
        if id(m) in records:
            records[id(m)]["also_at"].append(name)
            continue
        kwargs = _TABLE[cls].kwargs(m)
        try:
            json.dumps(kwargs)
        except TypeError as e:
            raise ValueError(f"{name}: {cls.__name__}'s constructor arguments {kwargs!r} are not JSON: {e}") from None
        records[id(m)] = {"name": name, "also_at": [], "class": cls.__name__, "kwargs": kwargs}
    return list(records.values())


def _unique_tensors(state: dict) -> tuple[dict, dict]:
    """-> (tensors to store, {alias key: stored key}). safetensors refuses tensors sharing
    memory, so a tensor reachable under several keys (tied embeddings, a shared layer) is
    stored once under its first key and the others recorded as aliases."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(
                f"state_dict entry {key!r} is a {type(t).__name__}, not a tensor: safetensors stores "
                "tensors only (extra state is not supported)"
            )
        if t.device.type == "meta":
            raise ValueError(f"state_dict entry {key!r} is on the meta device: it holds no values to save")
        if t.numel():  # empty tensors have no memory to share
            ident = (
                t.device,
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                tuple(t.shape),
                tuple(t.stride()),
                t.dtype,
            )
            if ident in first:
                tied[key] = first[ident]
                continue
            first[ident] = key
        tensors[key] = t
    # Tensors that overlap in memory without being the same view (slices of one buffer) are
    # stored as copies: the values survive, that particular sharing does not.
    by_storage: dict[tuple, list[str]] = {}
    for key, t in tensors.items():
        if t.numel():
            by_storage.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(key)
    for keys in by_storage.values():
        for key in keys[1:]:
            tensors[key] = tensors[key].clone()
    return {k: t.detach().contiguous() for k, t in tensors.items()}, tied


def _fsync_and_hash(path: Path) -> tuple[int, str]:
    """Flush `path` to disk, then hash what is there (what load will check)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return _hash_file(path)


def _fsync_dir(directory: Path) -> None:
    # Makes the renames durable; directories cannot be opened for fsync on Windows.
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- load


def load(
    model_or_factory: nn.Module | Callable[[], nn.Module],
    directory: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Rebuild a model written by save(): `model_or_factory` is the unconverted architecture,
    an nn.Module or a zero-argument callable returning one (e.g. `lambda:
    LlamaForCausalLM(config)`). Each accelops layer of the manifest is built on the meta
    device at its qualified name(s), the state is loaded strictly (assigning the file's
    tensors, so nothing is initialised twice and the file's dtypes are kept), ties are
    restored, and the model is returned (the same object when a module was passed).

    A factory is called with parameters created on the meta device (buffers are built for
    real: non-persistent ones such as rotary frequencies are not in the file); if that
    fails it is called plainly. `device`: where the tensors go (default: an instance's
    device, else CPU).

    Raises FileNotFoundError for a missing directory, manifest or weights file, and
    ValueError for a corrupt or truncated file, a checksum mismatch, an unknown format
    version, or a model that does not match the file (naming the layer and what differs);
    a module passed in is left unchanged by these checks."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    model = None
    if isinstance(model_or_factory, nn.Module):
        model = model_or_factory
        if device is None:
            device = next((t.device for t in _tensors(model) if t.device.type != "meta"), "cpu")
    elif not callable(model_or_factory):
        raise TypeError(
            "model_or_factory must be an nn.Module or a zero-argument callable returning one, got "
            f"{type(model_or_factory).__name__}"
        )
    device = torch.device("cpu" if device is None else device)
    manifest = _read_manifest(manifest_path)
    weights_path = directory / manifest["weights"]["file"]
    tensors = _read_weights(weights_path, manifest["weights"], manifest_path, device)
    if model is None:  # built only once the file is known to be good
        model = _build(model_or_factory)

    undo = _rebuild_modules(model, manifest["modules"], manifest_path)
    try:
        state = _tied_state(model, tensors, manifest["tied"], manifest_path, weights_path)
    except BaseException:
        for parent, attr, old in reversed(undo):
            setattr(parent, attr, old)
        raise
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # the checks above should have caught this; say which file it was
        raise ValueError(f"{directory}: the state does not load into the model: {e}") from None
    _cast_buffers(model, manifest["buffer_dtypes"], state)
    left = [name for name, t in _named_tensors(model) if t.device.type == "meta"]
    if left:
        raise ValueError(
            f"{directory}: after loading, {', '.join(left[:8])} still hold no values (meta device): "
            "they are neither in the file nor built by the model"
        )
    if any(t.device != device for t in _tensors(model)):
        model.to(device)
    return model


def _read_manifest(path: Path) -> dict:
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: no such directory")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; {path.parent} was not written by accelops.save, or a save into a "
            "new directory was interrupted"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a valid accelops manifest (corrupt JSON: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f'{path}: not an accelops manifest (no "format": "{FORMAT}")')
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: unknown format version {version!r} (written by accelops "
            f"{manifest.get('accelops_version', '?')}); this accelops reads version {FORMAT_VERSION}"
        )
    weights, modules = manifest.get("weights"), manifest.get("modules")
    tied, buffer_dtypes = manifest.get("tied"), manifest.get("buffer_dtypes")
    ok = (
        isinstance(weights, dict)
        and weights.get("file") == WEIGHTS_FILE
        and isinstance(weights.get("bytes"), int)
        and isinstance(weights.get("sha256"), str)
        and isinstance(modules, list)
        and isinstance(tied, dict)
        and isinstance(buffer_dtypes, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items())
        and all(
            isinstance(k, str) and isinstance(getattr(torch, str(v), None), torch.dtype)
            for k, v in buffer_dtypes.items()
        )
    )
    for rec in modules if ok else ():
        ok = (
            isinstance(rec, dict)
            and isinstance(rec.get("name"), str)
            and isinstance(rec.get("class"), str)
            and isinstance(rec.get("kwargs"), dict)
            and isinstance(rec.get("also_at"), list)
        )
        if not ok:
            break
        if rec["class"] not in _BY_NAME:
            raise ValueError(
                f"{path}: layer {rec['name']!r} is a {rec['class']}, which this accelops cannot "
                f"rebuild (it knows {', '.join(_BY_NAME)})"
            )
    if not ok:
        raise ValueError(
            f"{path}: malformed manifest (weights, modules, tied or buffer_dtypes missing or of the wrong type)"
        )
    return manifest


def _read_weights(path: Path, record: dict, manifest_path: Path, device) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (named by {manifest_path})")
    size, sha256 = _hash_file(path)
    if size != record["bytes"]:
        raise ValueError(
            f"{path}: {size} bytes, {manifest_path} records {record['bytes']}: the file is truncated or "
            "was replaced (an interrupted save, or a copy that did not finish)"
        )
    if sha256 != record["sha256"]:
        raise ValueError(
            f"{path}: SHA-256 {sha256} does not match {record['sha256']} in {manifest_path}: the file "
            "is corrupt or was changed after saving (or a save was interrupted)"
        )
    try:
        return load_file(path, device=str(device))
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError, ValueError)
        raise ValueError(f"{path}: cannot be read as safetensors: {e}") from None


def _hash_file(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


@contextlib.contextmanager
def _parameters_on_meta():
    """While active, every Parameter a module registers is moved to the meta device (no
    memory, initialisation a no-op); buffers are left alone, since the non-persistent ones
    (rotary frequencies, masks) are not in the file and must be computed. The patch is
    process-wide while the factory runs (as accelerate's init_empty_weights)."""
    register = nn.Module.register_parameter

    def register_on_meta(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _build(factory: Callable[[], nn.Module]) -> nn.Module:
    try:
        with _parameters_on_meta():
            model = factory()
    except Exception:
        # A constructor that reads its parameters' values (meta tensors have none) cannot
        # be built this way; build it plainly: it is initialised, then overwritten.
        model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"the factory must return an nn.Module, got {type(model).__name__}")
    return model


def _tensors(model: nn.Module):
    yield from model.parameters()
    yield from model.buffers()


def _named_tensors(model: nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()


def _rebuild_modules(model: nn.Module, records: list[dict], manifest_path: Path) -> list:
    """Put a meta-device rebuild of each manifest layer at its names, parents first (a
    child's record then replaces the child its rebuilt parent made). All checks happen
    before the first swap; returns [(parent, attribute, old module)] to undo the swaps."""
    planned: dict[str, nn.Module] = {}  # qualified name -> new module

    def lookup(name: str) -> nn.Module | None:
        # The module at `name` once the swaps planned so far are made.
        m = model
        path = ""
        for part in name.split(".") if name else ():
            path = f"{path}.{part}" if path else part
            if path in planned:
                m = planned[path]
            else:
                m = m._modules.get(part) if isinstance(m, nn.Module) else None
            if m is None:
                return None
        return m

    for rec in sorted(records, key=lambda r: r["name"].count(".")):
        cls = _BY_NAME[rec["class"]]
        kwargs = rec["kwargs"]
        try:
            new = cls(**kwargs, device="meta")
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"{manifest_path}: layer {rec['name']!r}: {cls.__name__}(**{kwargs!r}) fails: {e}"
            ) from None
        shape_of, what = _SHAPE_OF[_TABLE[cls].replaces]
        saved = shape_of(new)
        for name in [rec["name"], *rec["also_at"]]:
            if not name:
                raise ValueError(f"{manifest_path}: the root module cannot be a {cls.__name__}")
            old = lookup(name)
            if old is None:
                raise ValueError(
                    f"layer {name!r}: {manifest_path} has a {cls.__name__} there, the model has no module "
                    "at that name (another architecture?)"
                )
            have = shape_of(old)
            if have is None:
                raise ValueError(
                    f"layer {name!r}: {manifest_path} has a {cls.__name__} there, the model has a "
                    f"{type(old).__name__}, which a {cls.__name__} cannot replace (it replaces {what})"
                )
            for key, value in saved.items():
                if have[key] != value:
                    raise ValueError(
                        f"layer {name!r}: the model's {type(old).__name__} expects {key} {have[key]!r}, "
                        f"the file has {value!r} ({cls.__name__} in {manifest_path})"
                    )
            new.train(old.training)
            planned[name] = new

    covered = set(planned)
    # After the swaps, every accelops layer must come from the manifest: one the model
    # builds itself where the file saved a plain module means the model's mode differs.
    for name, m in _planned_modules(model, planned):
        if type(m) in _TABLE and name not in covered:
            raise ValueError(
                f"layer {name!r}: the model has a {type(m).__name__}, {manifest_path} records no accelops "
                "layer there (saved as a plain module): the model was built in another mode than the "
                "saved one"
            )

    undo = []
    for name, new in sorted(planned.items(), key=lambda kv: kv[0].count(".")):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        undo.append((parent, attr, parent._modules[attr]))
        setattr(parent, attr, new)
    return undo


def _planned_modules(model: nn.Module, planned: dict[str, nn.Module]):
    """named_modules (all names, shared modules under each) of the model as it will be."""

    def walk(m: nn.Module, prefix: str):
        yield prefix, m
        for part, child in m._modules.items():
            name = f"{prefix}.{part}" if prefix else part
            child = planned.get(name, child)
            if child is not None:
                yield from walk(child, name)

    yield from walk(model, "")


def _cast_buffers(model: nn.Module, buffer_dtypes: dict, state: dict) -> None:
    """Give the model's non-persistent buffers the dtypes they had when saved. One the model
    does not have (another version of its code) is skipped: it is not state."""
    for name, dtype in buffer_dtypes.items():
        module_name, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue
        buf = module._buffers.get(attr)
        dtype = getattr(torch, dtype)
        if name not in state and buf is not None and buf.dtype != dtype:
            module._buffers[attr] = buf.to(dtype)


def _tied_state(model: nn.Module, tensors: dict, tied: dict, manifest_path: Path, weights: Path) -> dict:
    """The state to load with assign=True, checked against the model: every key present,
    none extra, shapes equal. A tied group gets one Parameter object under all its keys,
    so assigning it restores the tie."""
    expected = model.state_dict(keep_vars=True)
    for alias, key in tied.items():
        if key not in tensors or alias in tensors:
            raise ValueError(
                f"{manifest_path}: tied key {alias!r} -> {key!r} does not fit {weights}, which holds "
                f"{'both' if alias in tensors else 'no ' + repr(key)}"
            )
    file_keys = set(tensors) | set(tied)
    missing = [k for k in expected if k not in file_keys]
    unexpected = [k for k in tensors if k not in expected] + [k for k in tied if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"the model has {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} "
                f"({len(missing)} in all), which the file lacks"
            )
        if unexpected:
            parts.append(
                f"the file has {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''} "
                f"({len(unexpected)} in all), which the model lacks"
            )
        raise ValueError(f"{weights} does not match the model: {'; '.join(parts)}")
    state = {}
    made: dict[str, torch.Tensor] = {}  # stored key -> the object put under it and its aliases
    for key in expected:
        stored = tied.get(key, key)
        value = tensors[stored]
        own = expected[key]
        if tuple(value.shape) != tuple(own.shape):
            raise ValueError(f"{key}: the model expects shape {tuple(own.shape)}, {weights} has {tuple(value.shape)}")
        if value.dtype.is_floating_point != own.dtype.is_floating_point:
            raise ValueError(f"{key}: the model expects a {own.dtype} tensor, {weights} has {value.dtype}")
        if isinstance(own, nn.Parameter):
            if stored not in made or not isinstance(made[stored], nn.Parameter):
                made[stored] = nn.Parameter(value, requires_grad=own.requires_grad)
            state[key] = made[stored]
        else:
            made.setdefault(stored, value)
            state[key] = made[stored].detach() if isinstance(made[stored], nn.Parameter) else made[stored]
    return state
