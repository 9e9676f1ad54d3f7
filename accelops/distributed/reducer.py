"""BucketedAllReducer: data-parallel gradient averaging without DDP's module wrapper.

    reducer = BucketedAllReducer(model)            # or model.parameters()
    loss.backward()                                # buckets are all-reduced while backward runs
    reducer.finish()                               # cheap when backward's end already finished them
    optimizer.step()

Buckets hold parameters in reverse registration order (the order backward produces their
gradients), one dtype and device per bucket; the first is small (first_bucket_mb) so
communication starts early, the rest are up to bucket_cap_mb, as in DDP. A hook on each
parameter's gradient accumulation (register_post_accumulate_grad_hook) counts the bucket
down; a full bucket is flattened with the division by the world size fused into the copy
(accelops.ops.comm.bucket_flatten) and its asynchronous all-reduce is launched at once,
buckets strictly in index order so every rank issues the same collectives in the same
sequence. The end of backward (an autograd-engine callback) launches what is left (buckets
with unused parameters), waits for everything and copies the averages back into .grad.
Without compression the gradients equal DDP's bit for bit (same 1/W scaling, same sum).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import threading

import torch
import torch.distributed as dist

from ..ops import comm
from ._common import Bucket, comm_error, timeout_seconds
from .hooks import CompressionState, make_state

__all__ = ["BucketedAllReducer"]

_MB = 1024 * 1024


class _Bucket:
    __slots__ = ("index", "params", "dtype", "device", "numel")

    def __init__(self, index, params, dtype, device):
        self.index, self.params, self.dtype, self.device = index, params, dtype, device
        self.numel = 0


def _cap(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of MiB, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number of MiB > 0, got {value}")
    return float(value)


class BucketedAllReducer:
    """Averages the gradients of `params` over `process_group` (default: the world).

    params: an nn.Module (its named_parameters()), or an iterable of parameters or of
    (name, parameter) pairs. Parameters listed twice (tied weights) are reduced once;
    those without requires_grad are skipped. compression: None (exact mean, as DDP),
    a hook name of accelops.distributed.hooks ("bf16", "topk", ...; default options) or a
    CompressionState built for the same process group. find_unused_parameters: as DDP's
    flag, one small extra all-reduce per step so that a parameter no rank used keeps
    grad None; without it such a parameter gets a zero gradient (parameters unused on
    some ranks are averaged correctly either way). timeout: seconds (or timedelta) to wait
    for a bucket before raising CommunicationError (default: the process group's timeout).
    """

    def __init__(
        self,
        params,
        process_group=None,
        bucket_cap_mb=25,
        first_bucket_mb=1,
        compression=None,
        *,
        find_unused_parameters: bool = False,
        timeout=None,
    ):
        named = self._collect(params)
        self.bucket_cap_mb = _cap("bucket_cap_mb", bucket_cap_mb)
        self.first_bucket_mb = _cap("first_bucket_mb", first_bucket_mb)
        if not isinstance(find_unused_parameters, bool):
            raise TypeError(
                f"find_unused_parameters must be True or False, got {type(find_unused_parameters).__name__}"
            )
        self.find_unused_parameters = find_unused_parameters
        self.timeout_s = timeout_seconds(timeout)
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "accelops.distributed: torch.distributed is not initialized; call "
                "torch.distributed.init_process_group before building a BucketedAllReducer"
            )
        self.process_group = dist.group.WORLD if process_group is None else process_group
        self.world_size = dist.get_world_size(self.process_group)
        self.rank = dist.get_rank(self.process_group)
        if self.rank < 0:
            raise ValueError("process_group: this process is not a member of it")

        if compression is None or isinstance(compression, CompressionState):
            state = compression
        elif isinstance(compression, str):
            state = make_state(compression, process_group=self.process_group)
        else:
            raise TypeError(
                f"compression must be None, a hook name or a CompressionState, got {type(compression).__name__}"
            )
        if state is not None and state.world_size != self.world_size:
            raise ValueError(f"compression state is for {state.world_size} ranks, process_group has {self.world_size}")
        self.compression = state

        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        if state is not None:
            state.bind(named)
        self._buckets = self._assign_buckets()
        self._where = {}  # id(param) -> (bucket index, slot)
        for b in self._buckets:
            for slot, i in enumerate(b.params):
                self._where[id(self.params[i])] = (b.index, slot)

        self.step = 0
        self.bytes_this_step = 0
        self.bytes_last_step = 0
        self.bytes_total = 0
        self.buckets_launched_in_backward = 0  # last step: buckets whose all-reduce overlapped backward
        self._lock = threading.RLock()
        self._enabled = True
        self._in_round = False
        self._done = False
        self._reset_round()
        self._handles = []
        if self.world_size > 1:
            for p in self.params:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))

    # ------------------------------------------------------------------ set-up

    @staticmethod
    def _collect(params) -> list[tuple[str, torch.Tensor]]:
        if isinstance(params, torch.nn.Module):
            items = list(params.named_parameters())  # already free of duplicates
        elif isinstance(params, torch.Tensor):
            raise TypeError(
                "params must be an nn.Module or an iterable of parameters, got a single tensor (wrap it in a list)"
            )
        else:
            try:
                items = list(params)
            except TypeError:
                raise TypeError(
                    f"params must be an nn.Module or an iterable of parameters, got {type(params).__name__}"
                ) from None
            items = [it if isinstance(it, tuple) else (str(i), it) for i, it in enumerate(items)]
        seen, named = set(), []
        for name, p in items:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params[{name}] must be a tensor (parameter), got {type(p).__name__}")
            if id(p) in seen or not p.requires_grad:
                continue
            if not p.is_leaf:
                raise ValueError(f"params[{name}] is not a leaf tensor: only leaves accumulate .grad")
            if p.is_sparse:
                raise ValueError(f"params[{name}] is sparse; BucketedAllReducer reduces dense gradients")
            seen.add(id(p))
            named.append((name, p))
        if not named:
            raise ValueError("params holds no tensor that requires grad")
        return named

    def _assign_buckets(self) -> list[_Bucket]:
        """DDP's assignment: walk the parameters in reverse, one open bucket per (dtype,
        device); a bucket closes once it reaches its cap (the first cap for each dtype's
        first bucket); buckets are ordered by when backward reaches their first parameter."""
        limits = [self.first_bucket_mb * _MB, self.bucket_cap_mb * _MB]
        open_, closed = {}, []  # key -> [first position, indices, bytes, limit index]
        for pos, i in enumerate(reversed(range(len(self.params)))):
            p = self.params[i]
            key = (p.dtype, p.device)
            cur = open_.get(key)
            if cur is None:
                cur = open_[key] = [pos, [], 0, 0 if key not in {k for _, _, k in closed} else 1]
            cur[1].append(i)
            cur[2] += p.numel() * p.element_size()
            if cur[2] >= limits[cur[3]]:
                closed.append((cur[0], cur[1], key))
                del open_[key]
        closed += [(cur[0], cur[1], key) for key, cur in open_.items()]
        closed.sort(key=lambda c: c[0])
        buckets = []
        for index, (_, indices, (dtype, device)) in enumerate(closed):
            b = _Bucket(index, indices, dtype, device)
            b.numel = sum(self.params[i].numel() for i in indices)
            buckets.append(b)
        return buckets

    @property
    def bucket_sizes(self) -> list[int]:
        """Elements per bucket, in launch order."""
        return [b.numel for b in self._buckets]

    def bucket_params(self, index: int) -> list[str]:
        return [self.names[i] for i in self._buckets[index].params]

    # ------------------------------------------------------------------ per step

    def _reset_round(self) -> None:
        self._pending = [len(b.params) for b in self._buckets]
        self._ready = [bytearray(len(b.params)) for b in self._buckets]
        self._next = 0
        self._inflight = []  # (bucket, targets, fresh, waiter)
        self._early = 0

    def _on_grad_ready(self, param) -> None:
        if not self._enabled:
            return
        with self._lock:
            if not self._in_round:
                self._start_round()
                try:
                    torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
                except RuntimeError:  # not inside a backward: finish() does it
                    pass
            b, slot = self._where[id(param)]
            if self._ready[b][slot]:
                return
            self._ready[b][slot] = 1
            self._pending[b] -= 1
            while self._next < len(self._buckets) and self._pending[self._next] == 0:
                self._launch(self._buckets[self._next])
                self._next += 1
                self._early += 1

    def _start_round(self) -> None:
        self._reset_round()
        self._in_round = True
        self._done = False

    def _launch(self, bucket: _Bucket) -> None:
        targets, sources, fresh = [], [], {}
        for slot, i in enumerate(bucket.params):
            p = self.params[i]
            g = p.grad
            if g is None:
                g = fresh[slot] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            targets.append(g)
            sources.append(g if g.is_contiguous() else g.contiguous())
        last = bucket.index == len(self._buckets) - 1
        if self.compression is None:
            flat = comm.bucket_flatten(sources, divisor=self.world_size)
            self._count(flat)
            try:
                work = dist.all_reduce(flat, group=self.process_group, async_op=True)
            except Exception as exc:
                raise comm_error(f"the all-reduce of bucket {bucket.index}", self.timeout_s, exc) from exc
            waiter = (work, flat)
        else:
            flat = comm.bucket_flatten(sources)
            view = Bucket(
                bucket.index,
                flat,
                [self.params[i] for i in bucket.params],
                tuple(self.names[i] for i in bucket.params),
                last,
            )
            waiter = (None, self.compression(view))
        self._inflight.append((bucket, targets, fresh, waiter))

    def _wait(self, what: str, waiter) -> torch.Tensor:
        work, obj = waiter
        try:
            if work is None:  # a compression hook's future
                return obj.wait()
            if self.timeout_s is None:
                work.wait()
            else:
                work.wait(datetime.timedelta(seconds=self.timeout_s))
            return obj
        except Exception as exc:
            raise comm_error(what, self.timeout_s, exc) from exc

    def _finalize(self) -> None:
        try:
            while self._next < len(self._buckets):  # buckets with parameters unused in this step
                self._launch(self._buckets[self._next])
                self._next += 1
            used = None
            if self.find_unused_parameters:
                used = torch.zeros(len(self.params), dtype=torch.int32)
                for b in self._buckets:
                    for slot, i in enumerate(b.params):
                        used[i] = 1 if (self._ready[b.index][slot] or self.params[i].grad is not None) else 0
                try:
                    work = dist.all_reduce(used, group=self.process_group, async_op=True)
                except Exception as exc:
                    raise comm_error("the all-reduce of the used-parameter map", self.timeout_s, exc) from exc
                used = (work, used)
            for bucket, targets, fresh, waiter in self._inflight:
                flat = self._wait(f"the all-reduce of bucket {bucket.index}", waiter)
                outs = [
                    t if t.is_contiguous() else torch.empty_like(t, memory_format=torch.contiguous_format)
                    for t in targets
                ]
                comm.bucket_unflatten_(flat, outs)
                for t, o in zip(targets, outs):
                    if o is not t:
                        t.copy_(o)
            if used is not None:
                used = self._wait("the all-reduce of the used-parameter map", used)
            for bucket, targets, fresh, _ in self._inflight:
                for slot, g in fresh.items():
                    i = bucket.params[slot]
                    if used is None or int(used[i]) > 0:
                        self.params[i].grad = g
            if self.compression is not None:
                self.bytes_this_step = self.compression.bytes_last_step
            self.buckets_launched_in_backward = self._early
            self._end_step()
        finally:
            self._inflight = []
            self._in_round = False

    def _count(self, t: torch.Tensor) -> None:
        self.bytes_this_step += t.numel() * t.element_size()

    def _end_step(self) -> None:
        self.bytes_last_step = self.bytes_this_step
        self.bytes_total += self.bytes_this_step
        self.bytes_this_step = 0
        self.step += 1

    def _end_of_backward(self) -> None:
        with self._lock:
            if self._in_round:
                self._finalize()
                self._done = True

    # ------------------------------------------------------------------ public

    def finish(self) -> None:
        """Completes this step's reduction: every bucket averaged, .grad holding the averages.
        Call once per step after backward and before the optimizer step, on every rank: a rank
        whose backward touched none of the parameters still has to take part. Under no_sync()
        it does nothing."""
        if not self._enabled or self.world_size == 1:
            return
        with self._lock:
            if self._done:  # backward's end already did it
                self._done = False
                return
            if not self._in_round:
                self._start_round()
            self._finalize()
            self._done = False

    wait = finish

    @contextlib.contextmanager
    def no_sync(self):
        """Gradients accumulate locally in .grad; the first backward after the block
        reduces the accumulated sum (gradient accumulation, as DDP's no_sync)."""
        previous = self._enabled
        self._enabled = False
        try:
            yield
        finally:
            self._enabled = previous

    def broadcast_parameters(self, src: int = 0) -> None:
        """Copies rank src's parameter values to every rank (as DDP does when built)."""
        if self.world_size == 1:
            return
        global_src = (
            dist.get_global_rank(self.process_group, src) if self.process_group is not dist.group.WORLD else src
        )
        with torch.no_grad():
            for p in self.params:
                dist.broadcast(p.data, src=global_src, group=self.process_group)

    def remove(self) -> None:
        """Removes the gradient hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __repr__(self) -> str:
        comp = self.compression.name if self.compression is not None else None
        return (
            f"BucketedAllReducer({len(self.params)} parameters in {len(self._buckets)} buckets "
            f"{self.bucket_sizes}, world_size={self.world_size}, compression={comp!r})"
        )
