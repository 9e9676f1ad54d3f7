"""Text generation for TransformerLM with a preallocated key/value cache.

    new = model.generate(prompt, max_new_tokens=50)                       # greedy: temperature=0
    new = model.generate([p1, p2], 50, temperature=0.8, top_p=0.9, seed=0)  # prompts of any lengths

How it runs: one forward over the prompts (the prefill, causal over the prompt as in
model(tokens), writing every layer's keys and values into the cache), then one forward a
token (the decode step). The cache is allocated once, per layer [batch, n_kv_heads, size,
head_dim] with size = longest prompt + max_new_tokens - 1 (the last token is never fed
back); writes outside it raise. An eager decode step attends over the slots filled so far
(under a mask, for rows of shorter prompts); a compiled one (compile=True) over the whole
cache, so that every step has the same shapes and compiles once.

Prompts of different lengths: right padding and per-row positions. Each row keeps its
own positions 0, 1, ... (so its tokens are those it would get alone); the prefill runs the
padded batch, each row's first new token comes from its last real prompt position, and
row b's decode steps write at positions len_b, len_b + 1, ..., overwriting the keys the
padding left there. A row never attends past its own position, so it never sees padding.
"""

from __future__ import annotations

import itertools
import math
import numbers

import torch
from torch import nn

from .layers import KVCache, rope_cos_sin

# TernaryLinear formats ternary_decode_layer reads (lut3's GEMV has no fused-step path)
FUSED_FORMATS = ("i2", "base3")

__all__ = ["generate", "sample", "fused_decode_plan"]


# --------------------------------------------------------------------------- checks


def _int(name: str, value, lo: int | None = None) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value!r}")
    return int(value)


