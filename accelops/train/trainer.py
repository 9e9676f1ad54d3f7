"""Trainer: one process or torchrun (DDP, or the FSDP / ZeRO-1 / pipeline strategies of
accelops.train.parallel), gradient accumulation with no_sync, autocast (GradScaler for
fp16), accelops compression hooks, and checkpoints that resume exactly
(accelops.train.checkpoint)."""

from __future__ import annotations

import contextlib
import functools
import gc
import io
import logging
import math
import os
import shutil
import signal
import threading
import time
import warnings

import torch
import torch.distributed as dist
from torch.utils.data import default_collate

from .batches import BatchStream, default_loss, to_device, tokens_in
from .callbacks import EarlyStopping, MLflowLogger, require_mlflow
from .checkpoint import CHECKPOINT_FORMAT, Checkpointer
from .dirs import DirectoryLock, DirectoryLocked, check_writable
from .dist_env import DistEnv, collective_failure
from .losses import WeightedLoss
from .metrics_files import MetricsFiles
from .parallel import TrainingSetup, make_strategy
from .rng import rng_state, seed_everything, set_rng_state
from .trainer_config import PRECISIONS, TrainerConfig

__all__ = ["Trainer", "TrainerConfig", "PRECISIONS", "default_loss"]

log = logging.getLogger("accelops.train")

_HALT_SIGNAL, _HALT_LOG_ERROR = 1, 2  # why fit stops early (see Trainer._halt_agreed)


# --------------------------------------------------------------------------- helpers


def _autocast(device_type: str, dtype):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device_type, dtype=dtype)


# --------------------------------------------------------------------------- trainer


