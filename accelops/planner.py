"""Memory and strategy planner: per-device peak memory of training a language model under
each Trainer strategy, whether it fits, and a recommendation (strategy, micro-batch,
gradient accumulation) for a target global batch.

    accelops plan --model train.toml --devices 2 --device-memory 24GB --global-batch 64
    accelops.plan(TransformerLMConfig(...), devices=2, device_memory="24GB")  # -> Plan

The estimate is a sum of components, each from something exact or measured:

- parameters, gradients, optimizer state: counted from the model built on the meta device
  (what the training run stores: fp32 latent weights for "bitlinear" and "qat-int8", int8
  buffers without gradients for the inference form "int8") and from the optimizer's real
  state layout (AdamW: two fp32 moments + a step tensor a parameter; AdamW8bit: uint8 codes
  + one fp32 absmax per 256 values a moment, fp32 moments below MIN_8BIT_SIZE values);
- activations: the bytes autograd saves for backward, measured (saved_tensors_hooks, unique
  storages, parameters excluded) on a real forward of a 1- and a 2-block copy of the model
  at two batch sizes: per block and per token, plus a per-block constant (bitlinear's
  fake-quantized weights are saved once a forward). SDPA on CPU saves q, k, v, out and a
  logsumexp: linear in tokens, no seq^2 term;
- a backward working set (the gradients of one block's activations, or of the logits);
- communication buffers: DDP's buckets (a second copy of the gradients); FSDP's gathered
  block, one prefetched block, the unsharded gradients of one block and the reduce-scatter
  output (fsdp_submodule, the Trainer's fsdp_units="submodule" without backward prefetch:
  the largest unit of a block instead of the block, and no prefetched one); the
  pipeline's send/receive buffers;
- an optimizer-step temporary (torch AdamW on CPU runs its for-loop implementation: about
  two temporaries of the largest parameter);
- a fixed runtime overhead per device type (RSS above live tensors: gloo, the allocator,
  imported code), measured on this machine for CPU + gloo.

Gradients and activations do not peak together in a step without accumulation (the
Trainer frees gradients after each step, backward builds them while it frees
activations): peak = params + optimizer state + buffers + runtime + max(activations +
working set, gradients + step temporary); with accumulation > 1 (and in the pipeline,
which accumulates over micro-batches) the gradients are live during the next forward and
both count. Checked against measured peak RSS in bench/bench_plan.py (docs/results.md, "Memory and
strategy planner").
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import weakref
from dataclasses import dataclass, field

import torch

__all__ = [
    "plan",
    "Plan",
    "StrategyEstimate",
    "Recommendation",
    "ModelProfile",
    "profile_model",
    "parse_memory",
    "STRATEGIES",
    "OPTIMIZERS",
    "RUNTIME_OVERHEAD",
    "add_arguments",
    "run_args",
]

STRATEGIES = ("ddp", "zero1", "fsdp", "fsdp_submodule", "fsdp_offload", "pipeline")
# Preference when several fit: ddp is the fastest (one all-reduce, overlapped), zero1 costs one
# parameter broadcast more, fsdp gathers every block twice a step, fsdp_submodule makes
# twice the collectives without prefetch overlap, the pipeline idles in its bubble, offload
# moves everything over PCIe.
PREFERENCE = ("ddp", "zero1", "fsdp", "fsdp_submodule", "pipeline", "fsdp_offload")
# What each planner strategy is in the Trainer (the ones that are not just strategy=...).
TRAINER_SETTINGS = {
    "fsdp_submodule": "strategy='fsdp', fsdp_units='submodule', fsdp_backward_prefetch=False",
    "fsdp_offload": "strategy='fsdp', fsdp_cpu_offload=True",
}
OPTIMIZERS = ("adamw", "adamw8bit")
PIPELINE_SCHEDULES = ("1f1b", "gpipe")
MiB = 2**20
# RSS a training process holds above its live tensors. CPU + gloo: measured with
# bench/bench_scaleout.py (2 ranks, TransformerLM 25.5M; peak RSS growth minus the counted
# tensors, 40-50 MiB a rank; ~60 MiB a rank on another machine of the same kind with a
# fresh venv, which tests/test_plan.py measures before it checks the tensor terms). CUDA:
# the CUDA context + NCCL's buffers, not measured here (no GPU on this machine kind): the
# commonly seen ~1 GiB, an assumption.
RUNTIME_OVERHEAD = {"cpu": 40 * MiB, "cuda": 1024 * MiB}
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_memory(value) -> int:
    """'24GB' (10^9), '24GiB' (2^30), '512MiB', '1.5TB', or a number of bytes -> bytes."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        if value <= 0 or not math.isfinite(value):
            raise ValueError(f"device_memory must be a positive number of bytes, got {value!r}")
        return int(value)
    if not isinstance(value, str):
        raise TypeError(f"device_memory must be a string like '24GB' or a number of bytes, got {value!r}")
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(
            f"device_memory {value!r} is not a memory size: expected a number and a unit of "
            f"B, KB, MB, GB, TB (powers of 10) or KiB, MiB, GiB, TiB (powers of 2), e.g. '24GB'"
        )
    n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if n <= 0:
        raise ValueError(f"device_memory must be positive, got {value!r}")
    return int(n)


