"""Generate family: end-to-end text generation at BitNet b1.58 2B4T's shape (issue 25).

Random weights (speed depends on shapes and formats, not values), a prompt of 128 tokens,
128 new tokens, greedy, batch 1 and 4, each thread count of --threads. Engines:

    accelops       TransformerLM (2B4T architecture), accelops.convert(model, "ternary",
                   head="int8"): packed ternary projections, one int8 weight serving the tied
                   embedding and LM head; model.generate (static KV cache)
    accelops_base3 the same model with every ternary projection repacked in the base3 format
                   (5 weights a byte, 1.6 bits; TernaryLinear.to_format("base3"))
    accelops_hf    transformers BitNetForCausalLM of the same shape, converted by
                   accelops.convert(model, "ternary", head="int8"); transformers' generate
    hf_bf16        transformers BitNetForCausalLM in bf16, eager (no torch.compile; SDPA attention)
    hf_fp32        the same in fp32
    torchao        the fp32 transformers model after torchao's quantize_(Int8DynamicActivation-
                   Int8WeightConfig()), forward under torch.compile, static cache (skipped with
                   the reason when torchao is not importable)

Each engine runs in a fresh subprocess, so its peak resident memory is its own. Measured:
time to first token (TTFT: prefill + first token; median of repeats), prefill tokens/s
(batch x prompt / TTFT), decode tokens/s (batch / median time of a decode step; p20/p80 of
the steps), peak resident memory during generation (VmHWM after a reset, model included),
model bytes (every parameter and buffer, each storage once). Before timing, each engine's
greedy tokens are checked against its own no-cache forward (a near-tie within the engine's
rounding counts as agreement: bf16 and int8 change which of two close logits wins); an
accelops engine that fails is not timed, a peer is timed and the table shows by how much
(in standard deviations of the logits) its chosen token trailed the forward's best.

The decode-step breakdown (accelops engine, batch 1): manual timers on the modules of one
decode step (ternary matmuls, the int8 head, attention with RoPE and the cache, norms, the
FFN's activation, embedding, sampling) and the rest (Python, residual adds, masks) as the
step's wall time minus those parts; the fused step (ternary_decode_layer, what generate runs
for this model) against the eager one, and its time outside the matmuls (its step minus the
same GEMVs and head run alone); then torch.compile of the eager decode step, kept in the
table only when its greedy tokens equal the eager ones. The accelops engine's generate runs
the fused step (generate's default where the model allows it).

    python bench/bench_generate.py [--quick] [--threads 1,2] [--shape 2b4t|small]
                                   [--engines accelops,hf_bf16,...] [--batch 1,4]

--shape small: dim 1024, 8 layers, vocab 32000 (minutes); --quick: a tiny model. The full
2B4T run needs ~10 GB of memory for the fp32 engine and takes ~1 h on 2 cores. (--shape,
--engines and --batch are also read from ACCELOPS_BENCH_GENERATE_SHAPE / _ENGINES / _BATCH
when the family runs from bench/run.py.)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common
import torch

FAMILY = "generate"
HERE = Path(__file__).resolve()

SHAPES = {
    # TransformerLMConfig.bitnet_2b4t(): microsoft/bitnet-b1.58-2B-4T
    "2b4t": dict(vocab_size=128256, dim=2560, n_layers=30, n_heads=20, n_kv_heads=5, hidden=6912),
    "small": dict(vocab_size=32000, dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, hidden=2816),
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=96),
}
ENGINES = {
    "accelops": "accelops TransformerLM, ternary, int8 tied head/embedding",
    "accelops_base3": "accelops TransformerLM, ternary in the base3 format (5 weights a byte), int8 head/embedding",
    "accelops_hf": "transformers BitNet converted by accelops (ternary, head='int8')",
    "hf_bf16": "transformers BitNet, bf16, eager",
    "hf_fp32": "transformers BitNet, fp32, eager",
    "torchao": "transformers BitNet, torchao int8 dynamic + torch.compile",
}
# Reference points from the issue (Intel Xeon, 2 threads, batch 1, decode tok/s), not measured here.
REFERENCE = {"transformers bf16": 2.47, "transformers fp32": 2.37, "bitnet.cpp I2_S": 10.88, "bitnet.cpp TL2": 12.06}
TARGETS = {"vs bitnet.cpp I2_S": 1.2, "vs transformers bf16": 10.0}


# =========================================================================== worker side


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    common._malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        plain = type(t) in (torch.Tensor, torch.nn.Parameter)
        key = ("ptr", t.untyped_storage().data_ptr()) if plain and t.numel() else ("id", id(t))
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes() if plain else common.tensor_bytes(t)
    return total


@torch.no_grad()
def _fill_random_(model, std: float = 0.02) -> None:
    """Random values in place, in chunks (no fp32 copy of a whole large weight): float
    tensors N(0, std) (norm weights 1), accelops' quantized layers from random float rows."""
    from accelops import ops
    from accelops.nn import Int8Embedding, Int8Linear, TernaryLinear

    done = set()
    for name, m in model.named_modules():
        if id(m) in done:
            continue
        done.add(id(m))
        if isinstance(m, TernaryLinear):
            w_packed, w_scale = ops.quantize_weight_ternary(
                torch.randn(m.out_features, m.in_features) * std, m.per_channel
            )
            m.w_packed.copy_(w_packed)
            m.w_scale.copy_(w_scale)
        elif isinstance(m, (Int8Linear, Int8Embedding)):
            rows = m.w_q.shape[0]
            for s in range(0, rows, 8192):  # per-row scales: chunks of rows quantize the same
                w_q, w_scale = ops.quantize_weight_int8(torch.randn(min(8192, rows - s), m.w_q.shape[1]) * std)
                m.w_q[s : s + 8192].copy_(w_q)
                m.w_scale[s : s + 8192].copy_(w_scale)
        else:
            for pname, p in m.named_parameters(recurse=False):
                if "norm" in name or "norm" in pname:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, std)


