"""share_parameters(model, pattern, scope, tie_embeddings): cross-layer parameter sharing.

Sharing is by module identity: the shared blocks (or their attention / FFN) are the same
module object at several places of the block list. Everything torch does to modules then
keeps it for free: parameters() / named_parameters() yield a shared tensor once (so an
optimizer and DDP see it once and DDP reduces it once per step, its gradient being the sum
over the uses), .to() and to_empty() replace the tensors of one module, which every place
sees, and state_dict() writes the shared tensor under each of its names, so a checkpoint
loads into an unshared model too. Tying parameter objects instead (b.weight = a.weight)
would not survive to_empty(), which gives each module a new Parameter.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn import BitLinear, ParameterCount, count_parameters

__all__ = [
    "PATTERNS",
    "SCOPES",
    "SharingReport",
    "share_parameters",
    "sharing_groups",
    "retie",
    "share_encoder_decoder",
    "ENCODER_DECODER_PARTS",
]

PATTERNS = ("alternate", "sequential", "sandwich")
SCOPES = ("block", "attention", "ffn")
# Where the block list and each block's parts live: accelops.models first, then common
# layouts (Hugging Face Llama/GPT-2 style), so other models work without arguments.
_BLOCK_LISTS = ("blocks", "layers", "h", "model.layers", "transformer.h")
_PARTS = {"attention": ("attn", "attention", "self_attn"), "ffn": ("ffn", "mlp", "feed_forward")}
_STATE = "_accelops_sharing"  # the record of what was shared, kept on the model for retie()


@dataclass
class SharingReport:
    """What share_parameters did: the groups of blocks now holding one set of weights (each
    group's first block's weights are the ones kept) and the model's sizes before/after."""

    pattern: str
    scope: str
    groups: list[list[int]]
    tied_embeddings: bool
    before: ParameterCount
    after: ParameterCount
    notes: list[str] = field(default_factory=list)

    @property
    def unique_before(self) -> int:
        return self.before.unique_parameters

    @property
    def unique_after(self) -> int:
        return self.after.unique_parameters

    @property
    def bytes_before(self) -> int:
        """fp32 bytes of the unique parameters before sharing."""
        return self.before.fp32_bytes

    @property
    def bytes_after(self) -> int:
        return self.after.fp32_bytes

    def __str__(self) -> str:
        lines = [
            f"share_parameters(pattern={self.pattern!r}, scope={self.scope!r}, tie_embeddings={self.tied_embeddings}): "
            f"groups {self.groups}",
            f"  unique parameters {self.unique_before:,} -> {self.unique_after:,} "
            f"({self.unique_after / max(self.unique_before, 1):.1%})",
            f"  fp32 bytes {self.bytes_before / 2**20:.3f} -> {self.bytes_after / 2**20:.3f} MiB, deployed "
            f"{self.before.deployed_bytes / 2**20:.3f} -> {self.after.deployed_bytes / 2**20:.3f} MiB",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def sharing_groups(pattern, n_blocks: int, interval: int | None = None) -> list[list[int]]:
    """The groups of block indices that share one set of weights, for n_blocks blocks.

    "alternate": two sets used in turn, [[0, 2, 4, ...], [1, 3, 5, ...]].
    "sequential": runs of `interval` consecutive blocks share, [[0 .. interval-1], [interval ..], ...].
    "sandwich": the first and last blocks keep their own, the middle ones share one set.
    A list of lists, e.g. [[0, 6], [1, 7]]: those groups; blocks in no group stay unshared.
    Groups of one block are dropped from the result. Raises if nothing would be shared.
    """
    if not isinstance(n_blocks, numbers.Integral) or isinstance(n_blocks, bool) or n_blocks < 1:
        raise ValueError(f"n_blocks must be a positive int, got {n_blocks!r}")
    if isinstance(pattern, str):
        if pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {PATTERNS} or a list of groups of block indices, got {pattern!r}")
        if pattern == "sequential":
            if not isinstance(interval, numbers.Integral) or isinstance(interval, bool) or interval < 2:
                raise ValueError(
                    f"pattern 'sequential' needs interval=, an int >= 2 (the number of consecutive "
                    f"blocks sharing one set), got interval={interval!r}"
                )
            groups = [list(range(i, min(i + interval, n_blocks))) for i in range(0, n_blocks, interval)]
        elif interval is not None:
            raise ValueError(
                f"interval applies to pattern 'sequential' only, got pattern={pattern!r}, interval={interval!r}"
            )
        elif pattern == "alternate":
            groups = [list(range(0, n_blocks, 2)), list(range(1, n_blocks, 2))]
        else:  # sandwich
            groups = [[0], list(range(1, n_blocks - 1)), [n_blocks - 1]]
    elif isinstance(pattern, (list, tuple)):
        if interval is not None:
            raise ValueError("interval applies to pattern 'sequential' only, not to explicit groups")
        groups, seen = [], {}
        for gi, g in enumerate(pattern):
            if not isinstance(g, (list, tuple)) or not g:
                raise ValueError(f"each group must be a non-empty list of block indices, group {gi} is {g!r}")
            for i in g:
                if not isinstance(i, numbers.Integral) or isinstance(i, bool):
                    raise TypeError(f"block indices must be ints, group {gi} holds {i!r}")
                if not 0 <= i < n_blocks:
                    raise ValueError(
                        f"block index {i} in group {gi} is out of range: the model has "
                        f"{n_blocks} blocks (0 .. {n_blocks - 1})"
                    )
                if i in seen:
                    where = "twice in group" if seen[i] == gi else f"in groups {seen[i]} and"
                    raise ValueError(f"block {i} appears {where} {gi}: a block belongs to one group at most")
                seen[i] = gi
            groups.append([int(i) for i in g])
    else:
        raise TypeError(f"pattern must be a str in {PATTERNS} or a list of groups, got {type(pattern).__name__}")
    groups = [g for g in groups if len(g) > 1]
    if not groups:
        raise ValueError(
            f"pattern {pattern!r} shares nothing with {n_blocks} block(s)"
            + (f" and interval={interval}" if interval is not None else "")
        )
    return groups


def _find_blocks(model: nn.Module, blocks: str | None) -> tuple[str, nn.ModuleList]:
    names = (blocks,) if blocks is not None else _BLOCK_LISTS
    for name in names:
        try:
            found = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(found, (nn.ModuleList, nn.Sequential)):
            return name, found
        if blocks is not None:
            raise TypeError(
                f"model.{name} must be an nn.ModuleList (or nn.Sequential) of blocks, got {type(found).__name__}"
            )
    if blocks is not None:
        raise ValueError(f"model has no submodule {blocks!r}")
    raise ValueError(
        f"cannot find the model's list of blocks (tried {', '.join(_BLOCK_LISTS)}); pass blocks='path.to.module_list'"
    )


def _part_name(block: nn.Module, scope: str, index: int) -> str:
    for name in _PARTS[scope]:
        if isinstance(getattr(block, name, None), nn.Module):
            return name
    raise ValueError(
        f"scope={scope!r}: block {index} ({type(block).__name__}) has no "
        f"{' / '.join(_PARTS[scope])} submodule; use scope='block' (e.g. for an RNNLM)"
    )


def _signature(module: nn.Module):
    return type(module), [(k, tuple(v.shape), v.dtype) for k, v in module.state_dict(keep_vars=True).items()]


def _share(blocks: nn.ModuleList, scope: str, groups: list[list[int]]) -> None:
    # Checked for every group before anything is changed, so a bad call leaves the model as it was.
    targets = []
    for g in groups:
        if scope == "block":
            parts = [(blocks, str(i), blocks[i]) for i in g]
        else:
            parts = []
            for i in g:
                name = _part_name(blocks[i], scope, i)
                parts.append((blocks[i], name, getattr(blocks[i], name)))
        sig = _signature(parts[0][2])
        for (_, _, m), i in zip(parts[1:], g[1:]):
            if _signature(m) != sig:
                raise ValueError(
                    f"cannot share {scope} {i} with {scope} {g[0]}: their types or parameter shapes "
                    f"differ ({type(m).__name__} vs {type(parts[0][2]).__name__})"
                )
        targets.append(parts)
    for parts in targets:
        owner = parts[0][2]
        for parent, name, _ in parts[1:]:
            setattr(parent, name, owner)  # a ModuleList's entries are its attributes "0", "1", ...


def _tie_embeddings(model: nn.Module) -> str:
    """-> "structural" (the model's own tie_embeddings_()) or "parameter" (out.weight = in.weight)."""
    if callable(getattr(model, "tie_embeddings_", None)):
        model.tie_embeddings_()
        return "structural"
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if not (callable(get_in) and callable(get_out)):
        raise ValueError(
            f"tie_embeddings=True: {type(model).__name__} has neither tie_embeddings_() "
            "(accelops.models) nor get_input_embeddings()/get_output_embeddings()"
        )
    emb, head = get_in(), get_out()
    if emb is None or head is None or emb.weight.shape != head.weight.shape:
        raise ValueError(
            "tie_embeddings=True: the input embedding and output head must both exist and have "
            f"the same weight shape, got {None if emb is None else tuple(emb.weight.shape)} and "
            f"{None if head is None else tuple(head.weight.shape)}"
        )
    head.weight = emb.weight
    return "parameter"


def share_parameters(
    model: nn.Module,
    pattern,
    scope: str = "block",
    tie_embeddings: bool = False,
    *,
    interval: int | None = None,
    blocks: str | None = None,
) -> SharingReport:
    """Share weights across the blocks of `model`, in place; returns a SharingReport.

    pattern: "alternate", "sequential" (with interval=n), "sandwich" or explicit groups
        [[0, 6], [1, 7], ...] (see sharing_groups). In each group the first block's weights
        are kept and the others' dropped.
    scope: "block" shares whole blocks (norms included), "attention" / "ffn" only that part
        of each block (found as attn / attention / self_attn, ffn / mlp / feed_forward).
    tie_embeddings: also use the token embedding as the LM head.
    blocks: path of the nn.ModuleList of blocks; found automatically for accelops.models and
        common layouts (blocks, layers, h, model.layers, transformer.h).

    Shared BitLinear layers quantize their weight once per forward of `model` (not once per
    use). Loading a checkpoint whose values differ between names this model shares (one saved
    unshared) raises instead of silently keeping the last one; load it into an unshared model
    and call share_parameters then. May be called again to add sharing (another scope); note
    that blocks already shared are one object, so giving one of their places a part gives it
    to all of them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not isinstance(tie_embeddings, bool):
        raise TypeError(f"tie_embeddings must be a bool, got {tie_embeddings!r}")
    path, block_list = _find_blocks(model, blocks)
    groups = sharing_groups(pattern, len(block_list), interval)
    before = count_parameters(model)
    _share(block_list, scope, groups)
    notes = []
    tie = None
    if tie_embeddings:
        tie = _tie_embeddings(model)
        if tie == "parameter":
            notes.append("embeddings tied by Parameter: call accelops.sharing.retie(model) after to_empty()")
    record = {"blocks": path, "scope": scope, "groups": groups, "tie": tie}
    _install(model)
    model.__dict__[_STATE].append(record)
    _enable_quantization_caches(model)
    return SharingReport(
        pattern=pattern if isinstance(pattern, str) else "groups",
        scope=scope,
        groups=groups,
        tied_embeddings=tie is not None,
        before=before,
        after=count_parameters(model),
        notes=notes,
    )


# What "encoder-decoder" sharing gives decoder block i from encoder block i: the parts both
# have (the self-attention's projections and its sub-layer norm, the FFN). The decoder's
# self-attention module stays its own (causal, the encoder's is bidirectional: the flag is
# the class's), and so do its norms and its cross-attention, which the encoder has no
# counterpart of.
ENCODER_DECODER_PARTS = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj", "attn_sub_norm"), "ffn": None}


def _share_encoder_decoder(model: nn.Module) -> None:
    enc, dec = getattr(model, "encoder_blocks", None), getattr(model, "decoder_blocks", None)
    if not isinstance(enc, nn.ModuleList) or not isinstance(dec, nn.ModuleList):
        raise ValueError(
            f"encoder-decoder sharing needs a model with encoder_blocks and decoder_blocks ModuleLists "
            f"(accelops.models.TransformerSeq2Seq), got {type(model).__name__}"
        )
    if len(enc) != len(dec):
        raise ValueError(
            f"encoder-decoder sharing needs as many decoder blocks as encoder blocks, got {len(dec)} and {len(enc)}"
        )
    # (parent, name, owner) for every swap, checked before anything changes
    swaps = []
    for i, (e, d) in enumerate(zip(enc, dec)):
        for part, names in ENCODER_DECODER_PARTS.items():
            if names is None:
                pairs = [(d, part, getattr(e, part, None), getattr(d, part, None))]
            else:
                pe, pd = getattr(e, part), getattr(d, part)
                pairs = [(pd, n, getattr(pe, n, None), getattr(pd, n, None)) for n in names]
            for parent, name, owner, mine in pairs:
                if owner is None and mine is None:
                    continue  # e.g. no attn_sub_norm in this configuration
                if owner is None or mine is None or _signature(owner) != _signature(mine):
                    raise ValueError(
                        f"cannot share decoder block {i}'s {part} {name} with encoder block {i}'s: their types "
                        f"or parameter shapes differ"
                    )
                swaps.append((parent, name, owner))
    for parent, name, owner in swaps:
        setattr(parent, name, owner)


def share_encoder_decoder(model: nn.Module) -> SharingReport:
    """ "Encoder-decoder sharing", in place: decoder block i reuses encoder block i's weights
    for the parts both have (ENCODER_DECODER_PARTS: the self-attention's q/k/v/o
    projections and its sub-layer norm, and the FFN, as the same module objects); the
    decoder's norms and cross-attention stay its own. For accelops.models.TransformerSeq2Seq
    (or any model with encoder_blocks / decoder_blocks of that layout). Shared BitLinear
    layers quantize once per forward, and loading a checkpoint with different values under
    the shared names raises, as with share_parameters. -> SharingReport (pattern
    "encoder-decoder", groups [[encoder block i, decoder block i]])."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    before = count_parameters(model)
    _share_encoder_decoder(model)
    _install(model)
    model.__dict__[_STATE].append({"kind": "encoder-decoder"})
    _enable_quantization_caches(model)
    if hasattr(model, "sharing"):
        model.sharing = "encoder-decoder"
    n = len(model.encoder_blocks)
    return SharingReport(
        pattern="encoder-decoder",
        scope="attention+ffn",
        groups=[[i, n + i] for i in range(n)],
        tied_embeddings=False,
        before=before,
        after=count_parameters(model),
        notes=["decoder self-attention projections and FFN = the encoder's; norms and cross-attention separate"],
    )


def retie(model: nn.Module) -> nn.Module:
    """Re-establish every sharing share_parameters recorded on `model` (idempotent). Needed only
    for embeddings tied by Parameter (models without tie_embeddings_()) after to_empty(),
    which gives each module a new Parameter; block sharing is by module and survives it."""
    for rec in model.__dict__.get(_STATE, ()):
        if rec.get("kind") == "encoder-decoder":
            _share_encoder_decoder(model)
            continue
        _, block_list = _find_blocks(model, rec["blocks"])
        _share(block_list, rec["scope"], rec["groups"])
        if rec["tie"] == "parameter":
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
    _enable_quantization_caches(model)
    return model


# ---------------------------------------------------------------------- hooks


def _install(model: nn.Module) -> None:
    if _STATE in model.__dict__:
        return
    model.__dict__[_STATE] = []
    model.register_load_state_dict_pre_hook(_check_checkpoint_ties)
    model.register_forward_pre_hook(_clear_quantization_caches)


def _enable_quantization_caches(model: nn.Module) -> None:
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    for m in model.modules():
        if isinstance(m, BitLinear) and uses[id(m)] > 1:
            m.cache_quantization = True


def _clear_quantization_caches(module: nn.Module, args) -> None:
    # Once per forward of the shared model: its shared BitLinears quantize on their first use
    # and reuse that for the others. Clearing here (not only keying on the weight's version)
    # also catches weights changed behind autograd's back (p.data.copy_, a broadcast).
    for m in module.modules():
        if isinstance(m, BitLinear) and m.cache_quantization:
            m.clear_quantization_cache()


def _check_checkpoint_ties(
    module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    # state_dict() names a shared tensor once per place; loading copies each name into the
    # same tensor, so a checkpoint holding different values under them would silently end up
    # with the last one. Refuse that instead. (Loaded as a submodule, the model gets its prefix.)
    names: dict[int, list[str]] = {}
    for key, t in module.state_dict(prefix=prefix, keep_vars=True).items():
        names.setdefault(id(t), []).append(key)
    for keys in names.values():
        present = [k for k in keys if k in state_dict]
        if len(present) < 2:
            continue
        first = state_dict[present[0]]
        for other in present[1:]:
            v = state_dict[other]
            same = (
                isinstance(v, torch.Tensor)
                and isinstance(first, torch.Tensor)
                and v.shape == first.shape
                and torch.equal(v.to(first.device), first)
            )
            if not same:
                # Raised, not appended to error_msgs: this pre-hook of the root runs before any
                # tensor is copied, so the model is left as it was.
                raise RuntimeError(
                    f"Error loading state_dict into {type(module).__name__}: the checkpoint holds different values "
                    f"for {present[0]} and {other}, which this model shares (accelops.sharing.share_parameters): "
                    "it was saved from a model without that sharing. Load it into an unshared model, then call "
                    "share_parameters (each group keeps its first block's weights)"
                )