def _prompts(tokens, vocab_size: int, max_len: int) -> list[torch.Tensor]:
    """tokens (a [batch, seq] or [seq] integer tensor, or a list of prompts, each a 1-D integer
    tensor or a list of ints) -> the prompts as 1-D int64 CPU tensors, checked."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must hold integer token ids, got a tensor of {tokens.dtype}")
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be a [batch, seq] or [seq] tensor, got shape {tuple(tokens.shape)}")
        prompts = list(tokens.detach().cpu().long())
    elif isinstance(tokens, (list, tuple)):
        if tokens and all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in tokens):
            tokens = [tokens]  # one prompt as a list of ints
        prompts = []
        for i, p in enumerate(tokens):
            if isinstance(p, torch.Tensor):
                if p.dim() != 1 or p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool:
                    raise ValueError(
                        f"tokens[{i}] must be a 1-D integer tensor, got {p.dtype} of shape {tuple(p.shape)}"
                    )
                prompts.append(p.detach().cpu().long())
            elif isinstance(p, (list, tuple)) and all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in p
            ):
                prompts.append(torch.tensor(list(p), dtype=torch.long))
            else:
                raise ValueError(f"tokens[{i}] must be a 1-D integer tensor or a list of ints, got {type(p).__name__}")
    else:
        raise ValueError(f"tokens must be an integer tensor or a list of prompts, got {type(tokens).__name__}")
    if not prompts:
        raise ValueError("tokens must hold at least one prompt, got an empty batch")
    for i, p in enumerate(prompts):
        if p.numel() == 0:
            raise ValueError(f"tokens: prompt {i} is empty; a prompt needs at least one token (e.g. a BOS token)")
        if p.numel() > max_len:
            raise ValueError(
                f"tokens: prompt {i} has {p.numel()} tokens, longer than the model's context max_len={max_len}"
            )
        lo, hi = int(p.min()), int(p.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"tokens: prompt {i} holds ids in [{lo}, {hi}], outside the vocabulary [0, vocab_size={vocab_size})"
            )
    return prompts


def _check_sampling(temperature, top_k, top_p):
    if (
        not isinstance(temperature, numbers.Real)
        or isinstance(temperature, bool)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None:
        _int("top_k", top_k, 1)
    if top_p is not None and (not isinstance(top_p, numbers.Real) or isinstance(top_p, bool) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        # greedy decoding would silently ignore them: the caller meant to sample
        given = ", ".join(f"{n}={v!r}" for n, v in (("top_k", top_k), ("top_p", top_p)) if v is not None)
        raise ValueError(
            f"temperature=0 is greedy decoding, which takes no sampling options ({given}); "
            "give a temperature > 0 to sample, or drop them"
        )


# --------------------------------------------------------------------------- sampling


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token of each row of logits [batch, vocab] -> [batch] int64. temperature 0:
    argmax (the first of equal maxima). Otherwise softmax(logits / temperature) restricted to
    the top_k most likely tokens, then to the smallest set of most likely tokens whose
    probability reaches top_p (nucleus; the most likely token always stays), renormalised."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the more likely ones before it already reach top_p
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------- generate


def generate(
    model,
    tokens,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    seed: int | None = None,
    stream=None,
    compile: bool = False,
    fused: bool | None = None,
) -> torch.Tensor:
    """Continue each prompt by max_new_tokens tokens (fewer when every row has produced
    eos_token_id) -> the new tokens, [batch, n] int64 on the model's device; after a row's
    eos_token_id the row holds eos_token_id.

    tokens: a [batch, seq] or [seq] integer tensor, or a list of prompts of any lengths
        (each a 1-D tensor or a list of ints; see the module docstring for how they batch).
    max_new_tokens: >= 1; the longest prompt plus max_new_tokens must fit the context
        (config.max_len).
    temperature: 0 is greedy (argmax); > 0 samples from softmax(logits / temperature).
    top_k, top_p: restrict sampling to the k most likely tokens / the nucleus of mass top_p
        (in (0, 1]); only with temperature > 0 (ValueError with 0). seed: sampling is reproducible with it (a generator of its own; without
        it, torch's global generator). stream: called after every step with that step's
        tokens, a [batch] int64 CPU tensor.
    compile: run the decode steps (the layers with the cache; not the prefill, head or
        sampling) through torch.compile(dynamic=False). The first call of each shape (batch,
        longest prompt + max_new_tokens, model) compiles, which takes seconds to a minute;
        later calls of that shape reuse it (past torch._dynamo's recompile limit, 8 shapes
        by default, further shapes run eagerly). Measured 1.17x (2B4T shape) to 1.4x (dim 1024,
        8 layers) faster a decode step on a 2-core Zen 4; greedy output equals the no-cache
        argmax (tested), though a near-tie between two logits may resolve differently than
        eager (the compiled norms round differently).
    fused: run each decode step's blocks through the fused C++ op (see the module docstring).
        None (default): when fused_decode_plan(model) allows it and compile is off; True:
        always (ValueError saying why the model cannot); False: never (the modules' eager step).
    The model runs in eval mode (dropout off) under torch.inference_mode; its mode is
    restored afterwards. Bad arguments: ValueError naming the argument."""
    cfg = model.config
    prompts = _prompts(tokens, cfg.vocab_size, cfg.max_len)
    n_new = _int("max_new_tokens", max_new_tokens, 1)
    longest = max(p.numel() for p in prompts)
    if longest + n_new > cfg.max_len:
        raise ValueError(
            f"max_new_tokens={n_new} runs past the model's context: the longest prompt has {longest} "
            f"tokens and prompt + new tokens must fit max_len={cfg.max_len} (at most "
            f"{cfg.max_len - longest} new tokens)"
        )
    _check_sampling(temperature, top_k, top_p)
    if eos_token_id is not None:
        _int("eos_token_id", eos_token_id, 0)
        if eos_token_id >= cfg.vocab_size:
            raise ValueError(f"eos_token_id must lie in [0, vocab_size={cfg.vocab_size}), got {eos_token_id}")
    if seed is not None:
        _int("seed", seed)
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be a bool, got {compile!r}")
    if fused is not None and not isinstance(fused, bool):
        raise ValueError(f"fused must be None, True or False, got {fused!r}")
    if fused and compile:
        raise ValueError("fused=True and compile=True are two ways to run the decode step: choose one")
    plan = None
    if fused is not False and not compile:
        plan, why_not = fused_decode_plan(model)
        if plan is None and fused:
            raise ValueError(f"fused=True: this model's decode step cannot run fused: {why_not}")
    if stream is not None and not callable(stream):
        raise ValueError(
            f"stream must be a callable (called with each step's tokens) or None, got {type(stream).__name__}"
        )

    # tok_emb's first tensor (a converted Int8Embedding's .weight would dequantize it whole)
    device = next(itertools.chain(model.tok_emb.parameters(), model.tok_emb.buffers())).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _run(
                model,
                prompts,
                n_new,
                temperature,
                top_k,
                top_p,
                eos_token_id,
                seed,
                stream,
                device,
                _compiled_decode() if compile else _decode,
                plan,
            )
    finally:
        model.train(was_training)


def _decode(model, token, positions, cache, mask):
    """One decode step's layers: -> the final hidden states [batch, 1, dim]."""
    return model._hidden(token, positions=positions, cache=cache, mask=mask)


# --------------------------------------------------------------------------- fused decode step


def fused_decode_plan(model):
    """-> (the per-block arguments of ternary_decode_layer, None) when every decode step of
    `model` can run fused, else (None, the reason). Read from the model's modules as they are
    now (call again after changing the model)."""
    from ..nn import TernaryLinear
    from ..nn.ffn import FusedFFN
    from ..ops import _backend
    from .layers import UnfusedFFN
    from .transformer import CausalSelfAttention, TransformerLM

    if not isinstance(model, TransformerLM):
        return None, f"it is a {type(model).__name__}, not a TransformerLM"
    cfg = model.config
    if cfg.pos_emb != "rope" or cfg.norm != "rmsnorm" or cfg.activation not in ("relu2", "swiglu"):
        return None, (
            f"the fused step needs pos_emb='rope', norm='rmsnorm' and activation relu2 or swiglu, got "
            f"pos_emb={cfg.pos_emb!r}, norm={cfg.norm!r}, activation={cfg.activation!r}"
        )
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    if device.type != "cpu" or _backend.choose("ternary_decode_layer", device) != "native":
        return None, f"it needs the C++ extension and a model on the CPU (model on {device}; backend " + (
            f"{_backend.choose('ternary_decode_layer', device)})"
        )
    layers = []
    for i, block in enumerate(model.blocks):
        attn, ffn = block.attn, block.ffn
        where = f"blocks[{i}]"
        # UnfusedFFN (relu2, or any FFN with BitNet's sub-norm) or FusedFFN(quant="ternary")
        # (a Llama-shaped swiglu FFN without one): the same three projections either way
        ffn_ok = isinstance(ffn, UnfusedFFN) or (isinstance(ffn, FusedFFN) and ffn.quant == "ternary")
        if type(attn) is not CausalSelfAttention or not ffn_ok or ffn.activation != cfg.activation:
            return None, f"{where} is not a causal attention and a ternary {cfg.activation} FFN"
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, ffn.gate_proj, ffn.up_proj, ffn.down_proj]
        for lin in linears:
            if type(lin) is not TernaryLinear or lin.format not in FUSED_FORMATS:
                what = (
                    f"a TernaryLinear of format {lin.format!r}"
                    if type(lin) is TernaryLinear
                    else (f"a {type(lin).__name__}")
                )
                return None, (
                    f"{where} has {what} projection: every projection must be a TernaryLinear of format "
                    f"{' or '.join(map(repr, FUSED_FORMATS))} (accelops.convert(model, 'ternary'))"
                )
            if lin.format != linears[0].format or (layers and lin.format != layers[0][5]):
                return None, f"{where} mixes packed formats: the fused step reads one format throughout"
            if lin.bias is not None and lin.bias.dtype != torch.float32:
                return None, f"{where} has a {lin.bias.dtype} bias (fp32 only)"
        norms = [block.norm1, attn.attn_sub_norm, block.norm2, getattr(ffn, "ffn_sub_norm", None)]
        for j, norm in enumerate(norms):
            if norm is None and j in (1, 3):
                continue
            if type(norm) is not nn.RMSNorm or norm.weight is None or norm.eps != cfg.norm_eps:
                return None, f"{where} has a norm other than an RMSNorm with a weight and eps={cfg.norm_eps}"
            if norm.weight.dtype != torch.float32:
                return None, f"{where} has {norm.weight.dtype} norm weights (fp32 only)"
        hooked = [n for n, m in block.named_modules() if m._forward_hooks or m._forward_pre_hooks]
        if hooked:
            # the fused op would skip them without a word
            return None, f"{where} has forward hooks on {hooked}"
        layers.append(
            (
                [None if n is None else n.weight.detach() for n in norms],
                [lin._qweight() for lin in linears],
                [lin.w_scale for lin in linears],
                [None if lin.bias is None else lin.bias.detach() for lin in linears],
                [lin.in_features for lin in linears],  # the K each was packed for: the op checks them
                linears[0].format,
            )
        )
    return layers, None


def _fused_decode(model, layers, token, positions, cache):
    """One decode step of every block through ternary_decode_layer: -> the final hidden
    states [batch, 1, dim] (positions [batch, 1], every row one new token)."""
    cfg = model.config
    x = model.tok_emb(token)[:, 0].contiguous()  # [batch, dim]
    pos = positions[:, 0].contiguous()
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, torch.float32)
    op = torch.ops.accelops.ternary_decode_layer
    for i, (norms, w_packed, w_scale, bias, in_features, fmt) in enumerate(layers):
        x = op(x, pos, cos, sin, cache.keys[i], cache.values[i], norms, w_packed, w_scale, bias, in_features,
               cfg.n_heads, cfg.norm_eps, cfg.activation, fmt)  # fmt: skip
    return model.norm(x)[:, None]


