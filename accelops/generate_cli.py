"""`accelops generate CHECKPOINT --prompt TEXT`: text from a model trained by `accelops train`.

Loads the checkpoint with accelops.train.load_model (the model and its character
vocabulary), optionally converts it for inference (--convert ternary | int8), runs
TransformerLM.generate with its KV cache (--compile: decode steps through torch.compile) and prints the prompt and its continuation on
stdout as the tokens come, then the token count and tokens/s on stderr. Argument parsing
stays light here (argparse only); torch and the model load when the command runs.
"""

from __future__ import annotations

import sys
import time

CONVERT_MODES = ("ternary", "int8")


def add_arguments(p) -> None:
    p.add_argument(
        "checkpoint",
        help="a checkpoint of `accelops train` (step-NNNNNNNN.ckpt, a .dcp / .pp directory, "
        "or the run's checkpoint_dir: its newest good checkpoint)",
    )
    p.add_argument("--prompt", required=True, help="the text to continue (its characters must be in the vocabulary)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens to generate; prompt + new tokens must fit the model's context (max_len). Default: "
        "the rest of the context",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy; default 1.0")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling: the most likely tokens of mass p, 0 < p <= 1"
    )
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument(
        "--convert",
        choices=CONVERT_MODES,
        default=None,
        help="accelops.convert the model first: 'ternary' (BitNet b1.58 packed weights; a bitlinear-trained "
        "model's deployed form) or 'int8' (W8A8)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="run the decode steps through torch.compile (compiling takes seconds to a minute first; "
        "faster steps after)",
    )


def run_args(args, out=None, err=None) -> int:
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    from .models import TransformerLM
    from .train import load_model

    model, vocab = load_model(args.checkpoint)
    if not isinstance(model, TransformerLM):
        raise ValueError(
            f"generate needs a TransformerLM checkpoint; {args.checkpoint!r} holds a {type(model).__name__}"
        )
    ids = vocab.encode(args.prompt)  # ValueError naming a character outside the vocabulary
    if args.convert is not None:
        from .nn import convert

        convert(model, args.convert)
    n_new = args.max_new_tokens
    if n_new is None:
        n_new = model.config.max_len - ids.numel()
        if ids.numel() and n_new < 1:
            raise ValueError(
                f"the prompt's {ids.numel()} tokens fill the model's context max_len="
                f"{model.config.max_len}: no room for new tokens"
            )
    started = []

    def show(step_tokens):
        if not started:  # the prompt once generate has accepted the arguments
            started.append(True)
            out.write(args.prompt)
        out.write(vocab.decode(step_tokens))
        out.flush()

    if args.compile:
        step = "torch.compile"
    else:
        from .models.generate import fused_decode_plan

        plan, _ = fused_decode_plan(model)
        step = "fused C++ op (ternary_decode_layer)" if plan is not None else "eager modules"
    start = time.perf_counter()
    new = model.generate(
        ids,
        n_new,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stream=show,
        compile=args.compile,
    )
    seconds = time.perf_counter() - start
    out.write("\n")
    n = new.shape[1]
    print(
        f"{n} tokens in {seconds:.3f} s: {n / seconds:.1f} tokens/s (prompt of {ids.numel()} tokens included in "
        f"the time); decode step: {step}",
        file=err,
    )
    return 0
