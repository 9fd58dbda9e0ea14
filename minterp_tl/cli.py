"""The ``minterp-tl`` command line.

Subcommands:
    lens    The logit lens of a prompt: a table of every layer's top tokens at the last position and
            a layers x positions heatmap PNG (the main job).
    info    Load a model, print its ModelInfo and the top-k next tokens for a prompt.

Bad input (unknown model, empty prompt, ...) exits with code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

DEFAULT_PROMPT = "The capital of France is"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minterp-tl",
        description="Mechanistic interpretability on TransformerLens 4 (offline SmolLM2-135M by default).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    lens = sub.add_parser("lens", help="logit lens: every layer's top tokens, as a table and a PNG heatmap")
    lens.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help=f"prompt (default: {DEFAULT_PROMPT!r})")
    lens.add_argument("--model", default="smollm2-135m", help="model name or local HF directory (default: smollm2-135m)")
    lens.add_argument("--top-k", type=int, default=3, help="top tokens per layer in the table (default: 3)")
    lens.add_argument("--answer", help="a single-token answer to track (default: the model's own top prediction)")
    lens.add_argument("--out", default="lens.png", help="where to write the heatmap PNG (default: lens.png)")
    lens.add_argument("--no-progress", action="store_true", help="hide progress bars")

    info = sub.add_parser("info", help="load a model, print its ModelInfo and the top next tokens")
    info.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help=f"prompt (default: {DEFAULT_PROMPT!r})")
    info.add_argument("--model", default="smollm2-135m", help="model name or local HF directory (default: smollm2-135m)")
    info.add_argument("--top-k", type=int, default=5, help="how many next tokens to print (default: 5)")
    info.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _fail(message: str) -> int:
    print(f"minterp-tl: error: {message}", file=sys.stderr)
    return 2


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from minterp_tl.models import load_model, model_info

    if not args.prompt.strip():
        return _fail("the prompt is empty; give some text, e.g. minterp-tl info \"The capital of France is\"")
    if args.top_k < 1:
        return _fail(f"--top-k must be >= 1, got {args.top_k}")
    start = time.perf_counter()
    try:
        model = load_model(args.model, progress=not args.no_progress)
    except (ValueError, ImportError) as err:
        return _fail(str(err).splitlines()[0])
    load_s = time.perf_counter() - start
    info = model_info(model)
    print(f"model        {info.name}")
    print(f"parameters   {info.n_params_estimate:,}")
    print(f"layers       {info.n_layers}")
    print(f"heads        {info.n_heads}")
    print(f"d_model      {info.d_model}")
    print(f"d_vocab      {info.d_vocab}")
    print(f"load time    {load_s:.1f} s")
    if model.tokenizer is None:
        return _fail(f"model {info.name!r} has no tokenizer; cannot read a text prompt")
    with torch.no_grad():
        logits = model(args.prompt)
    probs = logits[0, -1].float().softmax(-1)
    top = probs.topk(min(args.top_k, probs.numel()))
    print(f"\nprompt       {args.prompt!r}")
    print(f"{'rank':>4}  {'token':<16} {'prob':>7}")
    for rank, (p, idx) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
        print(f"{rank:>4}  {model.tokenizer.decode([idx])!r:<16} {p:7.4f}")
    return 0


def _cmd_lens(args: argparse.Namespace) -> int:
    from pathlib import Path

    from minterp_tl.lens import logit_lens
    from minterp_tl.models import load_model

    if not args.prompt.strip():
        return _fail("the prompt is empty; give some text, e.g. minterp-tl lens \"The capital of France is\"")
    if args.top_k < 1:
        return _fail(f"--top-k must be >= 1, got {args.top_k}")
    out = Path(args.out)
    if out.suffix.lower() != ".png" or not out.parent.is_dir():
        return _fail(f"--out must be a .png path in an existing directory, got {args.out!r}")
    try:
        model = load_model(args.model, progress=not args.no_progress)
    except (ValueError, ImportError) as err:
        return _fail(str(err).splitlines()[0])
    if model.tokenizer is None:
        return _fail(f"model {args.model!r} has no tokenizer; cannot read a text prompt")
    lens = logit_lens(model, args.prompt)
    answer = args.answer
    if answer is None:
        answer = int(lens.logits[-1, 0, -1].argmax())
    try:
        table = lens.table(position=-1, k=args.top_k, answer=answer)
    except ValueError as err:
        return _fail(str(err))
    print(table)
    lens.plot(out)
    print(f"\nheatmap written to {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``minterp-tl``; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "info":
        return _cmd_info(args)
    if args.command == "lens":
        return _cmd_lens(args)
    return _fail(f"unknown command {args.command!r}")  # pragma: no cover - argparse rejects it first


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