_COMPILED = None


def _compiled_decode():
    # One compiled function for every model: dynamo guards on the model and the shapes, so
    # each (model, batch, cache size) compiles once and is reused by later calls.
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_decode, dynamic=False)
    return _COMPILED


def _run(
    model, prompts, n_new, temperature, top_k, top_p, eos_token_id, seed, stream, device, decode=_decode, plan=None
):
    cfg = model.config
    batch, longest = len(prompts), max(p.numel() for p in prompts)
    lengths = torch.tensor([p.numel() for p in prompts], device=device)
    padded = torch.zeros(batch, longest, dtype=torch.long)  # right padding (any valid id: never attended to)
    for i, p in enumerate(prompts):
        padded[i, : p.numel()] = p
    padded = padded.to(device)
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
    cache = KVCache(cfg.n_layers, batch, cfg.kv_heads, longest + n_new - 1, cfg.head_dim)
    slots = torch.arange(cache.size, device=device)
    uniform = all(p.numel() == longest for p in prompts)
    rows = torch.arange(batch, device=device)

    def next_tokens(hidden_last):
        return sample(model.head(hidden_last), temperature, top_k, top_p, generator)

    # Prefill: the prompts, causal over themselves; only each row's last real position goes
    # through the LM head (a [batch, vocab] matmul instead of [batch, seq, vocab]).
    positions = torch.arange(longest, device=device).expand(batch, longest)
    cache.check_positions(positions)
    hidden = model._hidden(padded, positions=positions, cache=cache)
    token = next_tokens(hidden[rows, lengths - 1])
    # The fused step reads fp32 activations and caches (a model converted with a bf16
    # embedding, or run under autocast, takes the eager step).
    if plan is not None and not (
        hidden.dtype == torch.float32 and all(k is not None and k.dtype == torch.float32 for k in cache.keys)
    ):
        plan = None
    out = [token]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(1, n_new + 1):
        if eos_token_id is not None:
            done |= token == eos_token_id
        if stream is not None:
            stream(token.cpu())
        if step == n_new or (eos_token_id is not None and bool(done.all())):
            break
        positions = (lengths + step - 1)[:, None]  # [batch, 1]: where each row's last token goes
        cache.check_positions(positions)
        # Eager steps attend over the filled slots only (0 .. longest + step - 1, known here
        # without a device sync), and without a mask when every row stands at that position
        # (prompts of one length); compiled steps over the whole cache under a mask, so that
        # every step has the same shapes and the graph compiles once.
        if decode is _decode and uniform:
            mask = longest + step
        else:
            filled = slots if decode is not _decode else slots[: longest + step]
            mask = (filled <= positions[:, :, None])[:, None]  # [batch, 1, 1, filled]: itself and before
        if plan is not None:
            hidden = _fused_decode(model, plan, token[:, None], positions, cache)
        else:
            hidden = decode(model, token[:, None], positions, cache, mask)
        token = next_tokens(hidden[:, -1])
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
        out.append(token)
    return torch.stack(out, dim=1)