# --------------------------------------------------------------------------- the model's profile


@dataclass
class ModelProfile:
    """What the estimate needs of one model configuration (bytes; per token where named)."""

    name: str
    n_layers: int
    dim: int
    vocab_size: int
    n_params: int
    block_params: list  # numel of each trainable tensor of one block
    first_params: list  # trainable tensors outside the blocks before them (embeddings)
    last_params: list  # ... after them (final norm, LM head)
    block_frozen_bytes: int  # buffers of one block (int8 weights of quant="int8", observers)
    other_frozen_bytes: int
    act_block_per_token: float  # saved-for-backward bytes of one block per token
    act_block_const: float  # ... that do not scale with tokens (fake-quantized weights)
    act_rest_per_token: float  # embeddings, final norm, head, loss
    act_rest_const: float
    unit_params: int = 0  # numel of a block's largest FSDP unit under fsdp_units="submodule"

    @property
    def param_bytes(self) -> int:  # fp32 trainable parameters
        return 4 * (self.n_layers * sum(self.block_params) + sum(self.first_params) + sum(self.last_params))

    @property
    def frozen_bytes(self) -> int:
        return self.n_layers * self.block_frozen_bytes + self.other_frozen_bytes

    def block_bytes(self) -> int:
        return 4 * sum(self.block_params) + self.block_frozen_bytes

    def activations(self, tokens: int, n_blocks: int | None = None, head: bool = True) -> float:
        n = self.n_layers if n_blocks is None else n_blocks
        return n * (self.act_block_per_token * tokens + self.act_block_const) + (
            self.act_rest_per_token * tokens + self.act_rest_const if head else 0.0
        )

    def all_params(self) -> list:
        return self.first_params + self.block_params * self.n_layers + self.last_params