def _hf_config(shape: dict, max_len: int):
    import transformers

    return transformers.BitNetConfig(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["dim"],
        intermediate_size=shape["hidden"],
        num_hidden_layers=shape["n_layers"],
        num_attention_heads=shape["n_heads"],
        num_key_value_heads=shape["n_kv_heads"],
        max_position_embeddings=max_len,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )


def _hf_model(shape: dict, max_len: int, dtype: torch.dtype):
    """transformers BitNetForCausalLM of `shape` with random weights, built in `dtype`."""
    import transformers

    transformers.logging.set_verbosity_error()
    config = _hf_config(shape, max_len)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = transformers.BitNetForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    # Parameters built empty, then random (no init pass over 2.4e9 weights); the rotary
    # frequencies (a non-persistent buffer) are computed again for real.
    model.to_empty(device="cpu")
    _fill_random_(model)
    for parent in list(model.modules()):
        for name, m in list(parent.named_children()):
            if type(m).__name__.endswith("RotaryEmbedding"):
                setattr(parent, name, type(m)(config=config))  # built on the CPU: its frequencies computed
    bad = [n for n, b in model.named_buffers() if b.is_floating_point() and not torch.isfinite(b).all()]
    if bad:
        raise RuntimeError(f"buffers left uninitialised after to_empty: {bad}")
    model.tie_weights()
    return model.eval()


class _Stamps:
    """transformers streamer: a perf_counter stamp at every generated token (the first put
    is the prompt, before the prefill)."""

    def __init__(self):
        self.stamps, self.seen_prompt = [], False

    def put(self, value):
        if self.seen_prompt:
            self.stamps.append(time.perf_counter())
        self.seen_prompt = True

    def end(self):
        pass


def build(engine: str, shape: dict, max_len: int):
    """-> (model, generate(prompts, n) -> (tokens [batch, n], start, stamps), forward(ids) ->
    logits (no cache), note)."""
    import accelops

    if engine in ("accelops", "accelops_base3"):
        from accelops.models import TransformerLM, TransformerLMConfig
        from accelops.nn import TernaryLinear

        cfg = TransformerLMConfig.bitnet_2b4t(**shape, max_len=max_len)
        with torch.device("meta"):
            model = TransformerLM(cfg)
        report = accelops.convert(model, "ternary", head="int8")
        model.to_empty(device="cpu")
        _fill_random_(model)
        if engine == "accelops_base3":  # the same weights repacked, 1.6 bits a weight
            for m in model.modules():
                if isinstance(m, TernaryLinear):
                    m.to_format("base3")
        model.eval()

        def generate(prompts, n):
            stamps = []
            start = time.perf_counter()
            out = model.generate(prompts, n, temperature=0, stream=lambda tok: stamps.append(time.perf_counter()))
            return out, start, stamps

        return model, generate, lambda ids: model(ids), f"{report.num_swapped} layers swapped"

    if engine in ("hf_bf16", "hf_fp32", "accelops_hf", "torchao"):
        dtype = torch.bfloat16 if engine in ("hf_bf16", "accelops_hf") else torch.float32
        model = _hf_model(shape, max_len, dtype)
        note = f"attention {model.config._attn_implementation}"
        forward = None
        if engine == "accelops_hf":
            # built in bf16 (half the memory of fp32 while converting); the float parts left
            # after conversion (norms) go back to fp32 so activations are fp32
            report = accelops.convert(model, "ternary", head="int8")
            model.float()
            note += f"; built bf16, converted ({report.num_swapped} layers), then .float()"
        if engine == "torchao":
            _, why = common.import_torchao()
            if why:
                raise _Skip(why)
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            quantize_(model, Int8DynamicActivationInt8WeightConfig())
            eager_forward = model.forward
            forward = lambda ids: eager_forward(ids, use_cache=False).logits  # noqa: E731
            model.forward = torch.compile(model.forward)
            model.generation_config.cache_implementation = "static"
            note += "; quantize_(Int8DynamicActivationInt8WeightConfig()), torch.compile(forward), static cache"
        if forward is None:
            forward = lambda ids: model(ids, use_cache=False).logits  # noqa: E731

        def generate(prompts, n):
            streamer = _Stamps()
            start = time.perf_counter()
            out = model.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                streamer=streamer,
                pad_token_id=0,
            )
            return out[:, prompts.shape[1] :], start, streamer.stamps

        return model, generate, forward, note
    raise ValueError(f"unknown engine {engine!r}")


