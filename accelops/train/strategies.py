"""Parallelism strategies of the Trainer: "ddp" (the default), "fsdp", "zero1", "pipeline".

accelops adds glue and checks around PyTorch's own engines and never a transport of its own:

- "ddp": DistributedDataParallel (the Trainer's original path), one checkpoint file.
- "fsdp": FSDP2 (`torch.distributed.fsdp.fully_shard`) per model block (or, with
  fsdp_units="submodule", also per large child of a block: attention, FFN), then the root;
  MixedPrecisionPolicy from `precision`; optional CPUOffloadPolicy. Checkpoints are
  torch.distributed.checkpoint directories (each rank writes its own shards, no rank gathers
  the model) that load on another world size.
- "zero1": `torch.distributed.optim.ZeroRedundancyOptimizer` over DDP: the optimizer state is
  sharded, parameters and gradients are replicated. The checkpoint consolidates the optimizer
  state on rank 0 into the ordinary checkpoint file.
- "pipeline": `torch.distributed.pipelining` (PipelineStage + ScheduleGPipe / Schedule1F1B),
  one stage per rank, the model cut at block boundaries. Checkpoints hold a file per stage.

The Trainer calls a Strategy at a few clear points (set-up, no_sync, the step for pipeline,
evaluation, checkpoints, failures); everything strategy-specific lives here.
"""
from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
import warnings

import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from .checkpoint import load_checkpoint, save_checkpoint

__all__ = ["STRATEGIES", "PIPELINE_SCHEDULES", "make_strategy", "full_model_state_dict", "balance_stages"]

log = logging.getLogger("accelops.train")

STRATEGIES = ("ddp", "fsdp", "zero1", "pipeline")
PIPELINE_SCHEDULES = ("gpipe", "1f1b")
FSDP_UNITS = ("block", "submodule")


def _to_device(batch, device):
    from .trainer import _to_device as move

    return move(batch, device)


# --------------------------------------------------------------------------- the choice and its checks

def make_strategy(strategy, *, compression=None, precision="32", loss_fn=None, pipeline_schedule="1f1b",
                  n_microbatches=None, pipeline_split=None, fsdp_cpu_offload=False, loss_weights=None,
                  fsdp_units="block", fsdp_backward_prefetch=True):
    """Validates the strategy and its combination with the other Trainer options -> a Strategy
    (not yet set up: Strategy.setup(trainer) does that once the process group exists)."""
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if pipeline_schedule not in PIPELINE_SCHEDULES:
        raise ValueError(f"pipeline_schedule must be one of {PIPELINE_SCHEDULES}, got {pipeline_schedule!r}")
    if n_microbatches is not None and (isinstance(n_microbatches, bool) or not isinstance(n_microbatches, int)
                                       or n_microbatches < 1):
        raise ValueError(f"n_microbatches must be a positive int or None, got {n_microbatches!r}")
    if not isinstance(fsdp_cpu_offload, bool):
        raise ValueError(f"fsdp_cpu_offload must be True or False, got {fsdp_cpu_offload!r}")
    if not isinstance(fsdp_units, str) or fsdp_units not in FSDP_UNITS:
        raise ValueError(f"fsdp_units must be one of {FSDP_UNITS}, got {fsdp_units!r}")
    if not isinstance(fsdp_backward_prefetch, bool):
        raise ValueError(f"fsdp_backward_prefetch must be True or False, got {fsdp_backward_prefetch!r}")
    if strategy != "pipeline":
        for name, value, default in (("pipeline_split", pipeline_split, None), ("n_microbatches", n_microbatches, None),
                                     ("pipeline_schedule", pipeline_schedule, "1f1b")):
            if value != default:
                raise ValueError(f"{name}={value!r} applies to strategy='pipeline', not strategy={strategy!r}")
    if strategy != "fsdp":
        for name, value, default in (("fsdp_cpu_offload", fsdp_cpu_offload, False), ("fsdp_units", fsdp_units, "block"),
                                     ("fsdp_backward_prefetch", fsdp_backward_prefetch, True)):
            if value != default:
                raise ValueError(f"{name}={value!r} applies to strategy='fsdp', not strategy={strategy!r}")
    if compression is not None and strategy in ("fsdp", "pipeline"):
        what = ("FSDP reduce-scatters the gradients itself" if strategy == "fsdp"
                else "the pipeline sends activations between stages, it all-reduces no gradients")
        raise ValueError(f"compression={compression!r} is a DDP communication hook and cannot be combined with "
                         f"strategy={strategy!r}: {what}. Use strategy='ddp' or 'zero1' for compression")
    if strategy in ("fsdp", "pipeline") and precision == "16-mixed":
        raise ValueError(f"precision='16-mixed' (fp16 with a GradScaler) is not supported with strategy="
                         f"{strategy!r}: use precision='bf16-mixed' or '32'")
    if strategy == "pipeline" and loss_fn is not None:
        raise ValueError("strategy='pipeline' computes the loss on the last stage with the model's own loss "
                         "(cross-entropy of accelops.models): loss_fn cannot be combined with it")
    if strategy == "pipeline" and loss_weights is not None:
        raise ValueError(f"loss_weights={loss_weights!r} weighs named losses of a loss_fn / model returning a dict; "
                         "strategy='pipeline' computes the model's single cross-entropy on the last stage")
    if strategy == "fsdp":
        return FSDPStrategy(precision, fsdp_cpu_offload, fsdp_units, fsdp_backward_prefetch)
    if strategy == "zero1":
        return Zero1Strategy()
    if strategy == "pipeline":
        return PipelineStrategy(pipeline_schedule, n_microbatches, pipeline_split)
    return DDPStrategy()


