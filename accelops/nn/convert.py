"""convert(model, mode): swap a model's linear layers for accelops layers in place.

What it converts: plain nn.Linear, transformers' Conv1D (GPT-2 and the models built on it:
a linear layer whose weight is stored transposed, [in, out]), accelops' FusedFFN (as one
unit, so the fused kernel is kept and runs the mode asked for), and the training layers
into their inference forms (BitLinear -> TernaryLinear, QATLinear -> Int8Linear).

convert is atomic: every layer is planned, checked and built before the first one is put
into the model, so an error (a NaN weight, a QATLinear with no int8 form) leaves the model
as it was and names the layer by its qualified name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .bitlinear import BitLinear
from .embedding import Bf16Embedding, Bf16Linear, Int8Embedding, TiedHead
from .ffn import KERNELS as FFN_KERNELS
from .ffn import FusedFFN
from .qat import QATLinear
from .quantized_linear import Int8Linear, TernaryLinear

__all__ = ["convert", "ConvertReport", "Swap", "MODES", "PRECISIONS"]

MODES = ("bitlinear", "ternary", "int8", "dynamic-int8", "qat-int8", "int8-from-qat")
# Modes whose new layers hold a quantized copy of the weight (the float weight is freed);
# the others ("bitlinear", "qat-int8") share the float Parameters with the layer they replace.
_COPYING = ("ternary", "int8", "dynamic-int8", "int8-from-qat")
# The output head (LM head) stays in its precision by default in the ternary modes (BitNet
# b1.58 keeps it in higher precision: at a large vocabulary it carries most of the error);
# the int8 modes quantize it, as torchao's quantize_ does with every nn.Linear.
_QUANTIZE_OUTPUT_DEFAULT = {
    "bitlinear": False,
    "ternary": False,
    "int8": True,
    "dynamic-int8": True,
    "qat-int8": True,
    "int8-from-qat": True,
}
# convert(head=, embedding=): the precision of the output head and of the input (token)
# embedding, in the inference modes. "fp32": left as it is.
PRECISIONS = ("fp32", "bf16", "int8")
_INFERENCE_MODES = ("ternary", "int8", "dynamic-int8", "int8-from-qat")
_EMBEDDING_CLASS = {"int8": Int8Embedding, "bf16": Bf16Embedding}
# FusedFFN quant mode that each convert mode gives a FusedFFN of quant None.
_FFN_MODE = {
    "bitlinear": "bitlinear",
    "ternary": "ternary",
    "int8": "int8",
    "dynamic-int8": "int8",
    "qat-int8": "qat-int8",
}


@dataclass
class Swap:
    fqn: str
    from_type: str
    to_type: str
    in_features: int
    out_features: int
    runs: str = ""  # the kernel the new layer's forward runs
    note: str = ""


@dataclass
class ConvertReport:
    """What convert() swapped and skipped (with the reason), and the bytes.

    bytes_before / bytes_after: the tensors the swapped layers hold (weights, scales,
    biases); model_bytes_before / model_bytes_after: every parameter and buffer of the
    model. Both count each storage once, so shared and tied tensors are counted once and
    `model_bytes_before - model_bytes_after` is what the conversion freed."""

    mode: str
    swapped: list[Swap] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (fqn, why)
    bytes_before: int = 0
    bytes_after: int = 0
    model_bytes_before: int = 0
    model_bytes_after: int = 0

    @property
    def num_swapped(self) -> int:
        return len(self.swapped)

    @property
    def compression(self) -> float:
        """bytes_before / bytes_after (e.g. ~10 for ternary); 1.0 when nothing was swapped."""
        return self.bytes_before / self.bytes_after if self.bytes_after else 1.0

    def __str__(self) -> str:
        lines = [
            f"convert(mode={self.mode!r}): swapped {self.num_swapped} layer(s), skipped {len(self.skipped)}; "
            f"swapped layers {_mib(self.bytes_before)} -> {_mib(self.bytes_after)} ({self.compression:.2f}x smaller); "
            f"model {_mib(self.model_bytes_before)} -> {_mib(self.model_bytes_after)}"
        ]
        if not self.swapped:
            lines.append(
                "  nothing was converted"
                + (
                    ": see the skipped layers below"
                    if self.skipped
                    else ": the model holds no nn.Linear, Conv1D or FusedFFN"
                )
            )
        if self.swapped:
            rows = [("fqn", "from", "to", "in", "out", "runs")]
            rows += [
                (
                    s.fqn,
                    s.from_type,
                    s.to_type,
                    str(s.in_features),
                    str(s.out_features),
                    s.runs + (f" ({s.note})" if s.note else ""),
                )
                for s in self.swapped
            ]
            widths = [max(len(r[i]) for r in rows) for i in range(6)]
            for r in rows:
                lines.append(
                    "  "
                    + "  ".join(
                        c.rjust(w) if i in (3, 4) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))
                    ).rstrip()
                )
        for fqn, why in self.skipped:
            lines.append(f"  skipped {fqn}: {why}")
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f} MiB"


# --------------------------------------------------------------------------- bytes


def _storage_key(t: torch.Tensor):
    if t.device.type == "meta":
        return ("meta", id(t))
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


def _storage_bytes(t: torch.Tensor) -> int:
    if t.device.type == "meta":
        return t.numel() * t.element_size()
    return t.untyped_storage().nbytes()


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += _storage_bytes(t)
    return total


def _module_tensors(module: nn.Module):
    return list(module.parameters()) + list(module.buffers())


# --------------------------------------------------------------------------- Conv1D


def _is_conv1d(module: nn.Module) -> bool:
    """transformers.pytorch_utils.Conv1D (GPT-2, GPT, ...), recognised without importing
    transformers: y = x @ weight + bias with weight [nx, nf] = [in, out]."""
    if type(module).__name__ != "Conv1D":
        return False
    w = getattr(module, "weight", None)
    nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
    return isinstance(w, torch.Tensor) and w.dim() == 2 and tuple(w.shape) == (nx, nf)


def _conv1d_as_linear(conv: nn.Module, share_bias: bool) -> nn.Linear:
    """An nn.Linear computing what `conv` computes: weight = conv.weight^T, as a new
    Parameter (a transposed copy: a Parameter cannot be shared across the transpose)."""
    w = conv.weight
    bias = getattr(conv, "bias", None)
    linear = nn.Linear(conv.nx, conv.nf, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
    if bias is not None:
        linear.bias = bias if share_bias else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    linear.train(conv.training)
    return linear


def _features(module: nn.Module) -> tuple[int, int]:
    if _is_conv1d(module):
        return module.nx, module.nf
    if isinstance(module, FusedFFN):
        return module.dim, module.dim
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return module.in_features, module.out_features


# --------------------------------------------------------------------------- what runs


def _runs(module: nn.Module) -> str:
    if isinstance(module, TernaryLinear):
        return "ternary_matmul"
    if isinstance(module, Int8Linear):
        return "int8_linear"
    if isinstance(module, BitLinear):
        return "BitLinear (ternary fake-quant, straight-through)"
    if isinstance(module, QATLinear):
        if module.activation == "per_token" and module.weight_bits == "int8":
            return "int8_matmul (QAT, straight-through)"
        return f"F.linear of fake-quantized {module.weight_bits} weights ({module.activation} activations)"
    if isinstance(module, FusedFFN):
        return FFN_KERNELS[module.quant]
    if isinstance(module, Int8Embedding):
        return "int8 rows gathered and dequantized"
    if isinstance(module, Bf16Embedding):
        return "bf16 rows gathered"
    if isinstance(module, Bf16Linear):
        return "bf16 F.linear"
    if isinstance(module, TiedHead):
        return (
            "int8_linear on the embedding's w_q / w_scale"
            if module.precision == "int8"
            else "bf16 F.linear on the embedding's weight"
        )
    return type(module).__name__


# --------------------------------------------------------------------------- planning


@dataclass
class _Plan:
    """One layer object to replace (reachable under one or more names)."""

    old: nn.Module
    fqn: str  # its first qualified name
    make: Callable[[], nn.Module]
    note: str = ""
    sites: list = field(default_factory=list)  # (parent, attribute name, fqn)


class _Planner:
    def __init__(self, model, mode, filter, per_channel, qat, quantize_output, untie, head=None, embedding=None):
        self.model, self.mode, self.filter = model, mode, filter
        self.per_channel, self.qat = per_channel, qat
        self.quantize_output, self.untie = quantize_output, untie
        self.plans: dict[int, _Plan] = {}
        self.skipped: list[tuple[str, str]] = []
        self.holders = self._parameter_holders(model)
        self.heads = self._output_heads(model)
        # id(module) -> the decision for the head and the embedding when head= / embedding= are given
        self.ends: dict[int, tuple] = _EndsPlanner(self, head, embedding).plan() if (head or embedding) else {}

    # --- model facts
    @staticmethod
    def _parameter_holders(model) -> dict[int, dict[int, str]]:
        """id(parameter) -> {id(module holding it directly): that module's first name}."""
        holders: dict[int, dict[int, str]] = {}
        for name, m in model.named_modules(remove_duplicate=False):
            for p in m._parameters.values():
                if p is not None:
                    holders.setdefault(id(p), {}).setdefault(id(m), name)
        return holders

    @staticmethod
    def _output_heads(model) -> set[int]:
        heads = set()
        get = getattr(model, "get_output_embeddings", None)
        if callable(get):
            try:
                head = get()
            except Exception:  # noqa: BLE001 - a model without a head may raise; then there is none
                head = None
            if isinstance(head, nn.Module):
                heads.add(id(head))
        for name, m in model.named_modules():
            if name.rsplit(".", 1)[-1] in ("lm_head", "output_projection"):
                heads.add(id(m))
        return heads

    def _tied_to(self, module: nn.Module, weights) -> str | None:
        """The name of another module holding one of `weights` (a tie), or None."""
        for w in weights:
            for mid, name in self.holders.get(id(w), {}).items():
                if mid != id(module):
                    return name
        return None

    def _tie(self, module: nn.Module, copies: bool, what: str = "its weight") -> tuple[str | None, str]:
        """(why to skip, note) for a layer whose weight may be tied to another module's. A
        conversion that `copies` the weight (a quantized copy beside the float one) would
        silently untie the two: skipped unless untie=True. One that shares the Parameter keeps
        the tie, and says so."""
        tied = self._tied_to(module, [module.weight])
        if tied is None:
            return None, ""
        if not copies:
            return None, f"still tied to {tied}.weight (the new layer shares the Parameter)"
        if not self.untie:
            return (
                f"{what} is tied to {tied}.weight; converting it would untie the two (a quantized "
                "copy beside the float weight); untie=True converts it anyway"
            ), ""
        return None, f"untied from {tied}.weight (untie=True)"

    # --- the walk
    def walk(self, parent: nn.Module, prefix: str, visited: set) -> None:
        if id(parent) in visited:
            return  # a shared container: its layers were planned on the first visit
        visited.add(id(parent))
        # _modules rather than named_children(), which yields a module held twice only once
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            fqn = prefix + name
            if id(child) in self.plans:
                self.plans[id(child)].sites.append((parent, name, fqn))
                continue
            decision = self._decide(child, fqn)
            if decision is None:
                self.walk(child, fqn + ".", visited)
                continue
            kind, value, note = decision
            if kind == "skip":
                self.skipped.append((fqn, value))
                continue
            plan = _Plan(child, fqn, value, note)
            plan.sites.append((parent, name, fqn))
            self.plans[id(child)] = plan

    def _ask_filter(self, module, fqn) -> bool:
        if self.filter is None:
            return True
        keep = self.filter(module, fqn)
        if not isinstance(keep, bool):
            raise TypeError(f"filter must return a bool, got {type(keep).__name__} for {fqn!r}")
        return keep

    def _decide(self, m: nn.Module, fqn: str):
        """None: not a layer convert handles (recurse into it); ("skip", why, "") or
        ("swap", make, note)."""
        mode = self.mode
        if id(m) in self.ends:
            return self.ends[id(m)]
        if isinstance(m, FusedFFN):
            return self._decide_ffn(m, fqn)
        if type(m) in (TernaryLinear, Int8Linear):
            article = "an" if type(m) is Int8Linear else "a"
            return "skip", f"already {article} {type(m).__name__} (an inference layer; nothing left to convert)", ""
        # A training layer converts only into its own inference form, in that form's mode.
        inference_forms = {
            QATLinear: ("int8-from-qat", m.to_int8_linear if type(m) is QATLinear else None),
            BitLinear: (
                "ternary",
                lambda: _on_meta_or(m, lambda: TernaryLinear.from_bitlinear(m), _empty_ternary, m.per_channel),
            ),
        }
        if type(m) in inference_forms:
            its_mode, make = inference_forms[type(m)]
            if mode != its_mode:
                return (
                    "skip",
                    (
                        f"already a {type(m).__name__}; mode={mode!r} converts only plain nn.Linear "
                        f"(use mode={its_mode!r})"
                    ),
                    "",
                )
            if not self._ask_filter(m, fqn):
                return "skip", "filter returned False", ""
            return self._untie_or_skip(m, make)
        conv = _is_conv1d(m)
        if type(m) is not nn.Linear and not conv:
            if isinstance(m, nn.Linear):
                # Subclasses such as nn.MultiheadAttention's out_proj are read through `.weight` by
                # their owner, not called, so swapping them would silently change nothing or break.
                return "skip", f"{type(m).__name__} is a subclass of nn.Linear, not nn.Linear", ""
            return None
        if mode == "int8-from-qat":
            kind = "a Conv1D" if conv else "a plain nn.Linear"
            return "skip", f"{kind}, not a QATLinear (mode='int8-from-qat' converts QATLinear only)", ""
        is_head = id(m) in self.heads
        quantize_output = _QUANTIZE_OUTPUT_DEFAULT[mode] if self.quantize_output is None else self.quantize_output
        if is_head and not quantize_output:
            default = self.quantize_output is None
            return (
                "skip",
                (
                    f"the output head stays {m.weight.dtype} "
                    + (
                        f"by default in mode {mode!r} (BitNet keeps the LM head in higher precision)"
                        if default
                        else "(quantize_output=False)"
                    )
                    + ("; quantize_output=True converts it" if default else "")
                ),
                "",
            )
        if not self._ask_filter(m, fqn):
            return "skip", "filter returned False", ""
        copying = mode in _COPYING
        why, note = self._tie(m, copying or conv)
        if why is not None:
            return "skip", why, ""
        if conv:
            extra = "Conv1D weight transposed into a new Parameter" if not copying else "from Conv1D"
            note = f"{note}; {extra}" if note else extra

            def source():
                return _conv1d_as_linear(m, share_bias=not copying)
        else:

            def source():
                return m

        return "swap", self._maker(m, source), note

    def _untie_or_skip(self, m, make):
        """A training layer into its inference form (a quantized copy): refuse to untie silently."""
        why, note = self._tie(m, copies=True)
        return ("skip", why, "") if why is not None else ("swap", make, note)

    def _maker(self, m, source):
        mode, per_channel, qat = self.mode, self.per_channel, self.qat
        if mode == "bitlinear":
            return lambda: BitLinear.from_linear(source(), per_channel=per_channel)
        if mode == "qat-int8":
            return lambda: QATLinear.from_linear(source(), **qat)
        if mode == "ternary":
            return lambda: _on_meta_or(
                m, lambda: TernaryLinear.from_linear(source(), per_channel=per_channel), _empty_ternary, per_channel
            )
        return lambda: _on_meta_or(m, lambda: Int8Linear.from_linear(source()), _empty_int8, None)

    def _decide_ffn(self, ffn: FusedFFN, fqn: str):
        mode, q = self.mode, ffn.quant
        if q is None and mode in _FFN_MODE:
            target = _FFN_MODE[mode]
        elif q == "bitlinear" and mode == "ternary":
            target = "ternary"
        elif q == "qat-int8" and mode == "int8-from-qat":
            target = "int8"
        else:
            return "skip", f"a FusedFFN with quant={q!r}: mode={mode!r} does not apply to it", ""
        if target == "qat-int8" and self.qat["activation"] != "per_token":
            return (
                "skip",
                (
                    "a FusedFFN quantizes activations per token only; activation='per_tensor' needs the "
                    "unfused FFN (FusedFFN.to_module()) before convert"
                ),
                "",
            )
        if target == "int8" and q == "qat-int8" and ffn.qat_weight != "int8":
            raise ValueError(
                f"{fqn} is a FusedFFN(quant='qat-int8', qat_weight={ffn.qat_weight!r}): only int8 "
                "weights have an exact Int8Linear form; skip it with filter="
            )
        projections = [
            (n, getattr(ffn, n)) for n in ("gate_proj", "up_proj", "down_proj") if getattr(ffn, n) is not None
        ]
        answers = {n: self._ask_filter(p, f"{fqn}.{n}") for n, p in projections}
        if len(set(answers.values())) > 1:
            raise ValueError(
                f"filter returned {answers} for the projections of the FusedFFN {fqn}: a fused FFN "
                "converts as one unit, so the filter must give all its projections the same answer"
            )
        if not all(answers.values()):
            return "skip", "filter returned False for its projections", ""
        copying = target in ("ternary", "int8")
        for n, p in projections:
            why, _ = self._tie(p, copying, f"{n}.weight")
            if why is not None:
                return "skip", why, ""
        per_channel = ffn.per_channel if q == "bitlinear" else self.per_channel
        kw = {"qat_weight": self.qat["weight"], "group_size": self.qat["group_size"]} if target == "qat-int8" else {}

        def make():
            if target == "int8" and q == "qat-int8":
                return _ffn_int8_from_qat(ffn)
            if ffn.up_proj.weight.device.type == "meta" and copying:
                new = FusedFFN(
                    ffn.dim,
                    ffn.hidden,
                    ffn.activation,
                    bias=ffn.up_proj.bias is not None,
                    quant=target,
                    per_channel=per_channel,
                    device="meta",
                )
                new.train(ffn.training)
                return new
            return FusedFFN.from_module(ffn, activation=ffn.activation, quant=target, per_channel=per_channel, **kw)

        return "swap", make, f"FusedFFN quant={q!r} -> {target!r}"


class _EndsPlanner:
    """The decisions for convert(head=, embedding=): the output head and the input (token)
    embedding in the precision asked for. A tied pair (transformers: lm_head sharing
    embed_tokens' weight; TransformerLM: no lm_head, head() reads tok_emb) keeps ONE weight:
    the embedding becomes an Int8Embedding / Bf16Embedding and the head a TiedHead holding
    that same module; giving only one of head= / embedding= sets both. Different precisions
    for a tied pair untie it, which needs untie=True (and a head module to hold the copy)."""

    def __init__(self, planner: _Planner, head: str | None, embedding: str | None):
        self.p, self.head_p, self.emb_p = planner, head, embedding

    def _named(self, module):
        for name, m in self.p.model.named_modules():
            if m is module:
                return name
        return None

    def _head(self):
        """(head module or None, its name)."""
        model = self.p.model
        heads = [(n, m) for n, m in model.named_modules() if id(m) in self.p.heads]
        get = getattr(model, "get_output_embeddings", None)
        if callable(get):
            head = get()
            if isinstance(head, nn.Module):
                return head, self._named(head)
        if len({id(m) for _, m in heads}) > 1:
            raise ValueError(
                f"head=: the model has several output heads ({', '.join(n for n, _ in heads)}); "
                "convert them with filter= and quantize_output=True instead"
            )
        return (heads[0][1], heads[0][0]) if heads else (None, None)

    def _embedding(self):
        model = self.p.model
        get = getattr(model, "get_input_embeddings", None)
        if callable(get):
            try:
                emb = get()
            except Exception:  # noqa: BLE001 - a model without one may raise (NotImplementedError)
                emb = None
            if isinstance(emb, nn.Module):
                return emb, self._named(emb)
        for name, m in model.named_modules():
            if name.rsplit(".", 1)[-1] in ("tok_emb", "embed_tokens", "wte", "word_embeddings"):
                return m, name
        return None, None

    def _asked(self, module, fqn) -> bool:
        return self.p._ask_filter(module, fqn)

    def plan(self) -> dict:
        head, head_fqn = self._head()
        emb, emb_fqn = self._embedding()
        h, e = self.head_p, self.emb_p
        structural = (
            head is None and emb is not None and getattr(self.p.model, "head_reads_input_embeddings", False) is True
        )
        if h is not None and head is None and not structural:
            raise ValueError(
                "head=: the model has no output head (model.get_output_embeddings() or a layer named "
                "lm_head / output_projection)"
            )
        if e is not None and emb is None:
            raise ValueError(
                "embedding=: the model has no input embedding (model.get_input_embeddings() or a "
                "layer named tok_emb / embed_tokens / wte)"
            )
        # the Parameters themselves (a converted layer's .weight property would dequantize a copy)
        weight = _own_weight(emb)
        tied = structural or (weight is not None and _own_weight(head) is weight)
        out: dict[int, tuple] = {}
        if tied and not (h is not None and e is not None and h != e):
            self._tied(
                out,
                h or e,
                head,
                head_fqn,
                emb,
                emb_fqn,
                structural,
                followed="embedding" if e is None else "head" if h is None else None,
            )
            return out
        if tied:  # h and e differ
            if structural:
                raise ValueError(
                    f"head={h!r}, embedding={e!r}: the model's head reads its input embedding (tied "
                    "embeddings, no head module), so both take one precision; give one of them"
                )
            if not self.p.untie:
                why = (
                    f"tied to {emb_fqn}.weight: head={h!r} and embedding={e!r} would untie them (two copies); "
                    "untie=True converts each on its own, one precision for both keeps the tie"
                )
                out[id(head)] = ("skip", why, "")
                out[id(emb)] = ("skip", why.replace(f"tied to {emb_fqn}.weight", f"tied to {head_fqn}.weight"), "")
                return out
        untied_note = f"untied from {emb_fqn}.weight (untie=True)" if tied else ""
        if h is not None:
            out[id(head)] = self._head_alone(head, head_fqn, h, untied_note)
        if e is not None:
            out[id(emb)] = self._embedding_alone(emb, emb_fqn, e, untied_note.replace(emb_fqn, head_fqn or ""))
        return out

    @staticmethod
    def _keep(module, what: str, arg: str) -> tuple:
        w = _own_weight(module)
        dtype = str(w.dtype).removeprefix("torch.") if w is not None else f"a {type(module).__name__}"
        return "skip", f"the {what} stays {dtype} ({arg}='fp32')", ""

    def _head_alone(self, head, fqn, precision, note) -> tuple:
        if precision == "fp32":
            return self._keep(head, "output head", "head")
        if type(head) is not nn.Linear:
            return "skip", f"a {type(head).__name__}, not an nn.Linear: head= converts a float nn.Linear head", ""
        if not self._asked(head, fqn):
            return "skip", "filter returned False", ""
        if precision == "int8":
            return "swap", lambda: _on_meta_or(head, lambda: Int8Linear.from_linear(head), _empty_int8, None), note

        def make():
            if head.weight.device.type == "meta":
                return Bf16Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
            return Bf16Linear.from_linear(head)

        return "swap", make, note

    def _embedding_alone(self, emb, fqn, precision, note) -> tuple:
        if precision == "fp32":
            return self._keep(emb, "input embedding", "embedding")
        if type(emb) is not nn.Embedding:
            return "skip", f"a {type(emb).__name__}, not an nn.Embedding: embedding= converts an nn.Embedding", ""
        if not self._asked(emb, fqn):
            return "skip", "filter returned False", ""
        return "swap", _embedding_maker(emb, precision), note

    def _tied(self, out, precision, head, head_fqn, emb, emb_fqn, structural, followed) -> None:
        arg = "head" if followed == "embedding" else "embedding"
        also = f"; {arg}={precision!r} sets both" if followed else ""
        if precision == "fp32":
            if head is not None:
                out[id(head)] = ("skip", f"the output head stays (tied to {emb_fqn}.weight; {arg}='fp32')", "")
            out[id(emb)] = self._keep(emb, "input embedding" + (" (and the tied head)" if structural else ""), arg)
            return
        bad = None
        if type(emb) is not nn.Embedding:
            bad = f"{emb_fqn} is a {type(emb).__name__}, not an nn.Embedding"
        elif head is not None and type(head) is not nn.Linear:
            bad = f"{head_fqn} is a {type(head).__name__}, not an nn.Linear"
        elif not (self._asked(emb, emb_fqn) and (head is None or self._asked(head, head_fqn))):
            bad = "filter returned False"
        if bad:
            if head is not None:
                out[id(head)] = ("skip", f"{bad}: the tied head and embedding convert together", "")
            out[id(emb)] = ("skip", f"{bad}: the tied head and embedding convert together", "")
            return
        built = {}
        make_one = _embedding_maker(emb, precision)

        def make_emb():
            if "emb" not in built:
                built["emb"] = make_one()
            return built["emb"]

        kernel = "int8_linear" if precision == "int8" else "a bf16 GEMM"
        if structural:
            note = f"tied: also the model's head, {kernel} on this one {precision} weight{also}"
        else:
            note = f"tied to {head_fqn}: one {precision} weight serves both{also}"
            out[id(head)] = (
                "swap",
                lambda: TiedHead.of(make_emb()),
                f"tied to {emb_fqn}: {emb_fqn}.attend(h) on its {precision} weight{also}",
            )
        out[id(emb)] = ("swap", make_emb, note)


def _own_weight(module) -> nn.Parameter | None:
    return module._parameters.get("weight") if isinstance(module, nn.Module) else None


def _embedding_maker(emb: nn.Embedding, precision: str):
    cls = _EMBEDDING_CLASS[precision]

    def make():
        w = emb.weight
        if w.device.type == "meta":
            new = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, device="meta", dtype=w.dtype)
            new.train(emb.training)
            return new
        return cls.from_embedding(emb)

    return make