class _Skip(Exception):
    pass


@torch.no_grad()
def check_greedy(generate, forward, prompts, n: int, tol: float) -> dict:
    """The engine's greedy tokens against its no-cache forward over prompt + tokens: each
    token must be the argmax, or within tol x (the logits' std) of the max (a near-tie)."""
    tokens, _, _ = generate(prompts, n)
    seq = torch.cat([prompts, tokens[:, :-1]], dim=1)
    logits = forward(seq)[:, prompts.shape[1] - 1 :].float()
    picked = logits.gather(-1, tokens[..., None])[..., 0]
    best = logits.max(dim=-1).values
    if not torch.isfinite(logits).all():
        return {
            "ok": False,
            "exact_argmax": False,
            "max_gap_in_std": None,
            "tolerance_in_std": tol,
            "tokens": n,
            "why": "the no-cache forward gives non-finite logits",
        }
    gap = (best - picked) / logits.std(dim=-1)
    exact = bool(torch.equal(logits.argmax(dim=-1), tokens))
    return {
        "ok": bool((gap <= tol).all()),
        "exact_argmax": exact,
        "max_gap_in_std": float(gap.max()),
        "tolerance_in_std": tol,
        "tokens": n,
    }


def _percentiles(values: list[float]) -> dict:
    s = sorted(values)
    return {"median": common.percentile(s, 0.5), "p20": common.percentile(s, 0.2), "p80": common.percentile(s, 0.8)}


