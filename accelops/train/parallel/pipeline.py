"""strategy="pipeline": `torch.distributed.pipelining` (PipelineStage + ScheduleGPipe /
Schedule1F1B), one stage per rank, an accelops.models TransformerLM / RNNLM cut at block
boundaries (balanced on measured per-block time unless pipeline_split says where). Every
stage reads the same batches; the last computes the loss. Checkpoints hold a file per stage
(one process: the whole model, in the Trainer's ordinary checkpoint file)."""

from __future__ import annotations

import logging
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from ..checkpoint import load_checkpoint, save_checkpoint
from .base import Strategy, TrainingSetup

__all__ = ["PipelineStrategy", "PIPELINE_SCHEDULES", "Stage", "balance_stages"]

log = logging.getLogger("accelops.train")

PIPELINE_SCHEDULES = ("gpipe", "1f1b")


class Stage(torch.nn.Module):
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
                cost = prefix[i] - prefix[j] + (first_cost if s == 1 else 0.0) + (last_cost if s == n_stages else 0.0)
                val = max(best[s - 1][j], cost)
                if val < best[s][i] - 1e-12:
                    best[s][i], cut[s][i] = val, j
    bounds, i = [], n
    for s in range(n_stages, 1, -1):
        i = cut[s][i]
        bounds.append(i)
    return bounds[::-1]