# --------------------------------------------------------------------------- base: DDP

class DDPStrategy:
    """The Trainer's original path. Also the base class: its methods are what a strategy
    that changes nothing at a given point does."""

    name = "ddp"
    uses_ddp = True       # the Trainer wraps the model in DDP (and registers compression hooks)
    owns_step = False     # the Trainer's own micro-batch loop runs the step
    owns_eval = False

    def __init__(self):
        self.dp_rank, self.dp_world = 0, 1
        self.env = self.model = self.optimizer = None

    def setup(self, trainer) -> None:
        self.dp_rank, self.dp_world = trainer.rank, trainer.world_size
        self.env, self.model, self.optimizer = trainer.env, trainer.model, trainer.optimizer

    def no_sync(self, trainer):
        return trainer.ddp.no_sync() if trainer.ddp is not None else contextlib.nullcontext()

    def before_save(self) -> None:
        """Called on every rank before rank 0 reads optimizer.state_dict()."""

    def describe(self) -> dict:
        return {"name": self.name}

    reshards_on_load = False   # a sharded checkpoint of another world size loads (fsdp)

    @property
    def checkpoint_layout(self) -> str:
        """How its checkpoints are laid out (accelops.train.checkpoint): "file", "dcp" or "pp"."""
        return "file"

    def write_shards(self, directory: str) -> None:
        """A sharded layout: writes this rank's part of a checkpoint into directory."""
        raise NotImplementedError(f"strategy={self.name!r} writes checkpoint files, not shards")

    def read_shards(self, directory: str, trainer_state: dict) -> None:
        """A sharded layout: loads this rank's part of the checkpoint in directory."""
        raise NotImplementedError(f"strategy={self.name!r} reads checkpoint files, not shards")


# --------------------------------------------------------------------------- helpers shared by fsdp and pipeline

def _names_by_group(model, optimizer) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def _check_fresh_optimizer(optimizer, strategy) -> None:
    if any(len(s) for s in optimizer.state.values()):
        raise ValueError(f"strategy={strategy!r} rebuilds the optimizer's parameter lists: pass an optimizer that "
                         "has not stepped yet (its state is restored from checkpoints by the Trainer)")


# --------------------------------------------------------------------------- fsdp