def worker(spec: dict) -> list[dict]:
    """One engine at one thread count, built once, timed at each batch size -> a row each."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    shape = SHAPES[spec["shape"]]
    prompt_len, new = spec["prompt"], spec["new"]
    base = {
        "engine": spec["engine"],
        "threads": spec["threads"],
        "prompt_tokens": prompt_len,
        "new_tokens": new,
        "shape": spec["shape"],
        **{f"model_{k}": v for k, v in shape.items()},
    }
    t0 = time.perf_counter()
    try:
        model, generate, forward, note = build(spec["engine"], shape, prompt_len + new + 8)
    except _Skip as e:
        return [{**base, "batch": b, "status": "skipped", "reason": str(e)} for b in spec["batches"]]
    base.update(
        {
            "build_s": time.perf_counter() - t0,
            "note": note,
            "build_peak_rss_bytes": _status_kib("VmHWM") * 1024,
            "model_bytes": _model_bytes(model),
        }
    )
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, shape["vocab_size"], (max(spec["batches"]), prompt_len), generator=g)
    tol = {"hf_bf16": 0.1, "accelops_hf": 0.05, "accelops": 0.05, "accelops_base3": 0.05, "torchao": 0.05}.get(
        spec["engine"], 1e-3
    )
    base["check"] = check_greedy(generate, forward, prompts[:1, : min(prompt_len, 32)], min(3, new), tol)
    if not base["check"]["ok"] and spec["engine"].startswith("accelops"):
        why = f"greedy tokens disagree with the no-cache forward: {base['check']}"
        return [{**base, "batch": b, "status": "wrong", "reason": why} for b in spec["batches"]]
    # A peer whose generate disagrees with its own forward by more than the tolerance is still
    # timed (its speed is what a user of it gets); the table shows the check's result.
    rows = []
    for batch in spec["batches"]:
        row = {**base, "batch": batch, "loadavg_1m": os.getloadavg()[0]}
        row.update(time_generate(generate, prompts[:batch], new, spec))
        if spec.get("breakdown") and batch == 1 and spec["engine"] == "accelops":
            row["breakdown"] = breakdown(model, prompts[:1], spec["breakdown_steps"], spec["compile"])
        rows.append(row)
    return rows


def time_generate(generate, prompts, new: int, spec: dict) -> dict:
    batch, prompt_len = prompts.shape
    # A static cache (torchao's compiled engine) is sized by max_new_tokens: every call at the
    # timed length, so nothing recompiles inside the timing.
    first_n = new if spec["engine"] == "torchao" else 1
    generate(prompts, min(2, new) if first_n == 1 else new)  # warm-up at the timed shapes (and the compile)
    ttft = []
    for _ in range(spec["ttft_repeats"]):
        _, start, stamps = generate(prompts, first_n)
        ttft.append(stamps[0] - start)
    method = (
        "VmHWM after clear_refs 5 + malloc_trim, before the timed generate"
        if _reset_peak()
        else "VmHWM of the whole process (clear_refs not writable)"
    )
    steps, totals = [], []
    for _ in range(spec["runs"]):
        _, start, stamps = generate(prompts, new)
        if len(stamps) != new:
            return {"status": "error", "reason": f"{len(stamps)} token stamps for {new} new tokens"}
        ttft.append(stamps[0] - start)
        steps += [b - a for a, b in zip(stamps, stamps[1:])]
        totals.append(stamps[-1] - start)
    t, st = _percentiles(ttft), _percentiles(steps)
    return {
        "status": "ok",
        "peak_rss_bytes": _status_kib("VmHWM") * 1024,
        "peak_rss_method": method,
        "ttft_s": t["median"],
        "ttft_p20_s": t["p20"],
        "ttft_p80_s": t["p80"],
        "prefill_tokens_per_s": batch * prompt_len / t["median"],
        "decode_step_s": st["median"],
        "decode_step_p20_s": st["p20"],
        "decode_step_p80_s": st["p80"],
        "decode_tokens_per_s": batch / st["median"],
        "decode_tokens_per_s_mean": batch * len(steps) / sum(steps),
        "generate_s": statistics.median(totals),
        "ttft_repeats": len(ttft),
        "decode_steps": len(steps),
    }


# --------------------------------------------------------------------------- decode-step breakdown


def _decode_state(model, prompts, n_steps):
    """A prefilled cache and the inputs of the next decode steps, as generate's loop makes them."""
    from accelops.models.layers import KVCache

    cfg = model.config
    batch, length = prompts.shape
    cache = KVCache(cfg.n_layers, batch, cfg.kv_heads, length + n_steps + 1, cfg.head_dim)
    slots = torch.arange(cache.size)
    positions = torch.arange(length).expand(batch, length)
    hidden = model._hidden(prompts, positions=positions, cache=cache)
    token = model.head(hidden[:, -1]).argmax(dim=-1)
    return cache, slots, token


def _steps(model, prompts, n_steps, step_fn):
    """Run n_steps greedy decode steps with step_fn(token, positions, mask, cache) -> hidden;
    -> (tokens, seconds per step)."""
    cache, slots, token = _decode_state(model, prompts, n_steps)
    length = prompts.shape[1]
    tokens, times = [], []
    for step in range(n_steps):
        t0 = time.perf_counter()
        positions = torch.full((prompts.shape[0], 1), length + step)
        mask = (slots <= positions[:, :, None])[:, None]
        hidden = step_fn(token[:, None], positions, mask, cache)
        token = model.head(hidden[:, -1]).argmax(dim=-1)
        times.append(time.perf_counter() - t0)
        tokens.append(token)
    return torch.stack(tokens, 1), times


