"""Gradient compression as DDP communication hooks (and as the BucketedAllReducer's
`compression`), built on the per-rank kernels of accelops.ops.comm.

    state = accelops.distributed.register_compression(ddp_model, "topk", ratio=0.01)

Hooks: "bf16", "fp16" (cast fused with the division by world size, then all-reduce; bf16
works on gloo, which DDP's own bf16 hook refuses), "int8" (stochastic rounding, per-chunk
scale), "topk" (ratio, error feedback), "sign" (1 bit + per-chunk scale, error feedback),
"powersgd" (rank, warm start, error feedback; accelops' Gram-Schmidt).

Every rank issues the same collectives in the same order, whatever its data:
- payloads have shapes fixed by the bucket's size (top-k always sends k slots, padded by
  the kernel), so compressed buckets travel by all-gather of equal-sized buffers, then
  each rank decompresses the same gathered bytes into the same average;
- every collective is launched from the thread that calls the hook (DDP calls the hooks
  bucket by bucket in index order), never from a future's callback. torch's PowerSGD hook
  launches its second all-reduce from the callback of the first, on the communication
  thread, so two buckets' collectives can interleave differently on two ranks (the
  collective mismatch seen in about a third of its 2-rank gloo runs). Here PowerSGD
  pipelines instead: the hook for bucket i+1 waits for bucket i's first all-reduce and
  launches bucket i's second one before its own first one; the last bucket finishes both
  in its own call.

Each state counts the bytes it hands to collectives (`bytes_last_step`, `bytes_total`:
this rank's payload; a ring all-reduce moves about 2(W-1)/W of that over each link, an
all-gather (W-1) times it), and has `state_dict()` / `load_state_dict()` carrying the
error-feedback residuals (per parameter, so a changed bucket layout keeps them), step
counter and PowerSGD's Q matrices. A state is per rank: loading one saved with another
world size or by another rank is an error.
"""

import datetime
import inspect
import math
import zlib

import torch
import torch.distributed as dist

from ..ops import comm
from ._common import Bucket, CommunicationError, PerParamStore, comm_error, completed, group_ranks, timeout_seconds

__all__ = [
    "HOOKS",
    "CompressionState",
    "BF16State",
    "FP16State",
    "Int8State",
    "TopKState",
    "SignState",
    "PowerSGDState",
    "make_state",
    "register_compression",
    "ddp_comm_hook",
    "CommunicationError",
]

# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

HOOKS = ("bf16", "fp16", "int8", "topk", "sign", "powersgd")
STATE_VERSION = 1


# --------------------------------------------------------------------------- option checks