def _ffn_int8_from_qat(ffn: FusedFFN) -> FusedFFN:
    new = FusedFFN(ffn.dim, ffn.hidden, ffn.activation, bias=False, quant="int8", device="meta")
    for name in ("gate_proj", "up_proj", "down_proj"):
        layer = getattr(ffn, name)
        if layer is not None:
            setattr(new, name, layer.to_int8_linear())
    new.train(ffn.training)
    return new


def _empty_ternary(m, per_channel):
    in_f, out_f = _features(m)
    new = TernaryLinear(in_f, out_f, bias=getattr(m, "bias", None) is not None, per_channel=per_channel, device="meta")
    new.train(m.training)
    return new


def _empty_int8(m, _):
    in_f, out_f = _features(m)
    new = Int8Linear(in_f, out_f, bias=getattr(m, "bias", None) is not None, device="meta")
    new.train(m.training)
    return new


def _on_meta_or(m, build, empty, arg):
    """A meta-device layer has no values to quantize: build the new layer empty on the meta
    device (fill it with load_state_dict / accelops.load, as for any meta model)."""
    if m.weight.device.type == "meta":
        return empty(m, arg)
    return build()


def _check_finite(plan: _Plan) -> None:
    for pname, p in plan.old.named_parameters():
        if p.device.type == "meta" or not p.is_floating_point():
            continue
        if not bool(torch.isfinite(p).all()):
            bad = "NaN" if bool(torch.isnan(p).any()) else "Inf"
            raise ValueError(
                f"{plan.fqn}.{pname} holds {bad} values; convert changed nothing (fix or skip the layer with filter=)"
            )