def _config_of(model_or_config, vocab_size=None, seq_len=None):
    """TransformerLMConfig / RNNLMConfig, a LanguageModel, a `[model]` dict, or a config file
    path (the `accelops train` format) -> (config, seq_len from the file or None)."""
    from .models import RNNLMConfig, TransformerLMConfig
    from .models._base import LanguageModel

    if isinstance(model_or_config, (TransformerLMConfig, RNNLMConfig)):
        return model_or_config, None
    if isinstance(model_or_config, LanguageModel):
        return model_or_config.config, None
    if isinstance(model_or_config, torch.nn.Module):
        raise TypeError(
            f"plan() needs an accelops language model (TransformerLM, RNNLM) or its config, got "
            f"{type(model_or_config).__name__}: the estimate counts the blocks of model.blocks"
        )
    file_seq = None
    if isinstance(model_or_config, (str, os.PathLike)):
        from .train.config import load_config, section

        full = load_config(model_or_config)
        model_cfg = section(full, "model", required=True)
        data = section(full, "data")
        file_seq = data.get("seq_len")
        if vocab_size is None and "vocab_size" not in model_cfg and data.get("path"):
            # the training run's vocabulary is every character of the text (CharVocab)
            with open(data["path"], encoding="utf-8") as f:
                vocab_size = len(set(f.read()))
    elif isinstance(model_or_config, dict):
        model_cfg = dict(model_or_config)
    else:
        raise TypeError(
            f"model must be a TransformerLMConfig/RNNLMConfig, a language model, a [model] dict or a "
            f"config file path, got {type(model_or_config).__name__}"
        )
    model_cfg = dict(model_cfg)
    if vocab_size is None:
        vocab_size = model_cfg.get("vocab_size")
    if vocab_size is None:
        raise ValueError(
            "the model's vocab_size is unknown: give it in the [model] table, as vocab_size=, or a "
            "[data] path to read it from"
        )
    from .train.config import build_model

    with torch.device("meta"):  # the trainer's own loader; meta: no memory, no initialisation
        model = build_model(model_cfg, vocab_size, seq_len or file_seq or model_cfg.get("max_len", 256))
    return model.config, file_seq


def _largest_submodule_unit(block) -> int:
    """Trainable numel of the largest FSDP unit of a block under fsdp_units="submodule": each
    large child (the Trainer's rule) and the rest of the block."""
    from .train.parallel.fsdp import large_children

    children = large_children(block)
    total = sum(_tensors_numel(block))
    if not children:
        return total
    sizes = [sum(_tensors_numel(child)) for _, child in children]
    return max(sizes + [total - sum(sizes)])


def _tensors_numel(module) -> list:
    return [p.numel() for p in module.parameters() if p.requires_grad]


def _buffer_bytes(module) -> int:
    frozen = sum(p.numel() * p.element_size() for p in module.parameters() if not p.requires_grad)
    return frozen + sum(b.numel() * b.element_size() for b in module.buffers())