@contextlib.contextmanager
def _quiet_single(distributed: bool):
    # DCP warns that it "assumes" a single process when there is no process group: here that
    # is the intent (one process reading or writing a checkpoint any world size can load).
    with warnings.catch_warnings():
        if not distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class FSDPStrategy(DDPStrategy):
    name = "fsdp"
    uses_ddp = False
    owns_eval = True
    # DCP reshards on load: a checkpoint loads on another world size
    reshards_on_load = True
    # DCP directories even on one process, so one process reads what several wrote
    checkpoint_layout = "dcp"

    def __init__(self, precision: str, cpu_offload: bool, units: str = "block", backward_prefetch: bool = True):
        super().__init__()
        self.precision, self.cpu_offload = precision, cpu_offload
        self.units, self.backward_prefetch = units, backward_prefetch
        self.sharded_blocks = 0
        self.sharded_units: list[str] = []   # qualified names of the modules fully_shard was applied to

    def describe(self) -> dict:
        return {"name": self.name, "cpu_offload": self.cpu_offload, "units": self.units,
                "backward_prefetch": self.backward_prefetch}

    def setup(self, trainer) -> None:
        super().setup(trainer)
        if not trainer.distributed:
            # One process: nothing to shard. The checkpoints are still DCP directories, so a
            # single-process run reads (and writes) what a sharded run wrote.
            if self.cpu_offload:
                warnings.warn("fsdp_cpu_offload=True has no effect in a single-process run", stacklevel=4)
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        model, optimizer = trainer.model, trainer.optimizer
        _check_fresh_optimizer(optimizer, self.name)
        groups = _names_by_group(model, optimizer)
        mesh = init_device_mesh(trainer.device.type, (trainer.world_size,))
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if self.precision == "bf16-mixed" else MixedPrecisionPolicy())
        if self.cpu_offload and trainer.device.type == "cpu":
            warnings.warn("fsdp_cpu_offload=True on a CPU run: parameters and optimizer state already live in "
                          "host memory, so the offload policy moves nothing", stacklevel=4)
        offload = CPUOffloadPolicy() if self.cpu_offload and trainer.device.type != "cpu" else OffloadPolicy()
        blocks = getattr(model, "blocks", None)
        units = []
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) and not self._shares_across(model, blocks):
            for i, block in enumerate(blocks):
                if self.units == "submodule":
                    for name, child in self._large_children(block):
                        fully_shard(child, mesh=mesh, mp_policy=mp, offload_policy=offload)
                        units.append((f"blocks.{i}.{name}", child))
                fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload)
                units.append((f"blocks.{i}", block))
            self.sharded_blocks = len(blocks)
        elif isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            warnings.warn("the model's blocks share parameters (accelops.sharing): FSDP shards the model as one "
                          "unit (the whole model is gathered for each forward)", stacklevel=4)
        fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
        units.append(("", model))
        self.sharded_units = [name for name, _ in units]
        if not self.backward_prefetch:
            # FSDP2's implicit backward prefetch all-gathers the unit that runs next while
            # this one computes: one more unit's parameters held at the backward's peak. An
            # explicit prefetch list replaces the implicit one, and a unit prefetching only
            # itself (already gathered by then) prefetches nothing.
            for _, module in units:
                module.set_modules_to_backward_prefetch([module])
        params = dict(model.named_parameters())
        for group, names in zip(optimizer.param_groups, groups):
            group["params"] = [params[n] for n in names]

    @staticmethod
    def _large_children(block) -> list:
        """The direct children of a block that get their own FSDP unit under
        fsdp_units="submodule": those holding at least 10% of the block's parameters
        (attention, FFN; an RNN cell), while norms and other small ones stay in the block's
        unit rather than costing a collective each. A child sharing a parameter with another
        part of the block keeps the whole block one unit (a parameter has one owner)."""
        total = sum(p.numel() for p in block.parameters())
        owners = {}
        for name, child in block.named_children():
            for p in child.parameters():
                owners.setdefault(id(p), set()).add(name)
        direct = {id(p) for p in block.parameters(recurse=False)}
        if any(len(o) > 1 or pid in direct for pid, o in owners.items()):
            return []
        chosen = [(name, child) for name, child in block.named_children()
                  if total and sum(p.numel() for p in child.parameters()) >= 0.1 * total]
        # A child holding all of the block's parameters is the block: nothing to split.
        if len(chosen) == 1 and sum(p.numel() for p in chosen[0][1].parameters()) == total:
            return []
        return chosen

    @staticmethod
    def _shares_across(model, blocks) -> bool:
        owner = {}
        for i, block in enumerate(blocks):
            for p in block.parameters():
                if owner.setdefault(id(p), i) != i:
                    return True
        inside = set(owner)
        rest = [p for n, p in model.named_parameters(remove_duplicate=False) if not n.startswith("blocks.")]
        return any(id(p) in inside for p in rest)

    def no_sync(self, trainer):
        if not trainer.distributed:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def ctx():
            trainer.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                trainer.model.set_requires_gradient_sync(True)
        return ctx()

    def eval_totals(self, trainer, indices):
        # FSDP's forward all-gathers: every rank runs the same number of forwards (a rank
        # with fewer batches repeats its last one with weight 0).
        w, b = trainer.world_size, trainer.batch_size
        n = max(-(-len(indices[k::w]) // b) for k in range(w))
        return trainer._eval_totals(indices[trainer.rank::w], n_batches=n)

    # DCP: each rank saves and loads only its shards; the metadata lets another world size
    # read them (DCP reshards on load).
    def write_shards(self, directory):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        with _quiet_single(self.env.distributed):
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(directory, "dcp"),
                     no_dist=not self.env.distributed)

    def read_shards(self, directory, trainer_state):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with _quiet_single(self.env.distributed):
            dcp.load(state, checkpoint_id=os.path.join(directory, "dcp"), no_dist=not self.env.distributed)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])