# --------------------------------------------------------------------------- convert


def convert(
    model: nn.Module,
    mode: str,
    filter: Callable[[nn.Module, str], bool] | None = None,
    per_channel: bool = False,
    *,
    activation: str = "per_token",
    weight: str = "int8",
    group_size: int = 128,
    quantize_output: bool | None = None,
    untie: bool = False,
    head: str | None = None,
    embedding: str | None = None,
) -> ConvertReport:
    """Swap `model`'s linear layers in place, recursing through its children; atomic (an
    error leaves the model unchanged and names the layer).

    Layers converted: nn.Linear (not its subclasses), transformers' Conv1D (GPT-2; its
    transposed weight is handled), accelops' FusedFFN as one unit (it keeps the fused
    kernel and runs the mode asked for: FusedFFN(quant=...)), and the training layers into
    their inference forms (BitLinear with "ternary", QATLinear with "int8-from-qat").

    mode: "bitlinear" (training layer sharing the latent weight and bias Parameters),
    "ternary" (packed inference layer; a BitLinear is converted with its own per_channel)
    or "int8" (W8A8, per output channel). "dynamic-int8" is the same as "int8": Int8Linear
    quantizes the weights once, here, and the activations per token at run time.
    "qat-int8" makes QATLinear training layers sharing the weight and bias Parameters, with
    `activation` ("per_token" or "per_tensor"), `weight` ("int8" or "int4") and `group_size`
    (int4); "int8-from-qat" turns trained QATLinear layers (int8 weights, per-token
    activations) into Int8Linear layers whose outputs equal theirs bit for bit (others raise).

    quantize_output: whether the output head (model.get_output_embeddings(), or a layer
    named lm_head) is converted. None (default): not in "bitlinear" / "ternary" (BitNet
    keeps the LM head in higher precision), yes in the int8 modes (as torchao does).
    untie: a weight tied to another module (an LM head tied to the token embedding) is
    skipped with the reason in copying modes (ternary / int8 would keep a quantized copy
    beside the float weight, silently untying the two); untie=True converts it anyway.
    The sharing modes ("bitlinear", "qat-int8") keep ties: the new layer shares the Parameter.

    head, embedding: the precision of the output head and of the input (token) embedding in
    the inference modes: "fp32" (left as it is), "bf16" (Bf16Linear / Bf16Embedding: weight
    stored and multiplied in bf16) or "int8" (Int8Linear / Int8Embedding: int8 rows, one
    fp32 scale a row, the head as dynamic W8A8 int8_linear). None: the head follows
    quantize_output (which cannot be given with head=), the embedding stays. A tied head and
    embedding keep ONE weight: the embedding becomes Int8Embedding / Bf16Embedding and the
    head a TiedHead running the embedding's attend(h) on it (a TransformerLM with tied
    embeddings has no head module: its head() calls tok_emb.attend); giving one of head= /
    embedding= sets both (the report says so); two different precisions untie them, which
    needs untie=True. At the 2B4T shape head="int8" reads 0.33 GB a token instead of 1.3 GB.
    A Conv1D's weight is transposed into a new Parameter in the sharing modes (build the
    optimizer after convert).

    filter(module, fqn) -> bool is asked about each convertible layer (each projection of a
    FusedFFN, which must all get the same answer); only those it returns True for are
    swapped. per_channel applies to "bitlinear" and "ternary" from float layers. New layers
    live on the original's device and return outputs in the input's dtype; on the meta device
    the copying modes build empty layers (load a state_dict into them). A layer object
    reachable under several names is swapped once and the new one put at every name, so
    sharing survives. The report lists what was swapped, what each new layer runs, what
    was skipped and why, and the bytes (each storage counted once).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if filter is not None and not callable(filter):
        raise TypeError(f"filter must be callable as filter(module, fqn) -> bool, got {type(filter).__name__}")
    if not isinstance(per_channel, bool):
        raise TypeError(f"per_channel must be a bool, got {per_channel!r}")
    if quantize_output is not None and not isinstance(quantize_output, bool):
        raise TypeError(f"quantize_output must be None or a bool, got {quantize_output!r}")
    if not isinstance(untie, bool):
        raise TypeError(f"untie must be a bool, got {untie!r}")
    for name, value in (("head", head), ("embedding", embedding)):
        if value is not None and value not in PRECISIONS:
            raise ValueError(f"{name} must be None or one of {PRECISIONS}, got {value!r}")
    if (head is not None or embedding is not None) and mode not in _INFERENCE_MODES:
        raise ValueError(
            f"head= and embedding= apply to the inference modes {_INFERENCE_MODES}, got mode={mode!r} "
            "(a training mode keeps the head and embedding trainable)"
        )
    if head is not None and quantize_output is not None:
        raise ValueError(
            "give head= or quantize_output=, not both: head='int8'/'bf16'/'fp32' sets the output head's "
            "precision whatever the mode, quantize_output=True converts it in the mode's format"
        )
    qat = {"activation": activation, "weight": weight, "group_size": group_size}
    if mode == "qat-int8":
        QATLinear(1, 1, activation=activation, weight=weight, group_size=group_size, device="meta")  # checks them
    elif qat != {"activation": "per_token", "weight": "int8", "group_size": 128}:
        raise ValueError(f"activation, weight and group_size apply to mode='qat-int8' only, got mode={mode!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear) or _is_conv1d(model) or isinstance(model, FusedFFN):
        raise ValueError(
            f"model is itself a {type(model).__name__}: convert swaps children in place and cannot replace the "
            "object you hold; wrap it (nn.Sequential(layer)) or call TernaryLinear/Int8Linear/BitLinear.from_linear"
        )
    if mode == "int8-from-qat":
        for fqn, m in model.named_modules():
            if type(m) is QATLinear and (m.activation != "per_token" or m.weight_bits != "int8"):
                if filter is None or filter(m, fqn):
                    raise ValueError(
                        f"{fqn} is a QATLinear with activation={m.activation!r}, weight={m.weight_bits!r}: only "
                        "activation='per_token', weight='int8' has an exact Int8Linear form (Int8Linear quantizes "
                        "activations per token and weights per output channel); skip it with filter="
                    )

    report = ConvertReport(mode=mode)
    report.model_bytes_before = _unique_bytes(_module_tensors(model))
    planner = _Planner(model, mode, filter, per_channel, qat, quantize_output, untie, head, embedding)
    planner.walk(model, "", set())
    plans = list(planner.plans.values())

    # Check and build everything before touching the model.
    for plan in plans:
        _check_finite(plan)
    built: dict[int, nn.Module] = {}
    for plan in plans:
        try:
            built[id(plan.old)] = plan.make()
        except (ValueError, TypeError, RuntimeError) as e:
            raise type(e)(f"{plan.fqn} ({type(plan.old).__name__}): {e}; convert changed nothing") from e

    report.bytes_before = _unique_bytes(t for plan in plans for t in _module_tensors(plan.old))
    report.bytes_after = _unique_bytes(t for new in built.values() for t in _module_tensors(new))
    for plan in plans:
        new = built[id(plan.old)]
        in_f, out_f = _features(plan.old)
        for parent, name, fqn in plan.sites:
            setattr(parent, name, new)
            report.swapped.append(
                Swap(fqn, type(plan.old).__name__, type(new).__name__, in_f, out_f, _runs(new), plan.note)
            )
    report.skipped = planner.skipped
    report.model_bytes_after = _unique_bytes(_module_tensors(model))
    return report