class Trainer:
    """Trains `model` with `optimizer` on `train_data` (a map-style dataset of batches'
    samples, e.g. accelops.train.TokenWindows), evaluating on `val_data`, as `config` (a
    TrainerConfig: accelops/train/trainer_config.py documents every setting) says:

        Trainer(model, optimizer, train_data, val_data, config=TrainerConfig(...))

    or, the same settings spelled flat, Trainer(model, optimizer, train_data, val_data,
    max_steps=2000, checkpoint_dir="runs/ckpt", ...): each keyword of
    accelops.train.trainer_config.KEYWORDS (with config= too, keywords change that config).

    One process, or one of torchrun's processes: with torch.distributed initialised, or
    WORLD_SIZE in the environment (then the process group is initialised here, NCCL on a
    GPU, gloo on the CPU), the model is wrapped in DistributedDataParallel (or sharded or
    split by another strategy: accelops.train.parallel), each rank reads its
    DistributedSampler shard and rank 0 alone logs, shows progress and writes checkpoints
    (checkpoint_dir must be one directory all ranks see; accelops.train.checkpoint).

    The arguments that are not plain settings:
    scheduler: an LR scheduler stepped once per optimizer step (or None).
    loss_fn: (model, batch) -> scalar loss; default model(*batch) giving loss or
        (logits, loss). Either may give a dict of named losses instead: see loss_weights.
    metadata: anything torch.save-able stored in every checkpoint (e.g. the config).

    The settings are also attributes (trainer.max_steps, trainer.batch_size, ...: the
    running values; max_steps may be raised between fit() calls); trainer.config is the
    TrainerConfig the trainer was built from, trainer.parallel its Strategy.
    """

    def __init__(
        self,
        model,
        optimizer,
        train_data,
        val_data=None,
        *,
        config: TrainerConfig | None = None,
        scheduler=None,
        loss_fn=None,
        metadata=None,
        **keywords,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        # The keyword form is this same config: each section checks its values as it is made.
        if config is None:
            config = TrainerConfig.from_keywords(**keywords)
        elif not isinstance(config, TrainerConfig):
            raise TypeError(f"config must be an accelops.train.TrainerConfig, got {type(config).__name__}")
        elif keywords:
            config = config.replace(**keywords)
        self.config = config
        step_cfg, schedule, ckpt, logs = config.step, config.schedule, config.checkpoint, config.logging
        par = config.parallel
        for name, data in (("train_data", train_data), ("val_data", val_data)):
            if data is not None and not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
                raise TypeError(
                    f"{name} must be a map-style dataset (with __len__ and __getitem__), got "
                    f"{type(data).__name__}: the trainer orders and resumes the data itself"
                )
        self._check_optimizer(model, optimizer)
        self._dist_timeout = par.dist_timeout
        # The strategy's options and their combination with the others are checked here, before
        # any process group exists; it is set up below, once the model is on its device.
        self.parallel = make_strategy(
            par.strategy,
            compression=par.compression,
            precision=step_cfg.precision,
            loss_fn=loss_fn,
            pipeline_schedule=par.pipeline.schedule,
            n_microbatches=par.pipeline.n_microbatches,
            pipeline_split=par.pipeline.split,
            fsdp_cpu_offload=par.fsdp.cpu_offload,
            loss_weights=step_cfg.loss_weights,
            fsdp_units=par.fsdp.units,
            fsdp_backward_prefetch=par.fsdp.backward_prefetch,
        )
        self.strategy = par.strategy
        if metadata is not None:
            try:  # checkpoints load with weights_only=True: find out now, not at the resume
                buf = io.BytesIO()
                torch.save(metadata, buf)
                buf.seek(0)
                torch.load(buf, weights_only=True)
            except Exception as exc:
                raise TypeError(
                    "metadata must be made of plain types (dict, list, str, numbers, tensors) so "
                    f"checkpoints load with weights_only=True: {exc}"
                ) from None

        # The settings the run reads, as attributes (max_steps may be raised between fit() calls).
        self.precision, self.grad_clip = step_cfg.precision, step_cfg.grad_clip
        self.accumulate_grad_batches = step_cfg.accumulate_grad_batches
        self.max_steps, self.eval_every, self.eval_batches = (
            schedule.max_steps,
            schedule.eval_every,
            schedule.eval_batches,
        )
        self.log_every, self.batch_size, self.seed = schedule.log_every, config.data.batch_size, config.seed
        self.checkpoint_every = ckpt.every if ckpt.every is not None else schedule.eval_every
        self.keep_last = ckpt.keep_last
        self.checkpoint_dir = None if ckpt.dir is None else os.fspath(ckpt.dir)
        self.log_dir = None if logs.dir is None else os.fspath(logs.dir)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.loss_fn = WeightedLoss(loss_fn or default_loss, step_cfg.loss_weights)
        self.early_stopping = EarlyStopping.from_spec(config.early_stopping)
        if self.early_stopping is not None and (val_data is None or schedule.eval_every is None):
            raise ValueError("early_stopping is checked at each evaluation: it needs val_data and eval_every")
        if logs.mlflow:
            require_mlflow()  # on every rank: a missing extra fails everywhere, not only on rank 0
        self.train_data, self.val_data, self.metadata, self.progress = train_data, val_data, metadata, logs.progress

        # ---- processes and device
        self._owns_group = False
        self.distributed = self._setup_distributed(par.distributed, par.device)
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.is_main = self.rank == 0
        self._mlflow = MLflowLogger(logs.mlflow, self.log_dir) if logs.mlflow and self.is_main else None
        self._mlflow_resume = self.last_checkpoint = self.stop_reason = None
        self.device = self._pick_device(par.device)
        self.env = DistEnv(self.distributed, self.rank, self.world_size, self.device)
        self.model = model.to(self.device)

        if par.compression is not None and not self.distributed:  # (fsdp and pipeline refuse it outright)
            warnings.warn(
                "compression applies to DDP's gradient all-reduce; this run is a single process, so it is ignored",
                stacklevel=2,
            )
        self.compression = par.compression

        self.scaler = None
        if step_cfg.precision == "16-mixed":
            self.scaler = torch.amp.GradScaler(self.device.type)
        # a function of the device and dtype, not a bound method: the strategy keeps it, and a
        # reference back to the Trainer would keep an abandoned Trainer (and the lock on its
        # checkpoint_dir) alive until the cycle collector ran
        dtype = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}[step_cfg.precision]
        self._autocast = functools.partial(_autocast, self.device.type, dtype)
        # ddp / zero1: wraps the model in DDP (zero1 also swaps the optimizer); fsdp: shards the
        # model; pipeline: keeps this rank's stage
        self.optimizer = self.parallel.setup(
            TrainingSetup(
                env=self.env,
                model=self.model,
                optimizer=optimizer,
                scheduler=scheduler,
                train_data=train_data,
                batch_size=self.batch_size,
                accumulate_grad_batches=self.accumulate_grad_batches,
                autocast=self._autocast,
                ddp_kwargs=par.ddp_kwargs,
                compression=par.compression,
            )
        )

        # pipeline stages all read the same batches: the data-parallel rank and world are the strategy's
        self._stream = BatchStream(
            train_data, self.batch_size, self.parallel.dp_rank, self.parallel.dp_world, self.seed, config.data.shuffle
        )
        self.step = 0
        self.history: list[dict] = []  # a dict per optimizer step run in this process (rank 0: global means)
        self.evals: list[dict] = []
        self.resumed_from = None
        self._elapsed_before = 0.0
        self._last_saved = self._last_eval = None
        self._pending_rng = None

        self.checkpointer = (
            None
            if self.checkpoint_dir is None
            else Checkpointer(self.checkpoint_dir, self.keep_last, self.parallel, self.env)
        )
        self._dir_lock = None
        self._stop_signal = self._log_error = None
        self._prepare_dirs()  # before the resume: a run that does not hold the directory must not read it
        if self.checkpoint_dir is not None:
            try:
                self._maybe_resume(ckpt.resume)
            except BaseException:
                self._release_dirs()
                raise
        if self._pending_rng is None:
            self._seed_everything()

    # ------------------------------------------------------------------ set-up

    @property
    def ddp(self):
        """The DistributedDataParallel wrapper of ddp / zero1 runs on several processes (None
        otherwise). Setting it to None drops it (before the process group goes)."""
        return self.parallel.ddp

    @ddp.setter
    def ddp(self, value) -> None:
        if value is not None:
            raise ValueError("Trainer.ddp can only be dropped (set to None): the strategy wraps the model")
        self.parallel.release()

    @property
    def hook_state(self):
        """The state of DDP's gradient-compression hook (None without compression)."""
        return self.parallel.hook_state

    @staticmethod
    def _check_optimizer(model, optimizer):
        owned = {id(p) for p in model.parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in owned:
                    raise ValueError(
                        "optimizer holds a parameter that is not one of model.parameters(): build the "
                        "optimizer from this model's parameters (after any share_parameters / convert)"
                    )

    def _setup_distributed(self, distributed, device) -> bool:
        if distributed is False:
            return False
        if dist.is_available() and dist.is_initialized():
            return True
        if "WORLD_SIZE" not in os.environ or (os.environ["WORLD_SIZE"] == "1" and "MASTER_ADDR" not in os.environ):
            if distributed is True:
                raise RuntimeError(
                    "distributed=True but torch.distributed is not initialised and WORLD_SIZE is "
                    "not set: launch with torchrun (or call init_process_group first)"
                )
            return False
        use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        kw = (
            {}
            if self._dist_timeout is None
            else {"timeout": __import__("datetime").timedelta(seconds=self._dist_timeout)}
        )
        dist.init_process_group("nccl" if use_cuda else "gloo", **kw)
        self._owns_group = True
        return True

    def _pick_device(self, device) -> torch.device:
        if device is not None:
            device = torch.device(device)
            if device.type == "cuda" and device.index is None:
                device = torch.device(
                    "cuda", int(os.environ.get("LOCAL_RANK", "0")) if self.distributed else torch.cuda.current_device()
                )
            return device
        if torch.cuda.is_available():
            return torch.device(
                "cuda", int(os.environ.get("LOCAL_RANK", "0")) if self.distributed else torch.cuda.current_device()
            )
        return torch.device("cpu")

    def _seed_everything(self) -> None:
        seed_everything(self.seed + self.rank)

    def close(self) -> None:
        """Destroys the process group if this trainer created it (torchrun runs). The DDP
        wrapper goes first: a DDP reducer still holding a destroyed gloo group could hang the
        process at exit (seen about once in six 2-rank runs). No barrier: close() also runs
        after a failed step, when the peer may be dead. Also releases the checkpoint directory."""
        self._release_dirs()
        if self._owns_group and dist.is_initialized():
            self.parallel.release()
            gc.collect()
            dist.destroy_process_group()
            self._owns_group = False

    # ------------------------------------------------------------------ directories

    def _prepare_dirs(self) -> None:
        """Before step 1: every directory this rank writes is writable (checkpoint_dir on rank 0,
        on every rank where all ranks write their shards; log_dir on rank 0), and rank 0 holds
        checkpoint_dir's lock for the run (it alone creates, renames and prunes checkpoints: the
        other ranks of fsdp / pipeline write only into the temporary directory it made for the
        save under way). A failure on any rank is raised on every rank; the others would wait
        in the next collective otherwise."""
        mine = None
        try:
            if self.checkpoint_dir is not None and (self.is_main or self.checkpointer.every_rank_writes):
                check_writable(self.checkpoint_dir, "checkpoint_dir")
            if self.checkpoint_dir is not None and self.is_main:
                lock = DirectoryLock(self.checkpoint_dir)
                lock.acquire()
                self._dir_lock = lock
                self._warn_if_no_room()
            if self.log_dir is not None and self.is_main:
                check_writable(self.log_dir, "log_dir")
        except Exception as exc:  # noqa: BLE001 - raised on every rank below
            self._release_dirs()
            mine = exc
        if self.distributed:  # always: a log_dir given to rank 0 alone must not make the ranks disagree
            report = None if mine is None else (self.rank, type(mine).__name__, getattr(mine, "errno", None), str(mine))
            reports = [None] * self.world_size
            dist.all_gather_object(reports, report)
            if mine is None:
                failed = next((r for r in reports if r is not None), None)
                if failed is not None:
                    self._release_dirs()
                    rank, name, code, text = failed
                    text = f"rank {rank}: {text}"
                    raise (
                        DirectoryLocked(text)
                        if name == "DirectoryLocked"
                        else OSError(code, text)
                        if code is not None
                        else RuntimeError(text)
                    )
        if mine is not None:
            raise mine
        self._dirs_ready = True

    def _release_dirs(self) -> None:
        self._dirs_ready = False
        lock, self._dir_lock = getattr(self, "_dir_lock", None), None
        if lock is not None:
            lock.release()

    def _warn_if_no_room(self) -> None:
        # A checkpoint holds at least the model's state: with less free space than that, the
        # first save fails for certain. Only a warning: compressing file systems may fit it.
        tensors = [*self.model.parameters(), *self.model.buffers()]  # no state_dict(): fsdp's may gather
        need = sum(t.numel() * t.element_size() for t in tensors)
        free = shutil.disk_usage(self.checkpoint_dir).free
        if free < need:
            warnings.warn(
                f"checkpoint_dir {self.checkpoint_dir!r} has {free / 2**20:.1f} MiB free, less than the "
                f"model's {need / 2**20:.1f} MiB that every checkpoint holds: the first save will fail",
                RuntimeWarning,
                stacklevel=4,
            )

    # ------------------------------------------------------------------ checkpoints

    def _maybe_resume(self, resume: bool) -> None:
        found = self.checkpointer.resume(resume, self.model, self.optimizer)
        if found is not None:
            path, state, rank_state = found
            self._restore(state, path, rank_state)

    def _restore(self, state: dict, path: str, rank_state: dict | None) -> None:
        """The trainer's part of a checkpoint (what _trainer_state wrote; the Checkpointer has
        loaded the model, optimizer and shards); rank_state None: this rank's RNG was not
        saved (fsdp on a new world size), it is seeded afresh."""
        saved = state["trainer"]
        mine = self._trainer_config()
        changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in mine.items() if saved.get(k) != v]
        if changed and self.is_main:
            warnings.warn(
                f"resuming {path!r} with different settings ({'; '.join(changed)}): the run continues "
                "but will not repeat the uninterrupted one",
                stacklevel=3,
            )
        if self.scheduler is not None:
            if state["scheduler"] is None:
                raise ValueError(f"checkpoint {path!r} has no scheduler state but this trainer has a scheduler")
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        mine_rank = rank_state or {}
        self.parallel.load_rank_state(mine_rank, path)  # ddp / zero1: the communication hook's state
        self._stream.load_state_dict(state["data"])
        self.step = self._last_saved = int(state["step"])
        self._last_eval = state.get("last_eval")
        self._elapsed_before = float(state.get("elapsed_s", 0.0))
        self._pending_rng = mine_rank.get("rng")
        if self.early_stopping is not None and state.get("early_stopping") is not None:
            self.early_stopping.load_state_dict(state["early_stopping"])
        self._mlflow_resume = state.get("mlflow_run_id")
        self.resumed_from = self.last_checkpoint = path
        if self.is_main:
            log.info("resumed from %s (step %d)", path, self.step)

    def _trainer_config(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "accumulate_grad_batches": self.accumulate_grad_batches,
            "precision": self.precision,
            "seed": self.seed,
            "grad_clip": self.grad_clip,
            "compression": self.compression,
        }

    def save_checkpoint(self) -> str | None:
        """Writes the checkpoint of the current step (rank 0; every rank must call it) -> its path."""
        if self.checkpoint_dir is None:
            raise ValueError("checkpoint_dir is None: nothing to save to")
        rank_state = {"rng": rng_state(self.device), **self.parallel.rank_state_dict()}
        path = self.checkpointer.save(self.step, self.model, self.optimizer, self._trainer_state, rank_state)
        self._last_saved = self.step
        self.last_checkpoint = path
        return path

    def _trainer_state(self) -> dict:
        """What every checkpoint holds besides the model, optimizer and per-rank states."""
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "world_size": self.world_size,
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "data": self._stream.state_dict(),
            "trainer": self._trainer_config(),
            "elapsed_s": self._elapsed(),
            "last_eval": self._last_eval,
            "metadata": self.metadata,
            "strategy": self.parallel.describe(),
            "early_stopping": None if self.early_stopping is None else self.early_stopping.state_dict(),
            "mlflow_run_id": None if self._mlflow is None else self._mlflow.run_id,
        }

    # ------------------------------------------------------------------ training

    def autocast(self):
        """The context the forwards run in: torch.autocast to the precision's dtype (or nothing)."""
        return self._autocast()

    def _train_step(self):
        accum = self.accumulate_grad_batches
        if self.parallel.runs_step:  # pipeline: the schedule runs the step's micro-batches
            total, tokens = self.parallel.forward_backward([self._stream.next() for _ in range(accum)])
        else:
            total, tokens = self._forward_backward(accum)
        grad_norm = None
        if self.grad_clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            grad_norm = self.parallel.clip_grad_norm(self.grad_clip)
        lr = [g["lr"] for g in self.optimizer.param_groups]  # one column per group when there are several
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        return total, lr, grad_norm, tokens * self.parallel.dp_world

    def _forward_backward(self, accum: int):
        """The step's micro-batches through the model, gradients accumulated (synchronised by
        the strategy on the last one only) -> (mean loss, tokens this rank read)."""
        model = self.parallel.training_module
        model.train()
        total, tokens = None, 0
        for i in range(accum):
            batch = to_device(self._stream.next(), self.device)
            tokens += tokens_in(batch)
            sync = i == accum - 1
            with contextlib.nullcontext() if sync else self.parallel.no_sync():
                with self.autocast():
                    loss = self.loss_fn(model, batch)
                scaled = loss / accum if accum > 1 else loss
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            d = scaled.detach().float()
            total = d if total is None else total + d
        return total, tokens

    def _elapsed(self) -> float:
        return self._elapsed_before + (time.perf_counter() - self._t_start if hasattr(self, "_t_start") else 0.0)

    def _flush(self) -> None:
        """Turns the pending steps' loss tensors into numbers (one sync, one all-reduce for all
        of them) and writes their rows."""
        if not self._pending:
            return
        names = sorted(self._pending[0][7])  # named loss components (models with several targets)
        losses = torch.stack([torch.stack([p[1].float(), *(p[7][n] for n in names)]) for p in self._pending])
        if self.distributed:
            dist.all_reduce(losses)
            losses /= self.world_size
        losses = losses.tolist()
        now = time.perf_counter()
        tokens = sum(p[4] for p in self._pending)
        tps = tokens / max(now - self._t_flush, 1e-9)
        self._t_flush = now
        rows = []
        for (step, _, lr, gn, tok, epoch, elapsed, _), (loss, *parts) in zip(self._pending, losses):
            rows.append(
                {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss,
                    "lr": lr[0],
                    "grad_norm": None if gn is None else float(gn),
                    "tokens": tok,
                    "tokens_per_s": tps,
                    "elapsed_s": elapsed,
                    **dict(zip(names, parts)),
                    **({f"lr-group{i}": v for i, v in enumerate(lr)} if len(lr) > 1 else {}),
                }
            )
        self._pending = []
        self.history.extend(rows)
        self._write(rows)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}", tok_s=f"{tps:,.0f}", refresh=False)

    def _eval_with(self, fn):
        was_training = self.model.training
        self.model.eval()
        try:
            return fn()
        finally:
            self.model.train(was_training)

    def _eval_totals(self, mine, n_batches: int | None = None) -> torch.Tensor:
        """(sum of loss x tokens, tokens, then each named loss component x tokens) over this
        rank's validation samples `mine`. n_batches: run that many forwards in all (fsdp:
        every rank the same number; the extra ones repeat the last batch with weight 0)."""
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        comp = None  # weighted sums of the named loss components
        starts = list(range(0, len(mine), self.batch_size))
        for k in range(max(len(starts), n_batches or 0)):
            real = k < len(starts)
            chunk = mine[starts[k] : starts[k] + self.batch_size] if real else (mine[-self.batch_size :] or [0])
            batch = to_device(default_collate([self.val_data[i] for i in chunk]), self.device)
            with self.autocast():
                loss = self.loss_fn(self.model, batch)
            parts = self.loss_fn.pop()
            if not real:
                continue
            weight = tokens_in(batch) or 1
            total[0] += loss.double() * weight
            total[1] += weight
            if parts:
                part = torch.stack(list(parts.values())).double() * weight
                comp = part if comp is None else comp + part
        names = self.loss_fn.names or ()
        return torch.cat([total, comp if comp is not None else total.new_zeros(len(names))])

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over val_data (or eval_batches batches a rank, evenly spaced), averaged over
        ranks by token count -> loss (None without val_data)."""
        if self.val_data is None:
            return None
        n = len(self.val_data)
        if self.eval_batches is not None:
            k = min(n, self.eval_batches * self.batch_size * self.parallel.dp_world)
            indices = [i * n // k for i in range(k)]
        else:
            indices = list(range(n))
        # this rank's share (fsdp: equal forwards a rank; pipeline: through the stages)
        total = self._eval_with(lambda: self.parallel.eval_totals(self.val_data, indices, self._eval_totals))
        names = self.loss_fn.names or ()
        if self.distributed:
            dist.all_reduce(total)
        if total[1] == 0:
            raise ValueError("val_data is empty")
        val = (total[0] / total[1]).item()
        self._last_eval = self.step
        row = {
            "step": self.step,
            "val_loss": val,
            "val_bpc": val / math.log(2),
            **{f"val_{n}": (v / total[1]).item() for n, v in zip(names, total[2:])},
        }
        self.evals.append(row)
        self._write([row])
        if self.is_main:
            log.info("step %d: val loss %.4f (%.4f bits/char)", self.step, val, row["val_bpc"])
        return val

    # ------------------------------------------------------------------ metrics files

    def _write(self, rows) -> None:
        try:
            if getattr(self, "_metrics", None) is not None:
                self._metrics.write(rows)
        except OSError as exc:
            # A full or read-only log directory: no more metrics, but the training so far is
            # not lost with them: fit() stops at the next check, after a checkpoint, and raises
            # this error (the first one; what closing the broken files says is only logged).
            if self._log_error is None:
                self._log_error = exc
            log.error(
                "writing the metrics in %r failed (%s): training stops after writing a checkpoint", self.log_dir, exc
            )
            self._close_logs(quiet=True)
        if getattr(self, "_mlflow", None) is not None:
            self._mlflow.log_rows(rows)

    def _close_logs(self, quiet: bool = False) -> None:
        metrics, self._metrics = getattr(self, "_metrics", None), None
        if metrics is not None:
            metrics.close(quiet)

    # ------------------------------------------------------------------ the loop

    def _early_stop(self) -> bool:
        """After a scheduled evaluation: does early stopping end the run? Rank 0's decision and
        counters are broadcast, so every rank stops at the same step."""
        es = self.early_stopping
        if es is None or not self.evals or self.evals[-1]["step"] != self.step:
            return False
        es.update(self.evals[-1], self.step)
        if self.distributed:
            es.load_state_dict(self.env.broadcast(es.state_dict()))
        if es.stopped and self.is_main:
            log.info("%s", es.reason)
        return es.stopped

    def _mlflow_params(self) -> dict:
        params = dict(
            self._trainer_config(),
            max_steps=self.max_steps,
            eval_every=self.eval_every,
            world_size=self.world_size,
            loss_weights=self.loss_fn.weights,
        )
        if isinstance(self.metadata, dict) and isinstance(self.metadata.get("config"), dict):
            params = {"trainer": params, "config": self.metadata["config"]}
        return params

    # ------------------------------------------------------------------ stopping early

    def _install_signal_handlers(self) -> dict:
        """SIGINT and SIGTERM (what schedulers, torchrun and `timeout` send) ask fit() to stop
        after the step under way, with a checkpoint -> the handlers they replace. Only in the
        main thread (Python allows no other), and never over a signal that is ignored on
        purpose (nohup, a background job) or whose handler was not set from Python (it could
        not be put back)."""
        self._stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            old = signal.getsignal(signum)
            if old is None or old == signal.SIG_IGN:
                continue
            previous[signum] = old
            signal.signal(signum, self._on_signal)
        return previous

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: the loop checks it between steps (a step cut in the middle would leave
        # the model, optimizer and data position out of step with each other).
        if self._stop_signal is None:
            self._stop_signal = signum
        elif signum == signal.SIGINT:  # Ctrl-C again: the user will not wait for the checkpoint
            raise KeyboardInterrupt("SIGINT a second time: stopped at once, without a checkpoint")
        # A repeated SIGTERM is not an order to hurry: launchers relay the scheduler's signal
        # to the workers that the scheduler itself signalled (srun, then torchrun).

    def _halt_agreed(self) -> int:
        """0 to go on, or why every rank stops after this step: _HALT_SIGNAL, _HALT_LOG_ERROR.
        One process: checked after every step. Several: after every log_every-th step (when
        the losses are all-reduced anyway), with one small MAX all-reduce, so that all ranks
        stop at the same step and write one checkpoint together, whichever rank was signalled
        (or, for a metrics error, rank 0, the one that writes them)."""
        mine = _HALT_LOG_ERROR if self._log_error is not None else _HALT_SIGNAL if self._stop_signal is not None else 0
        if not self.distributed:
            return mine
        if self.step % self.log_every:
            return 0
        flag = torch.tensor([mine], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def _halt(self, why: int) -> None:
        """Raises the reason fit() stopped early; the checkpoint of this step is written."""
        if self.checkpoint_dir is None:
            saved = "no checkpoint_dir: nothing was saved"
        else:  # rank 0 knows the path; the others, the directory
            where = repr(self.last_checkpoint) if self.last_checkpoint else f"in {self.checkpoint_dir!r}"
            saved = f"the checkpoint of step {self.step} is written ({where}): run again to resume"
        if self._log_error is not None:  # rank 0: the real error, with what was done about it
            exc = self._log_error
            exc.add_note(
                f"accelops: writing the metrics in {self.log_dir!r} failed, so training stopped after "
                f"step {self.step}; {saved}"
            )
            raise exc
        if why == _HALT_LOG_ERROR:
            raise RuntimeError(
                f"rank {self.rank}/{self.world_size}: rank 0 could not write the metrics in "
                f"{self.log_dir!r} (its error says why); training stopped after step {self.step}; "
                f"{saved}"
            )
        name = signal.Signals(self._stop_signal).name if self._stop_signal is not None else "a signal to another rank"
        # KeyboardInterrupt itself, not a subclass: Python ends a program on an uncaught one by
        # SIGINT (exit status 130) only for that exact type, and a stop asked by a signal should
        # end it as Ctrl-C always did. What a caller may want to know rides on attributes.
        exc = KeyboardInterrupt(f"stopped by {name} after step {self.step}; {saved}")
        exc.signum, exc.step = self._stop_signal, self.step
        exc.checkpoint = self.last_checkpoint if self.checkpoint_dir is not None else None
        raise exc

    # ------------------------------------------------------------------ fit

    def fit(self) -> dict:
        """Trains up to max_steps (or until early stopping) -> {"step", "loss" (last train
        loss), "val_loss" (last evaluation), "resumed_from", "stop_reason" (None, or why
        early stopping ended the run)}.

        SIGINT or SIGTERM stops it after the step under way: a checkpoint is written, then
        KeyboardInterrupt raised, as Ctrl-C did (its attributes signum (None on a rank that
        stopped because another was signalled), step and checkpoint (the path, rank 0) say
        how). An error writing the metrics (a full or read-only log_dir) likewise writes a
        checkpoint, then raises that error."""
        if not self._dirs_ready:  # a second fit(): the first one released checkpoint_dir
            self._prepare_dirs()
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng, self.device)
            self._pending_rng = None
        self._t_start = self._t_flush = time.perf_counter()
        self._pending = []
        self._bar = None
        self._metrics = None
        self._log_error = None
        finished = False
        previous_handlers = {}
        try:
            if self.is_main and self.log_dir:
                self._metrics = MetricsFiles(self.log_dir, self.step)
            if self._mlflow is not None:
                self._mlflow.start(self._mlflow_params(), self._mlflow_resume)
        except BaseException:
            self._close_logs(quiet=True)
            self._release_dirs()
            raise
        if self.is_main and self.progress and self.step < self.max_steps:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=self.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        try:
            previous_handlers = self._install_signal_handlers()
            halt = 0
            stopped = self.early_stopping is not None and self.early_stopping.stopped  # before a resume
            while self.step < self.max_steps and not stopped:
                epoch = self._stream.epoch
                loss, lr, grad_norm, tokens = self._train_step()
                self.step += 1
                self._pending.append(
                    (self.step, loss, lr, grad_norm, tokens, epoch, self._elapsed(), self.loss_fn.pop())
                )
                if self._bar is not None:
                    self._bar.update(1)
                if self.step % self.log_every == 0:
                    self._flush()
                if self.eval_every is not None and self.step % self.eval_every == 0:
                    self._flush()
                    self.evaluate()
                    if self._early_stop():
                        break  # the block after the loop writes the final checkpoint
                if (
                    self.checkpoint_dir is not None
                    and self.checkpoint_every is not None
                    and self.step % self.checkpoint_every == 0
                ):
                    self._flush()
                    self.save_checkpoint()
                halt = self._halt_agreed()
                if halt:
                    break
            self._flush()
            if halt:
                log.warning(
                    "stopping after step %d (%s): writing a checkpoint first",
                    self.step,
                    "an error writing the metrics" if halt == _HALT_LOG_ERROR else "a signal",
                )
            elif self.val_data is not None and self._last_eval != self.step:
                self.evaluate()
            if self.checkpoint_dir is not None and self._last_saved != self.step:
                try:
                    self.save_checkpoint()
                except Exception as exc:
                    if self._log_error is not None:  # the same full disk, often: say what came first
                        exc.add_note(
                            f"accelops: this checkpoint was being written because writing the metrics in "
                            f"{self.log_dir!r} had failed first: {self._log_error!r}"
                        )
                    raise
            if halt or self._log_error is not None:  # a metrics error in the final evaluation too
                self._halt(halt or _HALT_LOG_ERROR)
            finished = True
        except Exception as exc:
            # a dead peer: say so, and where to resume
            clearer = collective_failure(exc, self.env, self.strategy, self.step, self._last_saved, self.checkpoint_dir)
            if clearer is None:
                raise
            raise clearer from exc
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            if self._bar is not None:
                self._bar.close()
            try:
                self._close_logs(quiet=not finished)  # never over the error on its way out
            finally:
                self._release_dirs()
            self.stop_reason = None if self.early_stopping is None else self.early_stopping.reason
            if self._mlflow is not None:
                status = "FINISHED" if finished else "KILLED" if self._stop_signal is not None else "FAILED"
                self._mlflow.finish(self.last_checkpoint, status, tags={"accelops.stop_reason": self.stop_reason})
        self._elapsed_before = self._elapsed()
        del self._t_start
        return {
            "step": self.step,
            "loss": self.history[-1]["loss"] if self.history else None,
            "val_loss": self.evals[-1]["val_loss"] if self.evals else None,
            "resumed_from": self.resumed_from,
            "stop_reason": self.stop_reason,
        }