class _Timers:
    """Exclusive time per category from forward pre/post hooks (a module's time minus its
    timed children's)."""

    def __init__(self, model):
        from torch import nn

        from accelops.models.layers import UnfusedFFN
        from accelops.models.transformer import CausalSelfAttention
        from accelops.nn import Int8Embedding, Int8Linear, TernaryLinear

        self.kinds = [
            (TernaryLinear, "ternary matmuls"),
            (Int8Linear, "int8 matmuls"),
            ((nn.RMSNorm, nn.LayerNorm), "norms"),
            (CausalSelfAttention, "attention (RoPE, cache write, SDPA over the cache)"),
            (UnfusedFFN, "FFN activation (relu2 * up)"),
            ((Int8Embedding, nn.Embedding), "embedding"),
        ]
        self.totals: dict[str, float] = {}
        self.stack: list[list] = []
        self.handles = []
        for m in model.modules():
            cat = next((c for cls, c in self.kinds if isinstance(m, cls)), None)
            if cat is not None:
                self.handles.append(m.register_forward_pre_hook(self._pre))
                self.handles.append(m.register_forward_hook(self._post(cat)))

    def _pre(self, module, args):
        self.stack.append([time.perf_counter(), 0.0])

    def _post(self, cat):
        def hook(module, args, out):
            t0, children = self.stack.pop()
            elapsed = time.perf_counter() - t0
            self.totals[cat] = self.totals.get(cat, 0.0) + elapsed - children
            if self.stack:
                self.stack[-1][1] += elapsed

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def breakdown(model, prompt, n_steps: int, try_compile: bool) -> dict:
    """Where a decode step's time goes (accelops TransformerLM, batch 1), and whether
    torch.compile of the step is faster (kept only when its tokens equal eager's)."""

    def eager(token, positions, mask, cache):
        # as generate's eager steps (every row at one position here): attend over all filled
        # slots, no mask (compiled: the whole cache under the mask)
        mask = int(positions.max()) + 1
        return model._hidden(token, positions=positions, cache=cache, mask=mask)

    _steps(model, prompt, 2, eager)  # warm
    want, wall = _steps(model, prompt, n_steps, eager)
    step_s = statistics.median(wall)

    timers = _Timers(model)
    per_step: list[dict] = []
    cache, slots, token = _decode_state(model, prompt, n_steps + 1)
    length = prompt.shape[1]
    other = "other (Python, residual adds, RoPE tables, mask)"
    for step in range(n_steps + 1):  # the first hooked step is a warm-up
        timers.totals.clear()
        start = time.perf_counter()
        positions = torch.full((1, 1), length + step)
        mask = length + step + 1  # the filled slots, no mask: as generate's eager steps at batch 1
        hidden = model._hidden(token[:, None], positions=positions, cache=cache, mask=mask)
        t0 = time.perf_counter()
        logits = model.head(hidden[:, -1])
        t1 = time.perf_counter()
        token = logits.argmax(dim=-1)
        t2 = time.perf_counter()
        d = {**timers.totals, "LM head (int8_linear)": t1 - t0, "sampling (argmax)": t2 - t1}
        d[other] = max(0.0, (t2 - start) - sum(d.values()))
        matmul = d.get("ternary matmuls", 0.0) + d.get("int8 matmuls", 0.0) + d["LM head (int8_linear)"]
        per_step.append({"parts": d, "wall": t2 - start, "outside": 1.0 - matmul / (t2 - start)})
    timers.close()
    per_step = per_step[1:]
    names = list(per_step[0]["parts"])
    parts = {k: statistics.median(d["parts"].get(k, 0.0) for d in per_step) for k in names}
    out = {
        "step_s": step_s,
        "step_p20_s": common.percentile(sorted(wall), 0.2),
        "step_p80_s": common.percentile(sorted(wall), 0.8),
        "steps": n_steps,
        "hooked_step_s": statistics.median(d["wall"] for d in per_step),
        "parts_s": parts,
        "outside_matmuls_fraction": statistics.median(d["outside"] for d in per_step),
        "note": "each part: its median over the steps, timed with forward hooks (exclusive of timed children) in "
        "steps timed whole as well; 'other' = a hooked step's wall time minus its parts (hook overhead "
        "included); outside_matmuls_fraction = the median over steps of 1 - (ternary + int8 matmuls + "
        "head) / step",
    }
    out["fused"] = _fused_breakdown(model, prompt, n_steps, eager)
    if not try_compile:
        out["compiled"] = {"skipped": "not tried in --quick (compiling takes ~30 s even for a tiny model)"}
        return out
    # torch.compile of the decode step (the layers' forward with the cache); the head and
    # argmax stay eager. Eager and compiled run the same step, one after the other, at every
    # position (alternating which goes first), so both see the same machine load; kept in the
    # report only if it gives the same tokens.
    try:
        compiled_hidden = torch.compile(model._hidden, dynamic=False)

        def compiled(token, positions, mask, cache):
            return compiled_hidden(token, positions=positions, cache=cache, mask=mask)

        t0 = time.perf_counter()
        _steps(model, prompt, 2, compiled)
        compile_s = time.perf_counter() - t0
        times, same = _paired(model, prompt, n_steps, {"eager": eager, "compiled": compiled})
        ratios = sorted(e / c for e, c in zip(times["eager"], times["compiled"]))
        out["compiled"] = {
            "step_s": statistics.median(times["compiled"]),
            "eager_step_s": statistics.median(times["eager"]),
            "compile_and_warm_s": compile_s,
            "same_tokens": same,
            "speedup": common.percentile(ratios, 0.5),
            "speedup_p20": common.percentile(ratios, 0.2),
            "speedup_p80": common.percentile(ratios, 0.8),
        }
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        out["compiled"] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
    return out