# --------------------------------------------------------------------------- zero1

class Zero1Strategy(DDPStrategy):
    """DDP for the gradients (with its compression hooks, which ZeRO leaves alone: it only
    partitions the optimizer step), ZeroRedundancyOptimizer for the optimizer state."""

    name = "zero1"

    def setup(self, trainer) -> None:
        super().setup(trainer)
        if not trainer.distributed:
            return
        from torch.distributed.optim import ZeroRedundancyOptimizer

        old = trainer.optimizer
        _check_fresh_optimizer(old, self.name)
        import inspect

        accepted = set(inspect.signature(type(old).__init__).parameters) - {"self", "params"}
        # a group also holds keys the constructor does not take (AdamW's decoupled_weight_decay,
        # a scheduler's initial_lr): those ride on the groups, not the constructor
        groups = [dict(g) for g in old.param_groups]
        zero = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=type(old),
                                       **{k: v for k, v in groups[0].items() if k in accepted})
        for k, v in groups[0].items():
            if k != "params":
                zero.param_groups[0].setdefault(k, v)
        for g in groups[1:]:
            zero.add_param_group(g)
        if trainer.scheduler is not None:
            if getattr(trainer.scheduler, "optimizer", None) is not old:
                raise ValueError("strategy='zero1' replaces the optimizer with a ZeroRedundancyOptimizer: the "
                                 "scheduler must be built on the optimizer passed to the Trainer")
            trainer.scheduler.optimizer = zero
            step = zero.step

            def tracked(*args, **kwargs):  # what LRScheduler's own patch of optimizer.step records
                zero._opt_called = True
                return step(*args, **kwargs)

            tracked._wrapped_by_lr_sched = True
            zero.step = tracked
        trainer.optimizer = self.optimizer = zero

    def before_save(self) -> None:
        if self.env.distributed:
            self.optimizer.consolidate_state_dict(to=0)


# --------------------------------------------------------------------------- pipeline

