"""The ``minterp-tl`` command line.

Subcommands:
    lens    The logit lens of a prompt: a table of every layer's top tokens at the last position and
            a layers x positions heatmap PNG (the main job).
    info    Load a model, print its ModelInfo and the top-k next tokens for a prompt.
    routes  The information-flow routes to the prediction at the last position: the strongest
            input-to-prediction paths, a tokens x layers PNG, and optionally the graph as JSON.

Bad input (unknown model, empty prompt, ...) exits with code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

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

    routes = sub.add_parser("routes", help="information-flow routes to the prediction: strongest paths and a PNG")
    routes.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help=f"prompt (default: {DEFAULT_PROMPT!r})")
    routes.add_argument("--model", default="smollm2-135m", help="model name or local HF directory (default: smollm2-135m)")
    routes.add_argument("--threshold", type=float, default=0.04, help="contribution threshold tau in [0, 1) (default: 0.04)")
    routes.add_argument("--token", type=int, default=-1, help="position whose prediction to explain (default: -1, the last)")
    routes.add_argument("--top-k", type=int, default=5, help="how many strongest paths to print (default: 5)")
    routes.add_argument("--out", default="routes.png", help="where to write the routes PNG (default: routes.png)")
    routes.add_argument("--json", help="also write the full graph as JSON to this path")
    routes.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _fail(message: str) -> int:
    print(f"minterp-tl: error: {message}", file=sys.stderr)
    return 2


class _BadInput(Exception):
    """Bad command-line input; its message is the one line ``_fail`` prints."""


def _check_common(args: argparse.Namespace, command: str) -> None:
    """The checks every subcommand shares: a non-empty prompt and ``--top-k >= 1``."""
    if not args.prompt.strip():
        raise _BadInput(f"the prompt is empty; give some text, e.g. minterp-tl {command} \"The capital of France is\"")
    if args.top_k < 1:
        raise _BadInput(f"--top-k must be >= 1, got {args.top_k}")


def _out_path(value: str, option: str, suffix: str) -> Path:
    """``value`` as a path with ``suffix`` in an existing directory, or :class:`_BadInput`."""
    path = Path(value)
    if path.suffix.lower() != suffix or not path.parent.is_dir():
        raise _BadInput(f"{option} must be a {suffix} path in an existing directory, got {value!r}")
    return path


def _load_text_model(args: argparse.Namespace) -> Any:
    """Load ``--model``; a model that cannot be loaded or has no tokenizer is :class:`_BadInput`."""
    from minterp_tl.models import load_model

    try:
        model = load_model(args.model, progress=not args.no_progress)
    except (ValueError, ImportError) as err:
        raise _BadInput(str(err).splitlines()[0]) from None
    if model.tokenizer is None:
        raise _BadInput(f"model {args.model!r} has no tokenizer; cannot read a text prompt")
    return model


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from minterp_tl.models import model_info

    _check_common(args, "info")
    start = time.perf_counter()
    model = _load_text_model(args)
    load_s = time.perf_counter() - start
    info = model_info(model)
    print(f"model        {info.name}")
    print(f"parameters   {info.n_params_estimate:,}")
    print(f"layers       {info.n_layers}")
    print(f"heads        {info.n_heads}")
    print(f"d_model      {info.d_model}")
    print(f"d_vocab      {info.d_vocab}")
    print(f"load time    {load_s:.1f} s")
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
    from minterp_tl.lens import logit_lens

    _check_common(args, "lens")
    out = _out_path(args.out, "--out", ".png")
    model = _load_text_model(args)
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


def _cmd_routes(args: argparse.Namespace) -> int:
    import torch

    from minterp_tl.routes import build_graph, paths_to_prediction, plot_routes, save_json, strongest_paths
    from minterp_tl.transparent import TransformerLensTransparentLlm

    _check_common(args, "routes")
    if not 0.0 <= args.threshold < 1.0:
        return _fail(f"--threshold must be in [0, 1), got {args.threshold}")
    out = _out_path(args.out, "--out", ".png")
    json_path = _out_path(args.json, "--json", ".json") if args.json else None
    model = _load_text_model(args)
    llm = TransformerLensTransparentLlm(model)
    start = time.perf_counter()
    llm.run([args.prompt])
    n = llm.n_tokens(0)
    if not -n <= args.token < n:
        return _fail(f"--token {args.token} is out of range: the prompt has {n} tokens (valid: {-n}..{n - 1})")
    graph = build_graph(llm, 0, threshold=args.threshold, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    token = args.token % n
    tokens = graph.graph["tokens"]
    predicted = int(llm.logits()[0, token].argmax())
    paths = strongest_paths(graph, token=token, k=args.top_k)
    kept = paths_to_prediction(graph, token=token)
    print(f"prompt       {args.prompt!r} ({n} tokens)")
    print(f"position     {token} ({tokens[token]!r}), predicts {llm.tokens_to_strings(torch.tensor([predicted]))[0]!r}")
    print(f"graph        {graph.number_of_edges()} edges (tau = {args.threshold:g}); "
          f"{kept.number_of_edges()} lead to the prediction; built in {seconds:.2f} s")
    print(f"\nstrongest paths (weight = product of the shares along the path):")
    if not paths:
        print("  none above the threshold; try a lower --threshold")
    for route in paths:
        print("  " + route.describe(tokens))
    plot_routes(graph, out, token=token, title=f"routes to the prediction at {token} ({tokens[token]!r})")
    print(f"\nroutes PNG written to {out}")
    if json_path is not None:
        save_json(graph, json_path)
        print(f"graph JSON written to {json_path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``minterp-tl``; returns the exit code."""
    args = _parser().parse_args(argv)
    commands = {"info": _cmd_info, "lens": _cmd_lens, "routes": _cmd_routes}
    try:
        return commands[args.command](args)
    except _BadInput as err:
        return _fail(str(err))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