def _matmuls_alone(model, plan, n_steps: int) -> tuple[float, float]:
    """-> (median seconds of one step's ternary GEMVs, of its LM head) run on their own: the
    ternary_matmul (or ternary_matmul_base3) C++ kernel on every block's seven packed weights with a random [1, K]
    input, then model.head; the floor of a decode step made of nothing but its matmuls."""
    dim, hidden = model.config.dim, model.config.hidden
    xs = {dim: torch.randn(1, dim), hidden: torch.randn(1, hidden)}
    gemv, head = [], []
    for _ in range(n_steps + 1):
        t0 = time.perf_counter()
        for _norms, w_packed, w_scale, bias, in_features, fmt in plan:
            matmul = torch.ops.accelops.ternary_matmul if fmt == "i2" else torch.ops.accelops.ternary_matmul_base3
            for w, s, b, k in zip(w_packed, w_scale, bias, in_features):
                matmul(xs[k], w, s, b)
        t1 = time.perf_counter()
        model.head(xs[dim])
        t2 = time.perf_counter()
        gemv.append(t1 - t0)
        head.append(t2 - t1)
    return statistics.median(gemv[1:]), statistics.median(head[1:])


def _fused_breakdown(model, prompt, n_steps: int, eager) -> dict:
    """The fused decode step (generate's default for this model) against the eager one, each
    position run by both in turn, and its time outside the matmuls (step minus the same
    matmuls run alone)."""
    from accelops.models.generate import _fused_decode, fused_decode_plan

    plan, why = fused_decode_plan(model)
    if plan is None:
        return {"skipped": why}

    def fused(token, positions, mask, cache):
        return _fused_decode(model, plan, token, positions, cache)

    _paired(model, prompt, 2, {"eager": eager, "fused": fused})  # warm
    times, same = _paired(model, prompt, n_steps, {"eager": eager, "fused": fused})
    ratios = sorted(e / f for e, f in zip(times["eager"], times["fused"]))
    gemv_s, head_s = _matmuls_alone(model, plan, n_steps)
    step_s = statistics.median(times["fused"])
    return {
        "step_s": step_s,
        "eager_step_s": statistics.median(times["eager"]),
        "speedup": common.percentile(ratios, 0.5),
        "speedup_p20": common.percentile(ratios, 0.2),
        "speedup_p80": common.percentile(ratios, 0.8),
        "same_tokens": same,
        "gemv_alone_s": gemv_s,
        "head_alone_s": head_s,
        "outside_matmuls_fraction": max(0.0, 1.0 - (gemv_s + head_s) / step_s),
    }


def _paired(model, prompt, n_steps, fns: dict):
    """Each decode position run by every step function in turn (the order alternating) ->
    ({name: seconds per step}, whether all gave the same tokens)."""
    cache, slots, token = _decode_state(model, prompt, n_steps)
    length = prompt.shape[1]
    times = {name: [] for name in fns}
    same = True
    for step in range(n_steps):
        positions = torch.full((prompt.shape[0], 1), length + step)
        mask = (slots <= positions[:, :, None])[:, None]
        got = {}
        for name in list(fns) if step % 2 == 0 else list(fns)[::-1]:
            t0 = time.perf_counter()
            hidden = fns[name](token[:, None], positions, mask, cache)
            got[name] = model.head(hidden[:, -1]).argmax(dim=-1)
            times[name].append(time.perf_counter() - t0)
        same = same and all(torch.equal(t, got["eager"]) for t in got.values())
        token = got["eager"]
    return times, same


# =========================================================================== driver side


def _list(value: str | None, default: list) -> list:
    return [v.strip() for v in value.split(",") if v.strip()] if value else default


def settings(cfg: common.Config) -> dict:
    shape = "tiny" if cfg.quick else os.environ.get("ACCELOPS_BENCH_GENERATE_SHAPE", "2b4t")
    if shape not in SHAPES:
        raise SystemExit(f"--shape must be one of {list(SHAPES)}, got {shape!r}")
    engines = _list(os.environ.get("ACCELOPS_BENCH_GENERATE_ENGINES"), list(ENGINES))
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise SystemExit(f"--engines: unknown {unknown}; known {list(ENGINES)}")
    batches = [int(b) for b in _list(os.environ.get("ACCELOPS_BENCH_GENERATE_BATCH"), ["1", "4"])]
    big = shape == "2b4t"
    return {
        "shape": shape,
        "engines": engines,
        "batches": batches,
        "prompt": 8 if cfg.quick else 128,
        "new": 6 if cfg.quick else 128,
        "ttft_repeats": 2 if (cfg.quick or big) else 3,
        "runs": 1 if (cfg.quick or big) else 2,
        "breakdown_steps": 4 if cfg.quick else 16,
        "compile": not cfg.quick,
    }