class _Stage(torch.nn.Module):
    """One pipeline stage of a TransformerLM / RNNLM: the embeddings on the first, blocks
    [lo, hi), the final norm and the LM head on the last. It holds the model's own modules."""

    def __init__(self, model, lo: int, hi: int, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        self.tok_emb = model.tok_emb if first else None
        self.pos_emb = getattr(model, "pos_emb", None) if first else None
        self.drop = model.drop if first else None
        self.blocks = torch.nn.ModuleList(model.blocks[lo:hi])
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.lo, self.hi = lo, hi

    def forward(self, x):
        if self.first:
            h = self.tok_emb(x)
            if self.pos_emb is not None:
                h = h + self.pos_emb(torch.arange(x.shape[1], device=x.device))
            x = self.drop(h)
        for block in self.blocks:
            x = block(x)
        if self.last:
            x = torch.nn.functional.linear(self.norm(x), self.lm_head.weight)
        return x


def balance_stages(costs_blocks, n_stages: int, first_cost: float = 0.0, last_cost: float = 0.0) -> list[int]:
    """Contiguous split of blocks with the given costs into n_stages minimising the costliest
    stage (the first also pays first_cost, the last last_cost) -> the block index where each
    stage after the first starts (len n_stages - 1)."""
    n = len(costs_blocks)
    prefix = [0.0]
    for c in costs_blocks:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the smallest max-cost of putting blocks [0, i) into stages 0..s-1
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for i in range(n + 1):
            for j in range(i + 1):
                cost = prefix[i] - prefix[j] + (first_cost if s == 1 else 0.0) \
                    + (last_cost if s == n_stages else 0.0)
                val = max(best[s - 1][j], cost)
                if val < best[s][i] - 1e-12:
                    best[s][i], cut[s][i] = val, j
    bounds, i = [], n
    for s in range(n_stages, 1, -1):
        i = cut[s][i]
        bounds.append(i)
    return bounds[::-1]


class PipelineStrategy(DDPStrategy):
    name = "pipeline"
    uses_ddp = False
    owns_step = True
    owns_eval = True

    @property
    def checkpoint_layout(self) -> str:
        # a file per stage when there are stages; one process writes the Trainer's file
        return "pp" if self.env.distributed else "file"

    def __init__(self, schedule: str, n_microbatches, split):
        super().__init__()
        self.schedule_name, self.n_microbatches_opt, self.split_opt = schedule, n_microbatches, split
        self.split = None
        self.block_costs = None
        self.stage = None

    def describe(self) -> dict:
        return {"name": self.name, "schedule": self.schedule_name, "split": self.split}

    def setup(self, trainer) -> None:
        from ..models._base import LanguageModel

        super().setup(trainer)
        self.dp_rank, self.dp_world = 0, 1   # every stage reads the same batches
        model = trainer.model
        if not isinstance(model, LanguageModel) or not isinstance(getattr(model, "blocks", None),
                                                                  torch.nn.ModuleList):
            raise ValueError("strategy='pipeline' splits accelops.models' TransformerLM / RNNLM at block "
                             f"boundaries; got a {type(model).__name__}")
        n_stages, n_layers = trainer.world_size, len(model.blocks)
        if trainer.accumulate_grad_batches * trainer.batch_size % self._n_micro(trainer):
            raise ValueError(f"n_microbatches={self._n_micro(trainer)} must divide the step's "
                             f"accumulate_grad_batches x batch_size = "
                             f"{trainer.accumulate_grad_batches * trainer.batch_size} samples")
        if not trainer.distributed:
            if self.split_opt is not None and list(self.split_opt) != []:
                raise ValueError(f"pipeline_split={self.split_opt!r} needs {len(self.split_opt) + 1} processes, "
                                 "this run has 1")
            self.split = []
            return
        if self.schedule_name == "1f1b" and self._n_micro(trainer) < n_stages:
            raise ValueError(f"pipeline_schedule='1f1b' needs at least as many micro-batches as stages: "
                             f"{self._n_micro(trainer)} micro-batches (n_microbatches, else accumulate_grad_batches) "
                             f"for {n_stages} stages")
        if model.lm_head is None:
            raise ValueError("strategy='pipeline' cannot split a model with tie_embeddings=True (the embedding is "
                             "used by the first and the last stage): build it untied")
        if self._shares(model):
            raise ValueError("strategy='pipeline' cannot split a model whose blocks share parameters "
                             "(accelops.sharing): each stage must own its weights")
        if self.split_opt is not None:
            split = list(self.split_opt)
            if len(split) != n_stages - 1 or any(isinstance(s, bool) or not isinstance(s, int) for s in split) \
                    or split != sorted(split) or (split and (split[0] < 0 or split[-1] > n_layers)):
                raise ValueError(f"pipeline_split must list the {n_stages - 1} block index(es) where stages 1..."
                                 f"{n_stages - 1} start, non-decreasing in [0, {n_layers}]; got {self.split_opt!r}")
        else:
            split = trainer.env.broadcast(self._profile_split(trainer, n_stages) if trainer.is_main else None)
        self.split = split
        bounds = [0, *split, n_layers]
        r = trainer.rank
        self.stage_module = _Stage(model, bounds[r], bounds[r + 1], r == 0, r == n_stages - 1)
        mine = {id(p) for p in self.stage_module.parameters()}
        for group in trainer.optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) in mine]
        # Every rank built the whole model; it keeps only its stage's weights (the others'
        # storage is released: trainer.model is not usable whole on any rank afterwards,
        # accelops.train.strategies.full_model_state_dict gathers it).
        for p in model.parameters():
            if id(p) not in mine:
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.stage = PipelineStage(self.stage_module, r, n_stages, trainer.device)
        cls = ScheduleGPipe if self.schedule_name == "gpipe" else Schedule1F1B
        self.schedule = cls(self.stage, self._n_micro(trainer), loss_fn=type(model).loss)
        if trainer.is_main:
            log.info("pipeline: %d stages, blocks %s, %s schedule, %d micro-batches", n_stages,
                     [f"{bounds[i]}:{bounds[i + 1]}" for i in range(n_stages)], self.schedule_name,
                     self._n_micro(trainer))

    @staticmethod
    def _shares(model) -> bool:
        seen = set()
        for n, p in model.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                return True
            seen.add(id(p))
        return False

    def _n_micro(self, trainer) -> int:
        return self.n_microbatches_opt or trainer.accumulate_grad_batches

    def _profile_split(self, trainer, n_stages):
        """Times forward+backward of the embeddings, each block and the head on one batch of
        the training data (median of 3 after a warm-up) and balances the stages on it."""
        model = trainer.model
        tokens, targets = default_collate([trainer.train_data[i] for i in range(min(trainer.batch_size,
                                                                                    len(trainer.train_data)))])
        tokens, targets = tokens.to(trainer.device), targets.to(trainer.device)
        was = model.training
        model.train()
        parts = [_Stage(model, 0, 0, True, False)] + [_Stage(model, i, i + 1, False, False)
                                                      for i in range(len(model.blocks))] \
            + [_Stage(model, 0, 0, False, True)]
        costs = []
        with torch.no_grad():
            x = parts[0](tokens)
        inputs = [tokens]
        for part in parts[1:]:
            inputs.append(x)
            with torch.no_grad():
                x = part(x)
        for k, (part, inp) in enumerate(zip(parts, inputs)):
            times = []
            for _ in range(4):
                inp_ = inp if k == 0 else inp.detach().requires_grad_(True)
                t0 = time.perf_counter()
                with trainer._autocast():
                    out = part(inp_)
                    loss = type(model).loss(out, targets) if k == len(parts) - 1 else out.float().square().mean()
                loss.backward()
                times.append(time.perf_counter() - t0)
            costs.append(statistics.median(times[1:]))
        model.zero_grad(set_to_none=True)
        model.train(was)
        self.block_costs = costs
        split = balance_stages(costs[1:-1], n_stages, costs[0], costs[-1])
        log.info("pipeline: measured forward+backward ms (embeddings, blocks..., head) %s -> split %s",
                 [round(c * 1e3, 2) for c in costs], split)
        return split

    def train_step(self, trainer):
        if not trainer.distributed:
            return None  # the Trainer's own loop
        accum = trainer.accumulate_grad_batches
        batches = [trainer._stream.next() for _ in range(accum)]
        tokens = torch.cat([b[0] for b in batches]).to(trainer.device)
        targets = torch.cat([b[1] for b in batches]).to(trainer.device)
        r, n = trainer.rank, trainer.world_size
        losses = []
        self.stage_module.train()
        with trainer._autocast():
            if r == 0:
                self.schedule.step(tokens)
            elif r == n - 1:
                self.schedule.step(target=targets, losses=losses)
            else:
                self.schedule.step()
        # The schedule's loss is each micro-batch's mean and its gradients are divided by the
        # number of micro-batches (scale_grads): the mean over micro-batches is the loss of
        # single-process training over the same samples.
        loss = torch.stack([x.detach().float() for x in losses]).mean() if losses else \
            torch.zeros((), device=trainer.device)
        dist.broadcast(loss, src=n - 1)  # every rank holds it, so the Trainer's mean over ranks is it
        grad_norm = None
        params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        if trainer.grad_clip is not None:
            grads = [p.grad for p in params if p.grad is not None]
            sq = torch.zeros((), dtype=torch.float32, device=trainer.device)
            for g in grads:
                sq += g.detach().float().square().sum()
            dist.all_reduce(sq)
            grad_norm = sq.sqrt()
            coef = torch.clamp(trainer.grad_clip / (grad_norm + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))
        lr = [g["lr"] for g in trainer.optimizer.param_groups]  # as the Trainer's step: one per group
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        if trainer.scheduler is not None:
            trainer.scheduler.step()
        return loss, lr, grad_norm, tokens.numel()

    @torch.no_grad()
    def eval_totals(self, trainer, indices):
        # Forward only, batch by batch through the stages with plain send/recv (batches of
        # any size; the schedule's micro-batching wants fixed shapes).
        r, n, dev = trainer.rank, trainer.world_size, trainer.device
        dim = trainer.model.config.dim
        total = torch.zeros(2, dtype=torch.float64, device=dev)
        self.stage_module.eval()
        try:
            for s in range(0, len(indices), trainer.batch_size):
                tokens, targets = default_collate([trainer.val_data[i] for i in indices[s:s + trainer.batch_size]])
                tokens, targets = tokens.to(dev), targets.to(dev)
                with trainer._autocast():
                    if r == 0:
                        x = self.stage_module(tokens)
                    else:
                        x = torch.empty(*tokens.shape, dim, dtype=torch.float32, device=dev)
                        dist.recv(x, src=r - 1)
                        x = self.stage_module(x)
                    if r < n - 1:
                        dist.send(x.float().contiguous(), dst=r + 1)
                    else:
                        loss = type(trainer.model).loss(x, targets)
                        total[0] += loss.double() * tokens.numel()
                        total[1] += tokens.numel()
        finally:
            self.stage_module.train()
        dist.broadcast(total, src=n - 1)
        return total / n   # the Trainer all-reduces (sums) the totals over ranks

    def write_shards(self, directory):
        rank = self.env.rank
        state = {"stage": rank, "split": self.split, "model": self.stage_module.state_dict(),
                 "optimizer": self.optimizer.state_dict()}
        save_checkpoint(os.path.join(directory, f"stage-{rank}.ckpt"), state)

    def read_shards(self, directory, trainer_state):
        saved = trainer_state.get("strategy", {}).get("split")
        if saved != self.split:
            raise ValueError(f"checkpoint {directory!r} was written with pipeline_split={saved!r}, this run splits "
                             f"at {self.split!r}: pass pipeline_split={saved!r} to resume it")
        state = load_checkpoint(os.path.join(directory, f"stage-{self.env.rank}.ckpt"))
        self.stage_module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def full_model_state_dict(trainer) -> dict | None:
    """The whole model's state_dict on rank 0 (None on the others) whatever the strategy;
    every rank must call it (it gathers: for inspection and tests, not for checkpoints)."""
    s = trainer._strategy
    if s.name == "fsdp" and trainer.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if trainer.is_main else None
    if s.name == "pipeline" and trainer.distributed:
        mine = {k: v.detach().cpu() for k, v in s.stage_module.state_dict().items()}
        parts = trainer.env.gather((s.stage_module.lo, mine))
        if not trainer.is_main:
            return None
        out = {}
        for lo, sd in parts:
            for k, v in sd.items():
                if k.startswith("blocks."):
                    i, rest = k[len("blocks."):].split(".", 1)
                    k = f"blocks.{lo + int(i)}.{rest}"
                out[k] = v
        return out
    return {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()} if trainer.is_main else None