def _int_option(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _bool_option(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return value


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


# --------------------------------------------------------------------------- base


class CompressionState:
    """What one compression hook keeps between steps on one rank.

    process_group: the ranks to average over (default: the whole world; register_compression
    passes the DDP model's). timeout: seconds (or a timedelta) after which a collective
    whose peer does not take part fails with CommunicationError; given, the hook runs its
    collectives on a dedicated process group over the same ranks with that timeout
    (created here: every rank must construct its state at the same point). None: the
    process group's own timeout.
    """

    name = "?"

    def __init__(self, process_group=None, *, timeout=None, seed: int = 0):
        self.timeout_s = timeout_seconds(timeout)
        self.seed = _int_option("seed", seed, 0)
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "accelops.distributed: torch.distributed is not initialized; call "
                "torch.distributed.init_process_group before creating a compression hook"
            )
        group = dist.group.WORLD if process_group is None else process_group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError("process_group: this process is not a member of it")
        self._own_group = False
        if self.world_size > 1 and self.timeout_s is not None:
            group = dist.new_group(
                ranks=group_ranks(group),
                timeout=datetime.timedelta(seconds=self.timeout_s),
                backend=dist.get_backend(group),
            )
            self._own_group = True
        self.group = group
        self.step = 0  # steps completed (a step ends with its last bucket)
        self.bytes_this_step = 0
        self.bytes_last_step = 0
        self.bytes_total = 0
        self._keys: dict[int, str] = {}
        self._residuals = PerParamStore()

    # ---- naming parameters (stable keys for per-parameter state)

    def bind(self, named_parameters) -> "CompressionState":
        """Names the parameters (model.named_parameters()) so per-parameter state is keyed by
        name: checkpoints then survive a different bucket layout."""
        self._keys = {id(p): name for name, p in named_parameters}
        return self

    def _key(self, param, index: int, i: int) -> str:
        return self._keys.get(id(param)) or f"bucket{index}.{i}"

    def bucket_from_ddp(self, grad_bucket) -> Bucket:
        params = grad_bucket.parameters()
        index = grad_bucket.index()
        keys = tuple(self._key(p, index, i) for i, p in enumerate(params))
        return Bucket(index, grad_bucket.buffer(), params, keys, grad_bucket.is_last())

    # ---- running

    def __call__(self, bucket: Bucket) -> torch.futures.Future:
        """Starts averaging bucket.buffer over the ranks -> a future of the averaged buffer."""
        if self.world_size == 1 or bucket.buffer.numel() == 0:
            fut = completed(bucket.buffer)
        else:
            fut = self._reduce(bucket)
        if bucket.is_last:
            self._end_step()
        return fut

    def _reduce(self, bucket: Bucket) -> torch.futures.Future:
        raise NotImplementedError

    def _end_step(self) -> None:
        self.bytes_last_step = self.bytes_this_step
        self.bytes_this_step = 0
        self.step += 1

    def _count(self, tensor: torch.Tensor) -> None:
        n = tensor.numel() * tensor.element_size()
        self.bytes_this_step += n
        self.bytes_total += n

    def _what(self, kind: str, bucket: Bucket) -> str:
        return f"the {self.name} hook's {kind} of bucket {bucket.index} (step {self.step})"

    def _all_reduce(self, tensor: torch.Tensor, bucket: Bucket, kind: str = "all-reduce"):
        """Sum over ranks, in place -> (future of [tensor], what it is, for errors)."""
        what = self._what(kind, bucket)
        self._count(tensor)
        try:
            work = dist.all_reduce(tensor, group=self.group, async_op=True)
        except Exception as exc:
            raise comm_error(what, self.timeout_s, exc) from exc
        return work.get_future(), what

    def _all_gather(self, payload: torch.Tensor, bucket: Bucket):
        """Every rank's equal-sized payload -> ([world_size, numel] rows, future, what)."""
        what = self._what("all-gather", bucket)
        out = torch.empty(self.world_size * payload.numel(), dtype=payload.dtype, device=payload.device)
        self._count(payload)
        try:
            work = _ALL_GATHER(out, payload, group=self.group, async_op=True)
        except Exception as exc:
            raise comm_error(what, self.timeout_s, exc) from exc
        return out.view(self.world_size, -1), work.get_future(), what

    def _then(self, fut: torch.futures.Future, what: str, fn) -> torch.futures.Future:
        """fut.then(fn(value)), a failed collective becoming a CommunicationError about `what`."""
        timeout_s = self.timeout_s

        def callback(f):
            try:
                value = f.value()
            except Exception as exc:
                raise comm_error(what, timeout_s, exc) from exc
            return fn(value)

        return fut.then(callback)

    def bucket_seed(self, index: int, step: int | None = None, rank: int | None = None) -> int:
        """Seed of the stochastic choices for one bucket at one step on one rank (default: now,
        here). It differs per rank, so the ranks' rounding noise is independent, and depends on
        nothing else, so a resumed run draws the same numbers."""
        step = self.step if step is None else step
        rank = self.rank if rank is None else rank
        return (self.seed * 1_000_003 + step * 65_537 + index * 257 + rank * 7_919) % 2_147_483_647

    def param_seed(self, key: str, step: int | None = None, rank: int | None = None) -> int:
        """The same for one parameter (by name): independent of the bucket layout, so a run
        resumed under another layout (DDP's first step uses its initial buckets) draws the
        same numbers."""
        step = self.step if step is None else step
        rank = self.rank if rank is None else rank
        return (self.seed * 1_000_003 + step * 65_537 + zlib.crc32(key.encode()) + rank * 7_919) % 2_147_483_647

    # ---- checkpointing

    def options(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {
            "hook": self.name,
            "version": STATE_VERSION,
            "world_size": self.world_size,
            "rank": self.rank,
            "step": self.step,
            "bytes_total": self.bytes_total,
            "options": self.options(),
            "residuals": dict(self._residuals.items()),
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "hook" not in state:
            raise TypeError("state must be a dict from a compression hook's state_dict()")
        if state["hook"] != self.name:
            raise ValueError(f"state was saved by the {state['hook']!r} hook, this is the {self.name!r} hook")
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"hook state was saved with world size {state['world_size']}, but this process group has "
                f"{self.world_size} ranks: error-feedback residuals (and PowerSGD's matrices) belong to the ranks "
                "of the run that saved them. Resume with the same number of ranks, or start the hook afresh "
                "(skip load_state_dict; residuals start at zero)"
            )
        if state["rank"] != self.rank:
            raise ValueError(
                f"hook state was saved by rank {state['rank']}, this is rank {self.rank}: each rank "
                "loads the state it saved"
            )
        self._check_options(state.get("options", {}))
        self.step = int(state["step"])
        self.bytes_total = int(state.get("bytes_total", 0))
        self.bytes_this_step = self.bytes_last_step = 0
        self._residuals.load(state.get("residuals", {}))

    def _check_options(self, saved: dict) -> None:
        pass

    def close(self) -> None:
        """Releases the dedicated process group (timeout=...); the state is unusable after."""
        if self._own_group:
            dist.destroy_process_group(self.group)
            self._own_group = False

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return (
            f"{type(self).__name__}({opts}{', ' if opts else ''}world_size={self.world_size}, "
            f"rank={self.rank}, step={self.step})"
        )


# --------------------------------------------------------------------------- bf16 / fp16


class _CastState(CompressionState):
    dtype = torch.float32

    def __init__(self, process_group=None, *, timeout=None):
        super().__init__(process_group, timeout=timeout)

    def _reduce(self, bucket: Bucket) -> torch.futures.Future:
        buffer = bucket.buffer
        # x / W rounded once to the wire dtype (one pass), then summed by the all-reduce.
        wire = comm.cast_div(buffer, self.world_size, self.dtype)
        fut, what = self._all_reduce(wire, bucket)
        return self._then(fut, what, lambda value: buffer.copy_(value[0]))


class BF16State(_CastState):
    """bf16 on the wire: x / world_size rounded to bf16, all-reduced (half the bytes)."""

    name, dtype = "bf16", torch.bfloat16


class FP16State(_CastState):
    """fp16 on the wire: x / world_size rounded to fp16, all-reduced (half the bytes)."""

    name, dtype = "fp16", torch.float16


# --------------------------------------------------------------------------- chunked (int8, sign)


class _ChunkedState(CompressionState):
    """A compressor with a scale per chunk of chunk_size elements, run per parameter: a
    chunk never straddles two parameters, whose gradients can differ in scale by orders of
    magnitude (a last layer beside a hidden one); a shared scale would leave the smaller
    one mostly unsent (sign) or rounded to zero (int8). The payload holds every
    parameter's scales first (fp32), then its codes, at offsets fixed by the layout."""

    def _segments(self, bucket: Bucket):
        layout = bucket.layout
        plan = self._plans.get(layout)
        if plan is None:
            n_total = bucket.buffer.numel()
            parts = [(k, n) for k, n in layout if n > 0]
            if sum(n for _, n in parts) != n_total:
                parts = [(f"bucket{bucket.index}", n_total)]
            segs, offset, s_off, c_off = [], 0, 0, 0
            for key, n in parts:
                chunks = -(-n // self.chunk_size)
                code = self._code_bytes(n)
                segs.append((key, offset, n, s_off, chunks, c_off, code))
                offset += n
                s_off += chunks
                c_off += code
            plan = self._plans[layout] = (segs, 4 * s_off, c_off)
        return plan

    def _reduce(self, bucket: Bucket) -> torch.futures.Future:
        buffer = bucket.buffer
        segs, s_bytes, c_bytes = self._segments(bucket)
        residual = self._residuals.get(bucket.layout, buffer.device) if self.error_feedback else None
        payload = torch.empty(s_bytes + c_bytes, dtype=torch.uint8, device=buffer.device)
        scales_out = payload[:s_bytes].view(torch.float32)
        for key, offset, n, s_off, chunks, c_off, code in segs:
            res = None if residual is None else residual[offset : offset + n]
            codes, scales = self._compress(buffer[offset : offset + n], res, key)
            scales_out[s_off : s_off + chunks] = scales
            payload[s_bytes + c_off : s_bytes + c_off + code] = codes.view(torch.uint8)
        rows, fut, what = self._all_gather(payload, bucket)

        def done(_):
            all_scales = rows[:, :s_bytes].contiguous().view(torch.float32)
            all_codes = rows[:, s_bytes:]
            for _, offset, n, s_off, chunks, c_off, code in segs:
                buffer[offset : offset + n] = self._decompress(
                    all_codes[:, c_off : c_off + code].contiguous(),
                    all_scales[:, s_off : s_off + chunks].contiguous(),
                    n,
                )
            return buffer

        return self._then(fut, what, done)


class Int8State(_ChunkedState):
    """INT8 with stochastic rounding and a per-chunk absmax scale (QSGD-like, unbiased),
    all-gathered: 1 byte per element + 4 per chunk. error_feedback is off by default (the
    rounding is unbiased); on, what rounding lost is sent later."""

    name = "int8"

    def __init__(
        self, process_group=None, *, chunk_size: int = 2048, error_feedback: bool = False, seed: int = 0, timeout=None
    ):
        self.chunk_size = _int_option("chunk_size", chunk_size, 1)
        self.error_feedback = _bool_option("error_feedback", error_feedback)
        super().__init__(process_group, timeout=timeout, seed=seed)
        self._plans: dict[tuple, tuple] = {}

    def options(self) -> dict:
        return {"chunk_size": self.chunk_size, "error_feedback": self.error_feedback, "seed": self.seed}

    @staticmethod
    def _code_bytes(n: int) -> int:
        return n

    def _compress(self, grad, residual, key: str):
        return comm.int8_compress_(grad, residual, self.chunk_size, self.param_seed(key))

    def _decompress(self, codes, scales, n: int):
        return comm.int8_decompress(codes.view(torch.int8), scales, self.chunk_size)


# --------------------------------------------------------------------------- top-k


class TopKState(CompressionState):
    """Top-k sparsification with error feedback: each rank sends the k = ceil(ratio * n)
    largest |grad + residual| of a bucket (value fp32 + index int32, 8 bytes each),
    all-gathered; the rest waits in the residual. method: 'exact' or 'sampled' (threshold
    from a sample, Deep Gradient Compression)."""

    name = "topk"

    def __init__(
        self,
        process_group=None,
        *,
        ratio: float = 0.01,
        method: str = "exact",
        sample_size: int = 4096,
        error_feedback: bool = True,
        seed: int = 0,
        timeout=None,
    ):
        ratio = _number("ratio", ratio)
        if not (0.0 < ratio <= 1.0):  # NaN fails too
            raise ValueError(f"ratio must be in (0, 1] (the fraction of gradient elements sent), got {ratio}")
        if method not in comm.METHODS:
            raise ValueError(f"method must be one of {comm.METHODS}, got {method!r}")
        self.ratio, self.method = ratio, method
        self.sample_size = _int_option("sample_size", sample_size, 1)
        self.error_feedback = _bool_option("error_feedback", error_feedback)
        super().__init__(process_group, timeout=timeout, seed=seed)

    def options(self) -> dict:
        return {
            "ratio": self.ratio,
            "method": self.method,
            "sample_size": self.sample_size,
            "error_feedback": self.error_feedback,
            "seed": self.seed,
        }

    def k_for(self, numel: int) -> int:
        return min(numel, max(1, math.ceil(self.ratio * numel)))

    def _reduce(self, bucket: Bucket) -> torch.futures.Future:
        buffer = bucket.buffer
        n = buffer.numel()
        k = self.k_for(n)
        residual = self._residuals.get(bucket.layout, buffer.device) if self.error_feedback else None
        values, indices = comm.topk_compress_(
            buffer, residual, k, self.method, self.sample_size, self.bucket_seed(bucket.index)
        )
        payload = torch.empty(2 * k, dtype=torch.int32, device=buffer.device)
        payload[:k] = values.view(torch.int32)
        payload[k:] = indices
        rows, fut, what = self._all_gather(payload, bucket)

        def done(_):
            all_values = rows[:, :k].contiguous().view(torch.float32)
            all_indices = rows[:, k:].contiguous()
            return buffer.copy_(comm.topk_decompress(all_values, all_indices, n))

        return self._then(fut, what, done)


# --------------------------------------------------------------------------- sign


class SignState(_ChunkedState):
    """1-bit compression with a per-chunk scale (mean |x|) and error feedback, all-gathered:
    n/8 bytes + 4 per chunk."""

    name = "sign"

    def __init__(self, process_group=None, *, chunk_size: int = 2048, error_feedback: bool = True, timeout=None):
        self.chunk_size = _int_option("chunk_size", chunk_size, 1)
        self.error_feedback = _bool_option("error_feedback", error_feedback)
        super().__init__(process_group, timeout=timeout)
        self._plans: dict[tuple, tuple] = {}

    def options(self) -> dict:
        return {"chunk_size": self.chunk_size, "error_feedback": self.error_feedback}

    @staticmethod
    def _code_bytes(n: int) -> int:
        return -(-n // 8)

    def _compress(self, grad, residual, key: str):
        return comm.sign_compress_(grad, residual, self.chunk_size)

    def _decompress(self, codes, scales, n: int):
        return comm.sign_decompress(codes, scales, n, self.chunk_size)


# --------------------------------------------------------------------------- PowerSGD


def _value(fut):
    return fut.value()


class _Pending:
    """A PowerSGD bucket between its two all-reduces."""

    __slots__ = ("bucket", "x", "src", "residual", "plan", "pu", "fut_p", "what_p", "result")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


class PowerSGDState(CompressionState):
    """PowerSGD (Vogels et al. 2019): each gradient matrix M [rows, cols] (a parameter of
    >= 2 dims, flattened after its first) becomes P Q^T of rank `rank`: P = M Q summed over
    ranks and orthogonalized (accelops' Gram-Schmidt), Q = M^T P averaged over ranks. Q is
    kept for the next step (warm start) and M's approximation error is fed back.
    Parameters too small to gain ((rows + cols) * rank * min_compression_rate >= rows * cols:
    biases, norms) are all-reduced uncompressed in the same collective as P. The first
    start_iter steps are plain averaging. Two all-reduces per bucket, pipelined across
    buckets (module docstring)."""

    name = "powersgd"

    def __init__(
        self,
        process_group=None,
        *,
        rank: int = 1,
        warm_start: bool = True,
        error_feedback: bool = True,
        start_iter: int = 0,
        min_compression_rate: float = 2.0,
        eps: float = 1e-8,
        seed: int = 0,
        timeout=None,
    ):
        self.matrix_rank = _int_option("rank", rank, 1)
        self.warm_start = _bool_option("warm_start", warm_start)
        self.error_feedback = _bool_option("error_feedback", error_feedback)
        self.start_iter = _int_option("start_iter", start_iter, 0)
        self.min_compression_rate = _number("min_compression_rate", min_compression_rate)
        if not (math.isfinite(self.min_compression_rate) and self.min_compression_rate >= 1):
            raise ValueError(f"min_compression_rate must be a finite number >= 1, got {min_compression_rate}")
        self.eps = _number("eps", eps)
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps}")
        super().__init__(process_group, timeout=timeout, seed=seed)
        self._q: dict[str, torch.Tensor] = {}
        self._plans: dict[tuple, tuple] = {}
        self._pending: _Pending | None = None
        self._broken: CommunicationError | None = None

    def options(self) -> dict:
        return {
            "rank": self.matrix_rank,
            "warm_start": self.warm_start,
            "error_feedback": self.error_feedback,
            "start_iter": self.start_iter,
            "min_compression_rate": self.min_compression_rate,
            "eps": self.eps,
            "seed": self.seed,
        }

    def _check_options(self, saved: dict) -> None:
        if "rank" in saved and saved["rank"] != self.matrix_rank:
            raise ValueError(
                f"hook state was saved with PowerSGD rank {saved['rank']}, this hook has rank "
                f"{self.matrix_rank}: its Q matrices do not fit"
            )

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["q"] = {k: q.clone() for k, q in self._q.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._q = {k: q.detach().to(torch.float32).clone() for k, q in state.get("q", {}).items()}

    # ---- plan: which parameters are compressed, where their pieces go

    def _plan(self, bucket: Bucket):
        layout = bucket.layout
        plan = self._plans.get(layout)
        if plan is not None:
            return plan
        if sum(n for _, n in layout) != bucket.buffer.numel():
            raise RuntimeError(
                f"powersgd: bucket {bucket.index} holds {bucket.buffer.numel()} elements but its "
                f"parameters {sum(n for _, n in layout)}: unexpected bucket layout"
            )
        matrices, vectors = [], []
        offset = p_off = q_off = u_off = 0
        for key, param in zip(bucket.keys, bucket.params):
            n = param.numel()
            if param.dim() >= 2 and n > 0:
                rows = param.shape[0]
                cols = n // rows
                r = min(self.matrix_rank, rows, cols)
                if (rows + cols) * r * self.min_compression_rate < rows * cols:
                    matrices.append((key, offset, rows, cols, r, p_off, q_off))
                    p_off += rows * r
                    q_off += cols * r
                    offset += n
                    continue
            vectors.append((offset, n, u_off))
            u_off += n
            offset += n
        plan = (matrices, vectors, p_off, q_off, u_off)
        self._plans[layout] = plan
        return plan

    def _q_for(self, key: str, cols: int, r: int, device) -> torch.Tensor:
        q = self._q.get(key)
        if q is None or q.shape != (cols, r) or not self.warm_start:
            # Same seed on every rank: the ranks start from one Q (afterwards Q is averaged).
            step = 0 if self.warm_start else self.step
            gen = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + step * 65_537 + zlib.crc32(key.encode())) % (2**62)
            )
            q = torch.randn(cols, r, generator=gen, dtype=torch.float32)
        q = q.to(device).contiguous()
        return comm.orthogonalize_(q, self.eps)

    # ---- the hook

    def _reduce(self, bucket: Bucket) -> torch.futures.Future:
        if self.step < self.start_iter:
            buffer, w = bucket.buffer, self.world_size
            fut, what = self._all_reduce(buffer, bucket)
            return self._then(fut, what, lambda value: value[0].div_(w))
        self._finish_pending()  # the previous bucket's second all-reduce first
        result = torch.futures.Future()
        if self._broken is not None:  # an earlier bucket's collective failed: no more
            result.set_exception(self._broken)
        else:
            self._start(bucket, result)
        if bucket.is_last:
            self._finish_pending()
            self._broken = None
        # set_exception stores the error as the future's value, which DDP (C++) cannot read:
        # re-raised in a callback it becomes a proper failed future with the message.
        return result.then(_value)

    def _start(self, bucket: Bucket, result: torch.futures.Future) -> None:
        buffer = bucket.buffer
        matrices, vectors, p_total, _, u_total = self._plan(bucket)
        x = buffer if buffer.dtype == torch.float32 else buffer.float()
        residual = None
        src = x  # what is compressed: the gradient + the residual
        if self.error_feedback:
            # The residual becomes the accumulated gradient in place (one pass, no copy) and
            # is read from there; x receives the approximation; acc - approximation at the end.
            residual = self._residuals.get(bucket.layout, buffer.device)
            src = residual.add_(x)
        pu = torch.empty(p_total + u_total, dtype=torch.float32, device=buffer.device)
        for key, off, rows, cols, r, p_off, _ in matrices:
            m = src[off : off + rows * cols].view(rows, cols)
            q = self._q_for(key, cols, r, buffer.device)
            torch.mm(m, q, out=pu[p_off : p_off + rows * r].view(rows, r))
        for off, n, u_off in vectors:
            pu[p_total + u_off : p_total + u_off + n].copy_(src[off : off + n])
        try:
            fut_p, what_p = self._all_reduce(pu, bucket, "all-reduce of P")
        except CommunicationError as err:
            self._broken = err
            result.set_exception(err)
            return
        self._pending = _Pending(
            bucket=bucket,
            x=x,
            src=src,
            residual=residual,
            plan=(matrices, vectors, p_total),
            pu=pu,
            fut_p=fut_p,
            what_p=what_p,
            result=result,
        )

    def _finish_pending(self) -> None:
        pend, self._pending = self._pending, None
        if pend is None:
            return
        try:
            try:
                pend.fut_p.wait()
            except Exception as exc:
                raise comm_error(pend.what_p, self.timeout_s, exc) from exc
            matrices, vectors, p_total = pend.plan
            x, pu, w = pend.x, pend.pu, self.world_size
            for off, n, u_off in vectors:
                torch.div(pu[p_total + u_off : p_total + u_off + n], w, out=x[off : off + n])
            q_total = sum(cols * r for _, _, _, cols, r, _, _ in matrices)
            qbuf = torch.empty(q_total, dtype=torch.float32, device=x.device)
            for key, off, rows, cols, r, p_off, q_off in matrices:
                p = pu[p_off : p_off + rows * r].view(rows, r)
                comm.orthogonalize_(p, self.eps)
                m = pend.src[off : off + rows * cols].view(rows, cols)
                # Q^T = P^T M, stored [r, cols]: 8x faster here than M^T P into [cols, r]
                # (a GEMM over the transposed M), and P Q^T later reads it as is.
                torch.mm(p.t(), m, out=qbuf[q_off : q_off + cols * r].view(r, cols))
            if not matrices:
                self._complete(pend, qbuf)
                return
            fut_q, what_q = self._all_reduce(qbuf, pend.bucket, "all-reduce of Q")
        except Exception as exc:
            if isinstance(exc, CommunicationError):
                self._broken = exc
            pend.result.set_exception(exc)
            return
        timeout_s = self.timeout_s

        def done(f):
            try:
                f.value()
            except Exception as exc:
                pend.result.set_exception(comm_error(what_q, timeout_s, exc))
                return
            try:
                self._complete(pend, qbuf)
            except Exception as exc:
                pend.result.set_exception(exc)

        fut_q.add_done_callback(done)

    def _complete(self, pend: _Pending, qbuf: torch.Tensor) -> None:
        matrices, vectors, _ = pend.plan
        x, pu = pend.x, pend.pu
        qbuf.div_(self.world_size)
        for key, off, rows, cols, r, p_off, q_off in matrices:
            qt = qbuf[q_off : q_off + cols * r].view(r, cols)
            torch.mm(pu[p_off : p_off + rows * r].view(rows, r), qt, out=x[off : off + rows * cols].view(rows, cols))
            self._q[key] = qt.t()
        if pend.residual is not None:
            pend.residual.sub_(x)
            for off, n, _ in vectors:  # sent exactly: nothing to feed back
                pend.residual[off : off + n].zero_()
        buffer = pend.bucket.buffer
        if x is not buffer:
            buffer.copy_(x)
        pend.result.set_result(buffer)


# --------------------------------------------------------------------------- registry

_STATES = {
    "bf16": BF16State,
    "fp16": FP16State,
    "int8": Int8State,
    "topk": TopKState,
    "sign": SignState,
    "powersgd": PowerSGDState,
}


def make_state(name: str, **options) -> CompressionState:
    """The state of hook `name` with its options (process_group, timeout and the hook's own)."""
    if not isinstance(name, str) or name not in _STATES:
        raise ValueError(f"name must be one of {HOOKS}, got {name!r}")
    cls = _STATES[name]
    params = inspect.signature(cls.__init__).parameters
    unknown = [k for k in options if k not in params or k == "self"]
    if unknown:
        allowed = [k for k in params if k != "self"]
        raise TypeError(f"the {name!r} hook has no option {unknown[0]!r}; its options: {allowed}")
    return cls(**options)


def ddp_comm_hook(state, bucket):
    """DDP communication hook: state(bucket). (No annotations: DDP checks them against its
    own types, and this module's are strings.)"""
    return state(state.bucket_from_ddp(bucket))


def register_compression(ddp_model, name: str, **options) -> CompressionState:
    """Registers hook `name` ("bf16", "fp16", "int8", "topk", "sign", "powersgd") on a
    DistributedDataParallel model -> its state (state_dict(), bytes_last_step, ...).
    Every rank must call it, at the same point, before the first backward."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(
            f"ddp_model must be a torch.nn.parallel.DistributedDataParallel, got {type(ddp_model).__name__}"
        )
    existing = getattr(ddp_model, "_accelops_compression", None)
    if existing is not None:
        raise RuntimeError(
            f"a compression hook ({existing.name!r}) is already registered on this model; DDP "
            "takes one communication hook per model: wrap the module in a new "
            "DistributedDataParallel to use another"
        )
    if getattr(ddp_model, "_comm_hooks", None):
        raise RuntimeError(
            "this model already has a DDP communication hook (register_comm_hook); DDP takes one "
            "communication hook per model"
        )
    if not isinstance(name, str) or name not in _STATES:
        raise ValueError(f"name must be one of {HOOKS}, got {name!r}")
    options.setdefault("process_group", ddp_model.process_group)
    state = make_state(name, **options)
    state.bind(ddp_model.module.named_parameters())
    ddp_model.register_comm_hook(state, ddp_comm_hook)
    ddp_model._accelops_compression = state
    return state