def run_worker(spec: dict, timeout: float) -> list[dict]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(spec["threads"])
    env.pop("TRITON_INTERPRET", None)
    failed = [{"batch": b} for b in spec["batches"]]
    try:
        proc = subprocess.run(
            [sys.executable, str(HERE), "--worker", json.dumps(spec)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(common.REPO_ROOT),
        )
    except subprocess.TimeoutExpired:
        return [{**f, "status": "error", "reason": f"timed out after {timeout:.0f} s"} for f in failed]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-600:]
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
        return [{**f, "status": "error", "reason": f"worker {why}: {tail}"} for f in failed]
    return json.loads(lines[-1])


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def summarize(rows, cfg, s, meta, wall_s) -> str:
    out = []
    for threads in sorted({r["threads"] for r in rows}):
        out += common.run_header(FAMILY, meta, cfg, threads, wall_s, versions=("torch", "torchao", "python"))
        shape = SHAPES[s["shape"]]
        out += [
            f"Shape {s['shape']}: vocab {shape['vocab_size']}, dim {shape['dim']}, {shape['n_layers']} layers, "
            f"{shape['n_heads']} heads / {shape['n_kv_heads']} KV heads, FFN {shape['hidden']} (relu2, sub-norms, "
            f"tied embeddings); random weights; prompt {s['prompt']}, {s['new']} new tokens, greedy. Load: the 1-minute "
            f"load average when each row's timing started (2 cores; other work shares the machine).",
            "",
        ]
        table = []
        for r in (r for r in rows if r["threads"] == threads):
            if r.get("status") != "ok":
                table.append(
                    [r["engine"], r.get("batch"), r["status"], (r.get("reason") or "")[:120], "", "", "", "", ""]
                )
                continue
            table.append(
                [
                    r["engine"],
                    r["batch"],
                    _fmt(r["prefill_tokens_per_s"], ".1f"),
                    f"{_fmt(r['decode_tokens_per_s'])} ({_fmt(r['batch'] / r['decode_step_p80_s'])}-"
                    f"{_fmt(r['batch'] / r['decode_step_p20_s'])})",
                    f"{_fmt(r['ttft_s'])} s",
                    common.fmt_bytes(r["peak_rss_bytes"]),
                    common.fmt_bytes(r["model_bytes"]),
                    "ok" if r["check"]["ok"] else f"off by {_fmt(r['check']['max_gap_in_std'])} std",
                    _fmt(r.get("loadavg_1m"), ".1f"),
                ]
            )
        out += [
            common.md_table(
                [
                    "engine",
                    "batch",
                    "prefill tok/s",
                    "decode tok/s (p80-p20 step)",
                    "TTFT",
                    "peak RSS",
                    "model bytes",
                    "greedy check",
                    "load",
                ],
                table,
            ),
            "",
        ]
        by = {(r["engine"], r["batch"]): r for r in rows if r["threads"] == threads and r.get("status") == "ok"}
        bf16 = by.get(("hf_bf16", 1))
        for engine in ("accelops", "accelops_base3"):
            acc = by.get((engine, 1))
            if not acc:
                continue
            tps = acc["decode_tokens_per_s"]
            lines = [
                f"Targets (batch 1; issue 25, reference numbers from an Intel Xeon, not this machine): {engine} "
                f"decodes {tps:.2f} tok/s = {tps / REFERENCE['bitnet.cpp I2_S']:.2f}x bitnet.cpp I2_S's "
                f"10.88 (target >= 1.2x)"
            ]
            if bf16:
                ratio = tps / bf16["decode_tokens_per_s"]
                lines.append(
                    f"{ratio:.1f}x transformers bf16 measured here (target >= 10x: "
                    f"{'met' if ratio >= TARGETS['vs transformers bf16'] else 'MISSED'})"
                )
            out += ["; ".join(lines) + ".", ""]
            bd = acc.get("breakdown")
            if bd:
                parts = sorted(bd["parts_s"].items(), key=lambda kv: -kv[1])
                out += [
                    f"Decode step of the accelops engine (batch 1, {bd['steps']} steps): {bd['step_s'] * 1e3:.1f} ms "
                    f"median ({bd['hooked_step_s'] * 1e3:.1f} ms with the timing hooks); outside the matmuls "
                    f"{bd['outside_matmuls_fraction'] * 100:.1f}% (target <= 15%).",
                    "",
                ]
                out += [
                    common.md_table(
                        ["part", "ms / step", "share of the hooked step"],
                        [[k, f"{v * 1e3:.2f}", f"{v / bd['hooked_step_s'] * 100:.1f}%"] for k, v in parts],
                    ),
                    "",
                ]
                f = bd.get("fused", {})
                if "skipped" in f:
                    out += [f"Fused decode step (ternary_decode_layer): not used: {f['skipped']}.", ""]
                elif f:
                    out += [
                        f"Fused decode step (generate's default here; one ternary_decode_layer call a block): "
                        f"{_against_eager(f)}, same greedy tokens: {f['same_tokens']}; its matmuls alone "
                        f"(the GEMVs {f['gemv_alone_s'] * 1e3:.1f} ms + the head {f['head_alone_s'] * 1e3:.1f} ms) "
                        f"leave {f['outside_matmuls_fraction'] * 100:.1f}% of the fused step outside the matmuls "
                        f"(target <= 15%).",
                        "",
                    ]
                c = bd.get("compiled", {})
                if "skipped" in c:
                    out += [f"torch.compile of the decode step: {c['skipped']}.", ""]
                elif "error" in c:
                    out += [f"torch.compile of the decode step failed: {c['error']}", ""]
                elif c:
                    out += [
                        f"torch.compile(model._hidden) decode step: {_against_eager(c)}, compile + "
                        f"warm-up {c['compile_and_warm_s']:.0f} s, same greedy tokens: {c['same_tokens']}.",
                        "",
                    ]
    out += [
        "Decode tok/s = batch / median decode-step time (in brackets: at the p80 and p20 step times); "
        "TTFT = prompt in to first token out (median over repeats); prefill tok/s = batch x prompt / TTFT; "
        "peak RSS = the process's resident high-water mark during generation (model included), each engine "
        "in its own process; model bytes = parameters and buffers, each storage once.",
        "",
    ]
    return "\n".join(out)


