"""strategy="fsdp": FSDP2 (`torch.distributed.fsdp.fully_shard`) per model block (or, with
fsdp_units="submodule", also per large child of a block: attention, FFN), then the root;
MixedPrecisionPolicy from `precision`; optional CPUOffloadPolicy. Checkpoints are
torch.distributed.checkpoint directories (each rank writes its own shards, no rank gathers
the model) that load on another world size."""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from .base import Strategy, TrainingSetup, check_fresh_optimizer, names_by_group

__all__ = ["FSDPStrategy", "FSDP_UNITS", "large_children"]

FSDP_UNITS = ("block", "submodule")


@contextlib.contextmanager
def _quiet_single(distributed: bool):
    # DCP warns that it "assumes" a single process when there is no process group: here that
    # is the intent (one process reading or writing a checkpoint any world size can load).
    with warnings.catch_warnings():
        if not distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class FSDPStrategy(Strategy):
    name = "fsdp"
    # DCP reshards on load: a checkpoint loads on another world size
    reshards_on_load = True
    # DCP directories even on one process, so one process reads what several wrote
    checkpoint_layout = "dcp"

    def __init__(self, precision: str, cpu_offload: bool, units: str = "block", backward_prefetch: bool = True):
        super().__init__()
        self.precision, self.cpu_offload = precision, cpu_offload
        self.units, self.backward_prefetch = units, backward_prefetch
        self.sharded_blocks = 0
        self.sharded_units: list[str] = []  # qualified names of the modules fully_shard was applied to

    def describe(self) -> dict:
        return {
            "name": self.name,
            "cpu_offload": self.cpu_offload,
            "units": self.units,
            "backward_prefetch": self.backward_prefetch,
        }

    def setup(self, ctx: TrainingSetup):
        optimizer = super().setup(ctx)
        if not ctx.env.distributed:
            # One process: nothing to shard. The checkpoints are still DCP directories, so a
            # single-process run reads (and writes) what a sharded run wrote.
            if self.cpu_offload:
                warnings.warn("fsdp_cpu_offload=True has no effect in a single-process run", stacklevel=4)
            return optimizer
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        model, device = self.model, ctx.env.device
        check_fresh_optimizer(optimizer, self.name)
        groups = names_by_group(model, optimizer)
        mesh = init_device_mesh(device.type, (ctx.env.world_size,))
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.precision == "bf16-mixed"
            else MixedPrecisionPolicy()
        )
        if self.cpu_offload and device.type == "cpu":
            warnings.warn(
                "fsdp_cpu_offload=True on a CPU run: parameters and optimizer state already live in "
                "host memory, so the offload policy moves nothing",
                stacklevel=4,
            )
        offload = CPUOffloadPolicy() if self.cpu_offload and device.type != "cpu" else OffloadPolicy()
        blocks = getattr(model, "blocks", None)
        units = []
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) and not self._shares_across(model, blocks):
            for i, block in enumerate(blocks):
                if self.units == "submodule":
                    for name, child in large_children(block):
                        fully_shard(child, mesh=mesh, mp_policy=mp, offload_policy=offload)
                        units.append((f"blocks.{i}.{name}", child))
                fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload)
                units.append((f"blocks.{i}", block))
            self.sharded_blocks = len(blocks)
        elif isinstance(blocks, torch.nn.ModuleList) and len(blocks):
            warnings.warn(
                "the model's blocks share parameters (accelops.sharing): FSDP shards the model as one "
                "unit (the whole model is gathered for each forward)",
                stacklevel=4,
            )
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
        return optimizer

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

    def no_sync(self):
        if not self.env.distributed:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def ctx():
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)

        return ctx()

    def eval_totals(self, val_data, indices, evaluate_shard):
        if not self.env.distributed:
            return super().eval_totals(val_data, indices, evaluate_shard)
        # FSDP's forward all-gathers: every rank runs the same number of forwards (a rank
        # with fewer batches repeats its last one with weight 0).
        w, b = self.env.world_size, self.batch_size
        n = max(-(-len(indices[k::w]) // b) for k in range(w))
        return evaluate_shard(indices[self.env.rank :: w], n_batches=n)

    # DCP: each rank saves and loads only its shards; the metadata lets another world size
    # read them (DCP reshards on load).
    def write_shards(self, directory):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        with _quiet_single(self.env.distributed):
            dcp.save(
                {"model": model_sd, "optim": optim_sd},
                checkpoint_id=os.path.join(directory, "dcp"),
                no_dist=not self.env.distributed,
            )

    def read_shards(self, directory, trainer_state):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with _quiet_single(self.env.distributed):
            dcp.load(state, checkpoint_id=os.path.join(directory, "dcp"), no_dist=not self.env.distributed)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def full_model_state_dict(self):
        if not self.env.distributed:
            return super().full_model_state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.env.is_main else None


def large_children(block) -> list:
    """The direct children of a block that get their own FSDP unit under
    fsdp_units="submodule": those holding at least 10% of the block's parameters
    (attention, FFN; an RNN cell), while norms and other small ones stay in the block's
    unit rather than costing a collective each. A child sharing a parameter with another
    part of the block keeps the whole block one unit (a parameter has one owner).
    (accelops.plan sizes the units with it too.)"""
    total = sum(p.numel() for p in block.parameters())
    owners = {}
    for name, child in block.named_children():
        for p in child.parameters():
            owners.setdefault(id(p), set()).add(name)
    direct = {id(p) for p in block.parameters(recurse=False)}
    if any(len(o) > 1 or pid in direct for pid, o in owners.items()):
        return []
    chosen = [
        (name, child)
        for name, child in block.named_children()
        if total and sum(p.numel() for p in child.parameters()) >= 0.1 * total
    ]
    # A child holding all of the block's parameters is the block: nothing to split.
    if len(chosen) == 1 and sum(p.numel() for p in chosen[0][1].parameters()) == total:
        return []
    return chosen