def _saved_bytes(model, tokens) -> int:
    """Bytes autograd holds for backward after one forward + loss: unique storages of the
    saved tensors still alive (a node dropped during the forward frees what it saved, and
    its address may be reused), the model's own parameters and buffers excluded (they are
    counted as parameters)."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    refs = []

    def pack(t):
        refs.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(tokens, tokens)
    alive = {}
    for r in refs:
        t = r()
        if t is not None:
            s = t.untyped_storage()
            if s.data_ptr() not in own:
                alive[s.data_ptr()] = s.nbytes()
    del loss
    return sum(alive.values())


_PROFILES: dict = {}


def profile_model(config) -> ModelProfile:
    """Counts the parameters on the meta device and measures the activations on a real
    forward of 1- and 2-block copies (batch 1 and 2 of up to 16 tokens; a few ms at dim 512)."""
    from .models import RNNLM, RNNLMConfig, TransformerLM

    key = repr(config)
    if key in _PROFILES:
        return _PROFILES[key]
    cls = RNNLM if isinstance(config, RNNLMConfig) else TransformerLM
    with torch.device("meta"):
        meta = cls(config)
    block = meta.blocks[0]
    in_blocks = {id(p) for p in meta.blocks.parameters()}
    first, last, seen_first = [], [], False
    for name, p in meta.named_parameters():
        if id(p) in in_blocks:
            seen_first = True
        elif p.requires_grad:
            (last if seen_first else first).append(p.numel())
    other_frozen = _buffer_bytes(meta) - config.n_layers * _buffer_bytes(block)

    t = min(16, config.max_len)
    measured = {}
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    for n_layers in (1, 2):
        small = cls(dataclasses.replace(config, n_layers=n_layers, dropout=0.0))
        small.train()
        for b in (1, 2):
            tokens = torch.randint(0, config.vocab_size, (b, t))
            measured[n_layers, b] = _saved_bytes(small, tokens)
        del small
    torch.random.set_rng_state(state)
    per_block = {b: measured[2, b] - measured[1, b] for b in (1, 2)}
    rest = {b: measured[1, b] - per_block[b] for b in (1, 2)}
    prof = ModelProfile(
        name=f"{cls.__name__} dim {config.dim}, {config.n_layers} blocks, quant {config.quant}",
        n_layers=config.n_layers,
        dim=config.dim,
        vocab_size=config.vocab_size,
        n_params=sum(p.numel() for p in meta.parameters()),
        block_params=_tensors_numel(block),
        first_params=first,
        last_params=last,
        block_frozen_bytes=_buffer_bytes(block),
        other_frozen_bytes=other_frozen,
        act_block_per_token=(per_block[2] - per_block[1]) / t,
        act_block_const=2 * per_block[1] - per_block[2],
        act_rest_per_token=(rest[2] - rest[1]) / t,
        act_rest_const=2 * rest[1] - rest[2],
        unit_params=_largest_submodule_unit(block),
    )
    _PROFILES[key] = prof
    return prof


# --------------------------------------------------------------------------- optimizer state


def optimizer_state_bytes(numels, optimizer: str, shards: int = 1) -> int:
    """State bytes of `optimizer` for parameters of these sizes, each sharded `shards` ways
    (FSDP: every rank holds a dim-0 slice; accelops' 8-bit state is sized to the slice)."""
    from .optim import DEFAULT_BLOCK, MIN_8BIT_SIZE

    total = 0
    for n in numels:
        n = -(-n // shards)
        if optimizer == "adamw":
            total += 8 * n + 4  # exp_avg, exp_avg_sq fp32 + the step as a 1-element fp32 tensor
        elif n >= MIN_8BIT_SIZE:
            total += 2 * (n + 4 * -(-n // DEFAULT_BLOCK))  # m, v: uint8 codes + fp32 absmax a block
        else:
            total += 8 * n  # small tensors keep fp32 moments
    return total


def _zero_partition(numels, world: int) -> list:
    """ZeroRedundancyOptimizer's partition: parameters sorted by size, largest first, each to
    the rank with the fewest elements so far. -> the numels on each rank."""
    ranks = [[] for _ in range(world)]
    for n in sorted(numels, reverse=True):
        min(ranks, key=sum).append(n)
    return ranks


# --------------------------------------------------------------------------- the estimate


@dataclass
class StrategyEstimate:
    """Per-device peak of one strategy (bytes; the worst device: the pipeline's stages differ)."""

    strategy: str
    quant: str | None
    optimizer: str
    micro_batch: int  # sequences a device runs forward at once
    accumulation: int
    params: int
    grads: int
    optimizer_state: int
    activations: int
    working_set: int  # backward's gradients of one block's (or the logits') activations
    comm_buffers: int
    step_temporary: int
    runtime: int
    total: int
    peak_phase: str  # "backward" or "optimizer step"
    fits: bool = False
    host_bytes: int = 0  # fsdp_offload: what lives in host memory instead
    per_stage: list = field(default_factory=list)  # pipeline: the total of every stage
    note: str = ""

    def breakdown(self) -> dict:
        return {
            k: getattr(self, k)
            for k in (
                "params",
                "grads",
                "optimizer_state",
                "activations",
                "working_set",
                "comm_buffers",
                "step_temporary",
                "runtime",
            )
        }


@dataclass
class Recommendation:
    strategy: str | None
    micro_batch: int | None
    accumulation: int | None
    global_batch: int
    reason: str


@dataclass
class Plan:
    model: str
    n_params: int
    devices: int
    device_memory: int
    usable_memory: int  # device_memory * (1 - headroom)
    device_type: str
    seq_len: int
    optimizer: str
    estimates: list  # StrategyEstimate for every strategy and quant mode
    recommendations: dict  # quant mode -> Recommendation

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def estimate(self, strategy: str, quant="same") -> StrategyEstimate:
        for e in self.estimates:
            if e.strategy == strategy and (quant == "same" or e.quant == quant):
                return e
        raise KeyError(f"no estimate for strategy {strategy!r}, quant {quant!r}")


def estimate(
    prof: ModelProfile,
    strategy: str,
    devices: int,
    micro_batch: int,
    seq_len: int,
    optimizer: str = "adamw",
    accumulation: int = 1,
    device_type: str = "cpu",
    n_microbatches: int = 4,
    schedule: str = "1f1b",
    quant=None,
) -> StrategyEstimate:
    """Per-device peak bytes of one strategy. micro_batch: sequences a device runs forward
    at once (the pipeline: a micro-batch, of which the schedule runs n_microbatches a step)."""
    n = devices
    tokens = micro_batch * seq_len
    runtime = RUNTIME_OVERHEAD[device_type]
    block_act = prof.activations(tokens, 1, head=False)
    # backward holds the gradients of one block's saved tensors, or of the logits (+ log-softmax)
    working = max(block_act, 2 * 4 * tokens * prof.vocab_size)
    all_numels = prof.all_params()
    p_bytes = prof.param_bytes
    largest = 4 * max(all_numels)
    step_tmp = 2 * largest if optimizer == "adamw" else largest
    acc = accumulation > 1
    if strategy == "pipeline":
        if prof.n_layers < n:
            raise ValueError(
                f"strategy 'pipeline' needs at least one block a stage: the model has {prof.n_layers} "
                f"blocks for {n} devices"
            )
        cuts = [round(i * prof.n_layers / n) for i in range(n + 1)]
        stages = []
        for s in range(n):
            blocks = cuts[s + 1] - cuts[s]
            numels = (
                (prof.first_params if s == 0 else [])
                + prof.block_params * blocks
                + (prof.last_params if s == n - 1 else [])
            )
            params = 4 * sum(numels) + blocks * prof.block_frozen_bytes
            grads = 4 * sum(numels)
            opt = optimizer_state_bytes(numels, optimizer)
            # 1F1B: stage s runs n - s warm-up forwards and one more before its first backward;
            # GPipe runs every micro-batch's forward first
            in_flight = n_microbatches if schedule == "gpipe" else min(n_microbatches, n - s + 1)
            acts = in_flight * (prof.activations(tokens, blocks, head=(s == n - 1)))
            comm = 2 * 4 * tokens * prof.dim  # the activation received and the gradient sent back
            tmp = (2 if optimizer == "adamw" else 1) * 4 * max(numels)
            # the pipeline accumulates gradients over micro-batches: they are live with activations
            total = params + grads + opt + comm + runtime + max(acts + working, tmp)
            stages.append(
                dict(
                    params=params,
                    grads=grads,
                    optimizer_state=opt,
                    activations=int(acts),
                    working_set=int(working),
                    comm_buffers=comm,
                    step_temporary=tmp,
                    total=int(total),
                    peak_phase="backward" if acts + working >= tmp else "optimizer step",
                )
            )
        worst = max(stages, key=lambda d: d["total"])
        return StrategyEstimate(
            strategy,
            quant,
            optimizer,
            micro_batch,
            accumulation,
            runtime=runtime,
            fits=False,
            per_stage=[d["total"] for d in stages],
            note=f"{n} stages at block boundaries {cuts[1:-1]}, {schedule}, {n_microbatches} micro-batches",
            **worst,
        )
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    acts = prof.activations(tokens)
    host = 0
    note = ""
    if strategy in ("ddp", "zero1"):
        params = p_bytes + prof.frozen_bytes
        grads = p_bytes
        comm = p_bytes if n > 1 else 0  # DDP's gradient buckets: a second copy of the gradients
        if strategy == "ddp":
            opt = optimizer_state_bytes(all_numels, optimizer)
        else:
            opt = max(optimizer_state_bytes(part, optimizer) for part in _zero_partition(all_numels, n))
            largest = 4 * max(max(part) for part in _zero_partition(all_numels, n) if part)
            step_tmp = 2 * largest if optimizer == "adamw" else largest
    else:  # fsdp, fsdp_submodule, fsdp_offload: every block sharded, then the root (embeddings, norm, head)
        shard = -(-p_bytes // n)
        if strategy == "fsdp_submodule":
            # one unit (the largest of a block) gathered, none prefetched, its unsharded
            # gradients and their shard; the block's buffers counted whole
            unit = 4 * prof.unit_params
            comm = unit + prof.block_frozen_bytes + unit + -(-unit // n)
        else:
            block = prof.block_bytes()
            # the gathered block + the one prefetched, the block's unsharded gradients before
            # reduce-scatter and its output shard
            comm = 2 * block + 4 * sum(prof.block_params) + -(-4 * sum(prof.block_params) // n)
        comm += 4 * (sum(prof.first_params) + sum(prof.last_params))  # the root stays gathered
        params, grads = shard + prof.frozen_bytes, shard
        opt = optimizer_state_bytes(all_numels, optimizer, shards=n)
        step_tmp = -(-step_tmp // n)
        if strategy == "fsdp_offload":
            if device_type == "cpu":
                note = "on CPU the offload policy moves nothing: same as fsdp"
            else:
                # sharded parameters, gradients and optimizer state live in host memory; the step runs there
                host = params + grads + opt
                params = grads = opt = step_tmp = 0
                note = f"host memory per device: {host / 2**30:.2f} GiB"
        if strategy == "fsdp_submodule":
            note = f"Trainer: {TRAINER_SETTINGS[strategy]}"
    grads_live = grads if acc else 0
    backward = acts + working + grads_live
    step = grads + step_tmp
    total = params + opt + comm + runtime + max(backward, step)
    return StrategyEstimate(
        strategy,
        quant,
        optimizer,
        micro_batch,
        accumulation,
        params,
        grads,
        opt,
        int(acts),
        int(working),
        int(comm),
        int(step_tmp),
        runtime,
        int(total),
        "backward" if backward >= step else "optimizer step",
        host_bytes=int(host),
        note=note,
    )


def _positive(name, value):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _recommend(
    prof, strategies, devices, usable, seq_len, optimizer, global_batch, device_type, n_micro, schedule, quant
) -> Recommendation:
    data_parallel = [s for s in PREFERENCE if s in strategies and s != "pipeline"]
    if global_batch % devices and any(s != "pipeline" for s in strategies):
        raise ValueError(
            f"global_batch {global_batch} must be divisible by devices {devices} (data-parallel "
            f"strategies split it evenly)"
        )
    why = []
    for s in PREFERENCE:
        if s not in strategies:
            continue
        if s == "pipeline":
            if prof.n_layers < devices:
                why.append("pipeline: fewer blocks than devices")
                continue
            # one pipeline over all devices: a step runs global/acc sequences in n_micro micro-batches
            for acc in range(1, global_batch + 1):
                if global_batch % acc or (global_batch // acc) % n_micro:
                    continue
                micro = global_batch // acc // n_micro
                e = estimate(prof, s, devices, micro, seq_len, optimizer, acc, device_type, n_micro, schedule, quant)
                if e.total <= usable:
                    return Recommendation(
                        s,
                        micro,
                        acc,
                        global_batch,
                        f"{', '.join(why) + '; ' if why else ''}pipeline fits with micro-batches "
                        f"of {micro} ({n_micro} a step, accumulation {acc}): "
                        f"{e.total / 2**30:.2f} GiB a device",
                    )
            why.append("pipeline: does not fit even with micro-batches of 1")
            continue
        per_device = global_batch // devices
        best = None
        for micro in range(per_device, 0, -1):  # the largest micro-batch that fits: fewest accumulation steps
            if per_device % micro:
                continue
            e = estimate(
                prof, s, devices, micro, seq_len, optimizer, per_device // micro, device_type, n_micro, schedule, quant
            )
            if e.total <= usable:
                best = e
                break
        if best is not None:
            first = s == data_parallel[0] if data_parallel else True
            return Recommendation(
                s,
                best.micro_batch,
                best.accumulation,
                global_batch,
                f"{', '.join(why) + '; ' if why else ''}{s} "
                f"{'is the fastest strategy and ' if first and not why else ''}fits with "
                f"micro-batch {best.micro_batch} x accumulation {best.accumulation} a device: "
                f"{best.total / 2**30:.2f} GiB of {usable / 2**30:.2f} GiB usable"
                + (f" (Trainer: {TRAINER_SETTINGS[s]})" if s in TRAINER_SETTINGS else ""),
            )
        why.append(f"{s} does not fit even with micro-batch 1")
    return Recommendation(
        None,
        None,
        None,
        global_batch,
        "; ".join(why) + ": nothing fits; more devices, a quantized model, adamw8bit or shorter "
        "sequences would shrink it",
    )


def plan(
    model_or_config,
    devices: int = 1,
    device_memory="24GB",
    *,
    quant="same",
    optimizer: str = "adamw",
    seq_len: int | None = None,
    batch_size: int | None = None,
    global_batch: int | None = None,
    strategies=STRATEGIES,
    device_type: str = "cpu",
    headroom: float = 0.1,
    n_microbatches: int = 4,
    pipeline_schedule: str = "1f1b",
    vocab_size: int | None = None,
) -> Plan:
    """Per-device memory of every strategy (and quant mode) and a recommendation.

    model_or_config: TransformerLMConfig / RNNLMConfig, an accelops language model, a
    `[model]` dict (needs vocab_size) or an `accelops train` config file. quant: "same" (the
    config's), one of models.QUANTS, a list of them, or "all". batch_size: sequences a device
    runs at once for the per-strategy table (default global_batch / devices, or 8);
    global_batch: the target of the recommendation (default batch_size * devices).
    headroom: the fraction of device_memory kept free (fragmentation, the unexpected)."""
    from .models import QUANTS

    _positive("devices", devices)
    mem = parse_memory(device_memory)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if device_type not in RUNTIME_OVERHEAD:
        raise ValueError(f"device_type must be one of {sorted(RUNTIME_OVERHEAD)}, got {device_type!r}")
    if isinstance(strategies, str):
        strategies = [strategies]
    strategies = list(strategies)
    for s in strategies:
        if s not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {s!r}")
    if pipeline_schedule not in PIPELINE_SCHEDULES:
        raise ValueError(f"pipeline_schedule must be one of {PIPELINE_SCHEDULES}, got {pipeline_schedule!r}")
    _positive("n_microbatches", n_microbatches)
    if not isinstance(headroom, numbers.Real) or not 0 <= headroom < 1:
        raise ValueError(f"headroom must be a fraction in [0, 1), got {headroom!r}")
    config, file_seq = _config_of(model_or_config, vocab_size, seq_len)
    seq_len = seq_len or file_seq or config.max_len
    _positive("seq_len", seq_len)
    if seq_len > config.max_len:
        raise ValueError(f"seq_len {seq_len} is longer than the model's max_len {config.max_len}")
    if quant == "same":
        quants = [config.quant]
    elif quant == "all":
        quants = list(QUANTS)
    else:
        quants = list(quant) if isinstance(quant, (list, tuple)) else [quant]
        quants = [None if isinstance(q, str) and q.lower() in ("none", "fp32") else q for q in quants]
        for q in quants:
            if q not in QUANTS:
                raise ValueError(f"quant must be one of {QUANTS} (or 'all', 'same'), got {q!r}")
    if global_batch is not None:
        _positive("global_batch", global_batch)
    if batch_size is not None:
        _positive("batch_size", batch_size)
    if batch_size is None:
        batch_size = global_batch // devices if global_batch and global_batch >= devices else 8
    if global_batch is None:
        global_batch = batch_size * devices
    usable = int(mem * (1 - headroom))
    estimates, recs = [], {}
    prof = None
    for q in quants:
        prof = profile_model(dataclasses.replace(config, quant=q))
        for s in strategies:
            if s == "pipeline" and prof.n_layers < devices:
                continue
            if s == "pipeline":
                micro = max(1, batch_size * devices // n_microbatches)  # the same global batch as the others
            else:
                micro = batch_size
            e = estimate(
                prof, s, devices, micro, seq_len, optimizer, 1, device_type, n_microbatches, pipeline_schedule, q
            )
            e.fits = e.total <= usable
            estimates.append(e)
        recs[str(q)] = _recommend(
            prof,
            strategies,
            devices,
            usable,
            seq_len,
            optimizer,
            global_batch,
            device_type,
            n_microbatches,
            pipeline_schedule,
            q,
        )
    return Plan(
        prof.name if len(quants) == 1 else prof.name.rsplit(", quant", 1)[0],
        prof.n_params,
        devices,
        mem,
        usable,
        device_type,
        seq_len,
        optimizer,
        estimates,
        recs,
    )


# --------------------------------------------------------------------------- the command


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="config file (the `accelops train` format: a [model] table)")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--device-memory", default="24GB", help="e.g. 24GB (10^9 bytes), 24GiB, 512MiB")
    p.add_argument("--device-type", default="cpu", choices=sorted(RUNTIME_OVERHEAD))
    p.add_argument(
        "--quant",
        default="same",
        help="the config's (same), 'all', or comma-separated of none, bitlinear, int8, qat-int8",
    )
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    p.add_argument("--seq-len", type=int, default=None, help="default: data.seq_len of the config, or max_len")
    p.add_argument("--batch-size", type=int, default=None, help="sequences a device runs at once in the table")
    p.add_argument("--global-batch", type=int, default=None, help="target global batch of the recommendation")
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--n-microbatches", type=int, default=4)
    p.add_argument("--pipeline-schedule", default="1f1b", choices=PIPELINE_SCHEDULES)
    p.add_argument("--headroom", type=float, default=0.1)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def format_plan(result: Plan) -> str:
    mib = lambda b: f"{b / MiB:,.0f}"  # noqa: E731
    lines = [
        f"{result.model}: {result.n_params / 1e6:.1f}M parameters, {result.devices} {result.device_type} "
        f"device(s) of {result.device_memory / 2**30:.2f} GiB ({result.usable_memory / 2**30:.2f} GiB usable), "
        f"seq {result.seq_len}, optimizer {result.optimizer}",
        "",
        "| quant | strategy | micro-batch | params | grads | optim | acts | working | buffers | step tmp | "
        "runtime | total MiB / device | peak at | fits | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in result.estimates:
        lines.append(
            f"| {e.quant} | {e.strategy} | {e.micro_batch} | {mib(e.params)} | {mib(e.grads)} | "
            f"{mib(e.optimizer_state)} | {mib(e.activations)} | {mib(e.working_set)} | {mib(e.comm_buffers)} | "
            f"{mib(e.step_temporary)} | {mib(e.runtime)} | {mib(e.total)} | {e.peak_phase} | "
            f"{'yes' if e.fits else 'no'} | {e.note or ''} |"
        )
    lines.append("")
    for q, r in result.recommendations.items():
        head = f"Recommendation (quant {q}, global batch {r.global_batch}): "
        if r.strategy is None:
            lines.append(head + "none. " + r.reason)
        else:
            lines.append(
                head + f"{r.strategy}, micro-batch {r.micro_batch}, accumulation {r.accumulation}. " + r.reason
            )
    return "\n".join(lines)


def run_args(args) -> int:
    import sys

    quant = args.quant
    if quant not in ("same", "all"):
        quant = [q.strip() for q in quant.split(",") if q.strip()]
    try:
        result = plan(
            args.model,
            args.devices,
            args.device_memory,
            quant=quant,
            optimizer=args.optimizer,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            global_batch=args.global_batch,
            strategies=[s.strip() for s in args.strategies.split(",") if s.strip()],
            device_type=args.device_type,
            headroom=args.headroom,
            n_microbatches=args.n_microbatches,
            pipeline_schedule=args.pipeline_schedule,
            vocab_size=args.vocab_size,
        )
    except (ValueError, TypeError, FileNotFoundError) as exc:
        from .cli import debug_enabled, one_line

        if debug_enabled():  # ACCELOPS_DEBUG=1: the traceback, as every accelops command gives it
            raise
        print(f"accelops plan: error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_plan(result))
    return 0