def _against_eager(d: dict) -> str:
    """A paired comparison's step time against eager's, as the report words it."""
    return (
        f"{d['step_s'] * 1e3:.1f} ms vs eager {d['eager_step_s'] * 1e3:.1f} ms, each position run by both in turn "
        f"(speedup {d['speedup']:.2f}x, p20-p80 {d['speedup_p20']:.2f}-{d['speedup_p80']:.2f})"
    )


def run(cfg: common.Config) -> common.FamilyResult:
    meta = common.run_metadata(cfg)
    s = settings(cfg)
    timeout = 600 if cfg.quick else 7200
    start = time.perf_counter()
    rows, failures = [], []
    for threads in cfg.threads:
        for engine in s["engines"]:
            spec = {
                "engine": engine,
                "threads": threads,
                "batches": s["batches"],
                "shape": s["shape"],
                "prompt": s["prompt"],
                "new": s["new"],
                "ttft_repeats": s["ttft_repeats"],
                "runs": s["runs"],
                "breakdown": True,
                "breakdown_steps": s["breakdown_steps"],
                "compile": s["compile"],
            }
            print(
                f"generate: {engine}, batch {s['batches']}, {threads} thread(s), shape {s['shape']} ...",
                file=sys.stderr,
                flush=True,
            )
            for row in run_worker(spec, timeout):
                row = {
                    **meta,
                    "family": FAMILY,
                    "engine": engine,
                    "threads": threads,
                    "shape": s["shape"],
                    "label": ENGINES[engine],
                    **row,
                }
                common.append_row(cfg.results_file(FAMILY), row)
                rows.append(row)
                if row["status"] in ("wrong", "error") and engine.startswith("accelops"):
                    failures.append(
                        f"generate {engine} batch {row['batch']} {threads}t: {row['status']}: {row.get('reason')}"
                    )
                print(
                    f"generate: {engine} batch {row['batch']}: {row['status']}"
                    + (
                        f", decode {row['decode_tokens_per_s']:.2f} tok/s, TTFT {row['ttft_s']:.2f} s"
                        if row["status"] == "ok"
                        else f" ({row.get('reason', '')[:200]})"
                    ),
                    file=sys.stderr,
                    flush=True,
                )
    text = "## Text generation\n\n" + summarize(rows, cfg, s, meta, time.perf_counter() - start)
    return common.FamilyResult(FAMILY, text, rows, failures)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        print(json.dumps(worker(json.loads(argv[1]))))
        return 0
    env_flags = {
        "--shape": "ACCELOPS_BENCH_GENERATE_SHAPE",
        "--engines": "ACCELOPS_BENCH_GENERATE_ENGINES",
        "--batch": "ACCELOPS_BENCH_GENERATE_BATCH",
    }
    return common.family_main(__doc__, run, argv, env_flags)


if __name__ == "__main__":
    sys.exit(main())