class PipelineStrategy(Strategy):
    name = "pipeline"

    def __init__(self, schedule: str, n_microbatches, split):
        super().__init__()
        self.schedule_name, self.n_microbatches_opt, self.split_opt = schedule, n_microbatches, split
        self.split = None
        self.block_costs = None
        self.stage = None
        self.stage_module = None

    @property
    def checkpoint_layout(self) -> str:
        # a file per stage when there are stages; one process writes the Trainer's file
        return "pp" if self.env.distributed else "file"

    @property
    def runs_step(self) -> bool:
        return self.env.distributed  # one process: the Trainer's own loop trains the whole model

    def describe(self) -> dict:
        return {"name": self.name, "schedule": self.schedule_name, "split": self.split}

    def setup(self, ctx: TrainingSetup):
        from ...models._base import LanguageModel

        optimizer = super().setup(ctx)
        self.dp_rank, self.dp_world = 0, 1  # every stage reads the same batches
        env, model = ctx.env, self.model
        if not isinstance(model, LanguageModel) or not isinstance(getattr(model, "blocks", None), torch.nn.ModuleList):
            raise ValueError(
                "strategy='pipeline' splits accelops.models' TransformerLM / RNNLM at block "
                f"boundaries; got a {type(model).__name__}"
            )
        n_stages, n_layers = env.world_size, len(model.blocks)
        if self.accumulate_grad_batches * self.batch_size % self._n_micro():
            raise ValueError(
                f"n_microbatches={self._n_micro()} must divide the step's "
                f"accumulate_grad_batches x batch_size = "
                f"{self.accumulate_grad_batches * self.batch_size} samples"
            )
        if not env.distributed:
            if self.split_opt is not None and list(self.split_opt) != []:
                raise ValueError(
                    f"pipeline_split={self.split_opt!r} needs {len(self.split_opt) + 1} processes, this run has 1"
                )
            self.split = []
            return optimizer
        if self.schedule_name == "1f1b" and self._n_micro() < n_stages:
            raise ValueError(
                f"pipeline_schedule='1f1b' needs at least as many micro-batches as stages: "
                f"{self._n_micro()} micro-batches (n_microbatches, else accumulate_grad_batches) "
                f"for {n_stages} stages"
            )
        if model.lm_head is None:
            raise ValueError(
                "strategy='pipeline' cannot split a model with tie_embeddings=True (the embedding is "
                "used by the first and the last stage): build it untied"
            )
        if self._shares(model):
            raise ValueError(
                "strategy='pipeline' cannot split a model whose blocks share parameters "
                "(accelops.sharing): each stage must own its weights"
            )
        if self.split_opt is not None:
            split = list(self.split_opt)
            if (
                len(split) != n_stages - 1
                or any(isinstance(s, bool) or not isinstance(s, int) for s in split)
                or split != sorted(split)
                or (split and (split[0] < 0 or split[-1] > n_layers))
            ):
                raise ValueError(
                    f"pipeline_split must list the {n_stages - 1} block index(es) where stages 1..."
                    f"{n_stages - 1} start, non-decreasing in [0, {n_layers}]; got {self.split_opt!r}"
                )
        else:
            split = env.broadcast(self._profile_split(ctx.train_data, n_stages) if env.is_main else None)
        self.split = split
        bounds = [0, *split, n_layers]
        r = env.rank
        self.stage_module = Stage(model, bounds[r], bounds[r + 1], r == 0, r == n_stages - 1)
        mine = {id(p) for p in self.stage_module.parameters()}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) in mine]
        # Every rank built the whole model; it keeps only its stage's weights (the others'
        # storage is released: the Trainer's model is not usable whole on any rank afterwards,
        # accelops.train.parallel.full_model_state_dict gathers it).
        for p in model.parameters():
            if id(p) not in mine:
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        self.stage = PipelineStage(self.stage_module, r, n_stages, env.device)
        cls = ScheduleGPipe if self.schedule_name == "gpipe" else Schedule1F1B
        self.schedule = cls(self.stage, self._n_micro(), loss_fn=type(model).loss)
        if env.is_main:
            log.info(
                "pipeline: %d stages, blocks %s, %s schedule, %d micro-batches",
                n_stages,
                [f"{bounds[i]}:{bounds[i + 1]}" for i in range(n_stages)],
                self.schedule_name,
                self._n_micro(),
            )
        return optimizer

    @staticmethod
    def _shares(model) -> bool:
        seen = set()
        for n, p in model.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                return True
            seen.add(id(p))
        return False

    def _n_micro(self) -> int:
        return self.n_microbatches_opt or self.accumulate_grad_batches

    def _profile_split(self, train_data, n_stages):
        """Times forward+backward of the embeddings, each block and the head on one batch of
        the training data (median of 3 after a warm-up) and balances the stages on it."""
        model, device = self.model, self.env.device
        tokens, targets = default_collate([train_data[i] for i in range(min(self.batch_size, len(train_data)))])
        tokens, targets = tokens.to(device), targets.to(device)
        was = model.training
        model.train()
        parts = (
            [Stage(model, 0, 0, True, False)]
            + [Stage(model, i, i + 1, False, False) for i in range(len(model.blocks))]
            + [Stage(model, 0, 0, False, True)]
        )
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
                with self.autocast():
                    out = part(inp_)
                    loss = type(model).loss(out, targets) if k == len(parts) - 1 else out.float().square().mean()
                loss.backward()
                times.append(time.perf_counter() - t0)
            costs.append(statistics.median(times[1:]))
        model.zero_grad(set_to_none=True)
        model.train(was)
        self.block_costs = costs
        split = balance_stages(costs[1:-1], n_stages, costs[0], costs[-1])
        log.info(
            "pipeline: measured forward+backward ms (embeddings, blocks..., head) %s -> split %s",
            [round(c * 1e3, 2) for c in costs],
            split,
        )
        return split

    def forward_backward(self, batches):
        tokens = torch.cat([b[0] for b in batches]).to(self.env.device)
        targets = torch.cat([b[1] for b in batches]).to(self.env.device)
        r, n = self.env.rank, self.env.world_size
        losses = []
        self.stage_module.train()
        with self.autocast():
            if r == 0:
                self.schedule.step(tokens)
            elif r == n - 1:
                self.schedule.step(target=targets, losses=losses)
            else:
                self.schedule.step()
        # The schedule's loss is each micro-batch's mean and its gradients are divided by the
        # number of micro-batches (scale_grads): the mean over micro-batches is the loss of
        # single-process training over the same samples.
        loss = (
            torch.stack([x.detach().float() for x in losses]).mean()
            if losses
            else torch.zeros((), device=self.env.device)
        )
        dist.broadcast(loss, src=n - 1)  # every rank holds it, so the Trainer's mean over ranks is it
        return loss, tokens.numel()

    def clip_grad_norm(self, max_norm):
        if not self.env.distributed:
            return super().clip_grad_norm(max_norm)
        # The global norm is over every stage's gradients: each rank's sum of squares, all-reduced.
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        sq = torch.zeros((), dtype=torch.float32, device=self.env.device)
        for g in grads:
            sq += g.detach().float().square().sum()
        dist.all_reduce(sq)
        grad_norm = sq.sqrt()
        coef = torch.clamp(max_norm / (grad_norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return grad_norm

    @torch.no_grad()
    def eval_totals(self, val_data, indices, evaluate_shard):
        if not self.env.distributed:
            return super().eval_totals(val_data, indices, evaluate_shard)
        # Forward only, batch by batch through the stages with plain send/recv (batches of
        # any size; the schedule's micro-batching wants fixed shapes).
        r, n, dev = self.env.rank, self.env.world_size, self.env.device
        dim, b = self.model.config.dim, self.batch_size
        total = torch.zeros(2, dtype=torch.float64, device=dev)
        self.stage_module.eval()
        try:
            for s in range(0, len(indices), b):
                tokens, targets = default_collate([val_data[i] for i in indices[s : s + b]])
                tokens, targets = tokens.to(dev), targets.to(dev)
                with self.autocast():
                    if r == 0:
                        x = self.stage_module(tokens)
                    else:
                        x = torch.empty(*tokens.shape, dim, dtype=torch.float32, device=dev)
                        dist.recv(x, src=r - 1)
                        x = self.stage_module(x)
                    if r < n - 1:
                        dist.send(x.float().contiguous(), dst=r + 1)
                    else:
                        loss = type(self.model).loss(x, targets)
                        total[0] += loss.double() * tokens.numel()
                        total[1] += tokens.numel()
        finally:
            self.stage_module.train()
        dist.broadcast(total, src=n - 1)
        return total / n  # the Trainer all-reduces (sums) the totals over ranks

    def write_shards(self, directory):
        rank = self.env.rank
        state = {
            "stage": rank,
            "split": self.split,
            "model": self.stage_module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        save_checkpoint(os.path.join(directory, f"stage-{rank}.ckpt"), state)

    def read_shards(self, directory, trainer_state):
        saved = trainer_state.get("strategy", {}).get("split")
        if saved != self.split:
            raise ValueError(
                f"checkpoint {directory!r} was written with pipeline_split={saved!r}, this run splits "
                f"at {self.split!r}: pass pipeline_split={saved!r} to resume it"
            )
        state = load_checkpoint(os.path.join(directory, f"stage-{self.env.rank}.ckpt"))
        self.stage_module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def full_model_state_dict(self):
        if not self.env.distributed:
            return super().full_model_state_dict()
        mine = {k: v.detach().cpu() for k, v in self.stage_module.state_dict().items()}
        parts = self.env.gather((self.stage_module.lo, mine))
        if not self.env.is_main:
            return None
        out = {}
        for lo, sd in parts:
            for k, v in sd.items():
                if k.startswith("blocks."):
                    i, rest = k[len("blocks.") :].split(".", 1)
                    k = f"blocks.{lo + int(i)}.{rest}"
                out[k] = v
        return out
