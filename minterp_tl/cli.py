"""The ``minterp-tl`` command line.

Subcommands:
    info     Load a model, print its ModelInfo and the top-k next tokens for a prompt (``--out``: also a
             bar chart of them).
    lens     The logit lens of a prompt: a table of every layer's top tokens at the last position and
             a layers x positions heatmap PNG (the main job).
    patch    Activation patching of a clean / corrupted prompt pair: patch the clean activation of one
             hook into the corrupted run at every selected layer x position (x head), measure the
             logit difference, print the strongest cells and write the heatmap PNG.
    routes   The information-flow routes to the prediction at the last position: the strongest
             input-to-prediction paths, a tokens x layers PNG, and optionally the graph as JSON.
    circuit  Learn a head mask on the trained induction model: the smallest set of heads that keeps
             induction; prints the kept heads with their scores, the losses of the full model, the
             subnetwork, the model without it and random head sets of the same size, and writes the
             mask PNG.

Every subcommand takes ``--model``, ``--out`` and ``--no-progress``. Bad input (unknown model, bad
spec, empty prompt, ...) exits with code 2 and one line on stderr; what can be checked without a
model (specs, numbers, output paths) is checked before a model is loaded.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Optional, Sequence

if TYPE_CHECKING:  # the heavy imports happen inside the commands, so --help and bad input stay fast
    from jaxtyping import Float
    from torch import Tensor

DEFAULT_PROMPT = "The capital of France is"
IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
CIRCUIT_MODELS: dict[str, float] = {"induction-redundant": 0.5, "induction": 0.0}
"""``circuit --model`` choices -> the ``head_dropout`` the 2-layer induction model is trained with."""

CIRCUIT_TRAIN_LENGTHS: tuple[int, ...] = (8, 10, 12, 14, 17, 19, 22, 24)
"""Repeat lengths of the mask-training batches (48 sequences each); 11, 16 and 21 are held out."""

_EPOCHS = 8
_EVAL_SEQUENCES, _EVAL_SEED = 128, 5  # the fixed held-out evaluation set of ``circuit``

_EXAMPLES = """examples:
  minterp-tl info "The capital of France is"
  minterp-tl lens "The capital of France is" --out lens.png
  minterp-tl patch --normalize --out patch.png                  # the IOI pair, resid_pre, every layer x position
  minterp-tl patch --hook z --heads all --layers "n//2:"        # heads of the upper half, all positions at once
  minterp-tl routes "The capital of France is" --json routes.json
  minterp-tl circuit --lambda 0.15 --steps 80 --out circuit.png

Layer / position / head specs: 3, -1, "0, 5, -1", ":n//2", "n//2:", "-3:", "::2", "last", "first_half", ...
(positions may also be a token of the corrupted prompt, e.g. " John"). Bad input exits with code 2."""


# --------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit code 2), like every other
    bad input, instead of the usage block plus a line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"minterp-tl: error: {message} (see: {self.prog} --help)\n")


def _common(sub: argparse.ArgumentParser, *, model: str, model_help: str, out: Optional[str], out_help: str) -> None:
    """The options every subcommand has: ``--model``, ``--out``, ``--no-progress``."""
    sub.add_argument("--model", default=model, help=f"{model_help} (default: {model})")
    sub.add_argument("--out", default=out, metavar="PNG", help=out_help + (f" (default: {out})" if out else ""))
    sub.add_argument("--no-progress", action="store_true", help="hide progress bars (model loading included)")


def _parser() -> argparse.ArgumentParser:
    text_model = "model: 'smollm2-135m' (offline) or a local Hugging Face model directory"
    parser = _Parser(
        prog="minterp-tl",
        description="Mechanistic interpretability on TransformerLens 4: logit lens, activation patching, "
        "information-flow routes and learned circuits (offline SmolLM2-135M by default).",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    info = add("info", "load a model, print its ModelInfo and the top next tokens",
               "Load a model, print its summary (layers, heads, sizes, load time) and the top-k next tokens "
               "of a prompt with their probabilities.")
    info.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help=f"prompt (default: {DEFAULT_PROMPT!r})")
    info.add_argument("--top-k", type=int, default=5, help="how many next tokens to print (default: 5)")
    _common(info, model="smollm2-135m", model_help=text_model, out=None,
            out_help="also write a bar chart of the top next tokens to this PNG")

    lens = add("lens", "logit lens: every layer's top tokens, as a table and a PNG heatmap",
               "The logit lens: project every layer's residual stream through the final norm and the "
               "unembedding. Prints each layer's top tokens at the last position (and the rank of the "
               "answer) and writes a layers x positions heatmap of the answer's probability.")
    lens.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help=f"prompt (default: {DEFAULT_PROMPT!r})")
    lens.add_argument("--top-k", type=int, default=3, help="top tokens per layer in the table (default: 3)")
    lens.add_argument("--answer", help="a single-token answer to track (default: the model's own top prediction)")
    _common(lens, model="smollm2-135m", model_help=text_model, out="lens.png", out_help="where to write the heatmap PNG")

    patch = add("patch", "activation patching of a clean / corrupted pair: strongest cells and a heatmap PNG",
                "Activation patching: run the clean and the corrupted prompt, then put the clean activation of\n"
                "--hook into the corrupted run at each selected layer x position (x head) and measure\n"
                "logit(answer) - logit(wrong) at the last position (--normalize: 0 = as corrupted, 1 = as clean).\n"
                "Many patched copies run per forward pass (minterp_tl.patching.activation_patch). Prints the\n"
                "cells with the largest effect |value - corrupted value| and writes the heatmap PNG.\n\n"
                "The two prompts must have the same number of tokens. Default pair (IOI):\n"
                f"  clean:     {IOI_CLEAN!r}\n  corrupted: {IOI_CORRUPTED!r}")
    patch.add_argument("clean", nargs="?", default=IOI_CLEAN, help="the clean prompt (default: the IOI prompt above)")
    patch.add_argument("corrupted", nargs="?", default=IOI_CORRUPTED,
                       help="the corrupted prompt, same token count (default: the IOI prompt with the names swapped)")
    patch.add_argument("--answer", help="single-token correct answer (default: the clean run's top token)")
    patch.add_argument("--wrong", help="single-token wrong answer (default: the corrupted run's top token)")
    patch.add_argument("--hook", default="resid_pre",
                       help="what to patch: any per-layer hook name or alias, e.g. resid_pre, resid_mid, attn_out, "
                       "mlp_out, z, v, pattern, blocks.{l}.hook_resid_post (default: resid_pre)")
    patch.add_argument("--layers", default="all", help="layer spec, e.g. all, 'n//2:', '0, 5, -1' (default: all)")
    patch.add_argument("--positions", default=None,
                       help="position spec, e.g. all, '-3:', last, or a token such as ' John' (default: all; with "
                       "--heads: every position at once)")
    patch.add_argument("--heads", default=None,
                       help="head spec for hooks with a head axis (z, q, k, v, pattern, ...), e.g. all, '0, 3' "
                       "(default: no head axis)")
    patch.add_argument("--normalize", action="store_true",
                       help="report (patched - corrupted) / (clean - corrupted) instead of the raw logit difference")
    patch.add_argument("--top-k", type=int, default=5, help="how many strongest cells to print (default: 5)")
    _common(patch, model="smollm2-135m", model_help=text_model, out="patch.png", out_help="where to write the heatmap PNG")

    routes = add("routes", "information-flow routes to the prediction: strongest paths and a PNG",
                 "Information-flow routes (LLM Transparency Tool): L1 contributions of attention heads, MLPs and "
                 "the residual stream, thresholded into a graph; prints the strongest input-to-prediction paths "
                 "and writes a tokens x layers PNG (--json: the whole graph).")
    routes.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help=f"prompt (default: {DEFAULT_PROMPT!r})")
    routes.add_argument("--threshold", type=float, default=0.04, help="contribution threshold tau in [0, 1) (default: 0.04)")
    routes.add_argument("--token", type=int, default=-1, help="position whose prediction to explain (default: -1, the last)")
    routes.add_argument("--top-k", type=int, default=5, help="how many strongest paths to print (default: 5)")
    routes.add_argument("--json", help="also write the full graph as JSON to this path")
    _common(routes, model="smollm2-135m", model_help=text_model, out="routes.png", out_help="where to write the routes PNG")

    circuit = add("circuit", "learn the smallest set of heads that keeps induction (trained induction model)",
                  "Learn a head mask (continuous sparsification on attn.W_O, init 2.0, AdamW lr 0.1, 8 temperature "
                  "epochs)\non the trained 2-layer attention-only induction model: the smallest set of heads that "
                  "keeps the\nsecond-half loss on repeated random tokens low (task loss + lambda * number of heads).\n"
                  "Training batches: 48 sequences at each repeat length in "
                  f"{', '.join(map(str, CIRCUIT_TRAIN_LENGTHS))} (seeded by --seed).\n"
                  f"Evaluation: {_EVAL_SEQUENCES} fixed held-out sequences of repeat length --length. Prints the kept "
                  "heads with their\nprevious-token / induction scores and the losses of the full model, the "
                  "subnetwork, the model with the\nsubnetwork zero-ablated and random head sets of the same size "
                  "(mean of 8); writes the mask PNG.\n\n"
                  "Models: induction-redundant (trained with head dropout 0.5, so a few heads can do the task alone)\n"
                  "and induction (the standard model). Each is trained once (a few minutes) and cached on disk.")
    circuit.add_argument("--lambda", dest="lam", type=float, default=0.15, metavar="LAMBDA",
                         help="weight of the head-count penalty (default: 0.15; larger keeps fewer heads)")
    circuit.add_argument("--steps", type=int, default=80, help=f"optimiser steps, >= {_EPOCHS} (default: 80)")
    circuit.add_argument("--length", type=int, default=11,
                         help="repeat length of the evaluation sequences; 11, 16, 21 are held out of both trainings "
                         "(default: 11)")
    circuit.add_argument("--seed", type=int, default=1, help="seed of the mask-training batches (default: 1)")
    _common(circuit, model="induction-redundant", model_help="induction-redundant or induction", out="circuit.png",
            out_help="where to write the mask PNG")
    return parser


# --------------------------------------------------------------------------------------------
# Shared checks
# --------------------------------------------------------------------------------------------


def _fail(message: str) -> int:
    print(f"minterp-tl: error: {message}", file=sys.stderr)
    return 2


class _BadInput(Exception):
    """Bad command-line input; its message is the one line ``_fail`` prints."""


def _check_prompt(text: str, what: str, example: str) -> None:
    if not text.strip():
        raise _BadInput(f"the {what} is empty; give some text, e.g. {example}")


_MAX_TOP_K = 1000


def _check_top_k(top_k: int) -> None:
    if not 1 <= top_k <= _MAX_TOP_K:
        raise _BadInput(f"--top-k must be in 1..{_MAX_TOP_K}, got {top_k}")


def _check_common(args: argparse.Namespace, command: str) -> None:
    """The checks the one-prompt subcommands share: a non-empty prompt and ``--top-k >= 1``."""
    _check_prompt(args.prompt, "prompt", f"minterp-tl {command} \"The capital of France is\"")
    _check_top_k(args.top_k)


def _out_path(value: str, option: str, suffix: str) -> Path:
    """``value`` as a path with ``suffix`` in an existing directory, or :class:`_BadInput`."""
    path = Path(value)
    if path.suffix.lower() != suffix or not path.parent.is_dir():
        raise _BadInput(f"{option} must be a {suffix} path in an existing directory, got {value!r}")
    if path.is_dir() or (path.exists() and not path.is_file()):
        raise _BadInput(f"{option} {value!r} exists and is not a file; give a new file name")
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise _BadInput(f"{option} {value!r} cannot be written (no permission in {str(path.parent)!r})")
    return path


def _prompt_tokens(model: Any, text: str, option: str = "prompt") -> Any:
    """``text`` tokenized in full: a prompt longer than the model's context is :class:`_BadInput`."""
    from minterp_tl._checks import text_tokens

    return _checked(option, lambda: text_tokens(model, text, option))


def _check_spec(value: Optional[str], option: str, what: str) -> None:
    """The syntax of a layer / position / head spec, before any model is loaded."""
    from minterp_tl.specs import check_spec

    if value is None:
        return
    try:
        check_spec(value, what)
    except ValueError as err:
        raise _BadInput(f"{option}: {err}") from None


def _load_text_model(args: argparse.Namespace) -> Any:
    """Load ``--model``; a model that cannot be loaded or has no tokenizer is :class:`_BadInput`."""
    from minterp_tl.models import load_model

    try:
        model = load_model(args.model, progress=not args.no_progress)  # progress=False hides every bar
    except (ValueError, ImportError) as err:
        raise _BadInput(str(err).splitlines()[0]) from None
    if model.tokenizer is None:
        raise _BadInput(f"model {args.model!r} has no tokenizer; cannot read a text prompt")
    return model


def _checked(option: str, value: Callable[[], Any]) -> Any:
    """``value()``, with a ``ValueError`` turned into :class:`_BadInput` naming ``option``."""
    try:
        return value()
    except ValueError as err:
        raise _BadInput(f"{option}: {str(err).splitlines()[0]}") from None


def _single_token(model: Any, text: str, option: str) -> int:
    """The id of ``text`` if it is exactly one token, else :class:`_BadInput`."""
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        raise _BadInput(f"{option} {text!r} is {len(ids)} tokens {pieces}, not one; give a single token, e.g. ' Mary'")
    return int(ids[0])


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from minterp_tl.models import model_info

    _check_common(args, "info")
    out = _out_path(args.out, "--out", ".png") if args.out else None
    start = time.perf_counter()
    model = _load_text_model(args)
    load_s = time.perf_counter() - start
    tokens_in = _prompt_tokens(model, args.prompt)
    info = model_info(model)
    print(f"model        {info.name}")
    print(f"parameters   {info.n_params_estimate:,}")
    print(f"layers       {info.n_layers}")
    print(f"heads        {info.n_heads}")
    print(f"d_model      {info.d_model}")
    print(f"d_vocab      {info.d_vocab}")
    print(f"load time    {load_s:.1f} s")
    with torch.no_grad():
        logits = model(tokens_in)
    probs = logits[0, -1].float().softmax(-1)
    top = probs.topk(min(args.top_k, probs.numel()))
    tokens = [model.tokenizer.decode([idx]) for idx in top.indices.tolist()]
    print(f"\nprompt       {args.prompt!r}")
    print(f"{'rank':>4}  {'token':<16} {'prob':>7}")
    for rank, (p, token) in enumerate(zip(top.values.tolist(), tokens), start=1):
        print(f"{rank:>4}  {token!r:<16} {p:7.4f}")
    if out is not None:
        _plot_next_tokens(tokens, top.values.tolist(), out, f"{info.name}: next token after {args.prompt!r}")
        print(f"\nbar chart written to {out}")
    return 0


def _plot_next_tokens(tokens: Sequence[str], probs: Sequence[float], path: Path, title: str) -> Path:
    """A horizontal bar chart of the top next tokens' probabilities (highest on top)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minterp_tl._files import save_png

    fig, ax = plt.subplots(figsize=(6.0, 1.2 + 0.35 * len(tokens)))
    ax.barh(range(len(tokens)), probs, color="tab:blue")
    ax.set_yticks(range(len(tokens)), [repr(t) for t in tokens], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("probability")
    ax.set_xlim(0, max(1e-6, max(probs)) * 1.1)
    ax.set_title(title if len(title) <= 70 else title[:67] + "...", fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)


# --------------------------------------------------------------------------------------------
# lens
# --------------------------------------------------------------------------------------------


def _cmd_lens(args: argparse.Namespace) -> int:
    from minterp_tl.lens import logit_lens

    _check_common(args, "lens")
    out = _out_path(args.out, "--out", ".png")
    model = _load_text_model(args)
    lens = logit_lens(model, _prompt_tokens(model, args.prompt))
    answer = args.answer
    if answer is None:
        answer = int(lens.top_k(1, prompt=0, position=-1)[1][-1, 0, 0, 0])  # the model's own top token
    try:
        table = lens.table(position=-1, k=args.top_k, answer=answer)
    except ValueError as err:
        return _fail(str(err))
    print(table)
    lens.plot(out)
    print(f"\nheatmap written to {out}")
    return 0


# --------------------------------------------------------------------------------------------
# patch
# --------------------------------------------------------------------------------------------


def _strongest(values: Float[Tensor, "..."], baseline: float, k: int) -> list[tuple[int, ...]]:
    """Indices (into ``values``) of the ``k`` cells with the largest effect ``|value - baseline|``,
    strongest first."""
    flat = (values.flatten() - baseline).abs()
    order = flat.topk(min(k, flat.numel())).indices.tolist()
    return [tuple(int(i) for i in _unravel(j, values.shape)) for j in order]


def _unravel(index: int, shape: Sequence[int]) -> list[int]:
    out = []
    for size in reversed(shape):
        index, rest = divmod(index, size)
        out.append(rest)
    return out[::-1]


def _cmd_patch(args: argparse.Namespace) -> int:
    import torch

    from minterp_tl.names import resolve_name
    from minterp_tl.patching import activation_patch, logit_diff_metric, normalized_metric, plot_heatmap
    from minterp_tl.specs import resolve
    from minterp_tl.hooks import has_heads, n_heads

    example = f"minterp-tl patch {IOI_CLEAN!r} {IOI_CORRUPTED!r}"
    _check_prompt(args.clean, "clean prompt", example)
    _check_prompt(args.corrupted, "corrupted prompt", example)
    _check_top_k(args.top_k)
    _check_spec(args.layers, "--layers", "layer")
    _check_spec(args.positions, "--positions", "position")
    _check_spec(args.heads, "--heads", "head")
    out = _out_path(args.out, "--out", ".png")
    model = _load_text_model(args)

    clean_tokens = _prompt_tokens(model, args.clean, "clean prompt")
    corrupted_tokens = _prompt_tokens(model, args.corrupted, "corrupted prompt")
    n_clean, n_corrupted = clean_tokens.shape[1], corrupted_tokens.shape[1]
    if n_clean != n_corrupted:
        raise _BadInput(f"the clean and corrupted prompts must have the same number of tokens: the clean prompt has "
                        f"{n_clean}, the corrupted one {n_corrupted} (BOS included)")
    clean_str = list(model.to_str_tokens(clean_tokens[0]))
    corrupted_str = list(model.to_str_tokens(corrupted_tokens[0]))
    layers = _checked("--layers", lambda: resolve(args.layers, model.cfg.n_layers, what="layer"))
    positions = None
    if args.positions is not None or args.heads is None:
        positions = _checked("--positions", lambda: resolve("all" if args.positions is None else args.positions,
                                                           n_corrupted, tokens=corrupted_str, what="position"))
    names = _checked("--hook", lambda: [resolve_name(model, args.hook, layer) for layer in layers])
    if args.heads is not None:  # checked here too, so that bad heads fail before any forward pass
        if not has_heads(names[0]):
            raise _BadInput(f"--heads {args.heads!r} given, but {names[0]} has no head axis; use a hook with one "
                            "(z, q, k, v, pattern, attn_scores, result) or leave --heads out")
        _checked("--heads", lambda: resolve(args.heads, n_heads(model, names[0]), what="head"))
    answer = _single_token(model, args.answer, "--answer") if args.answer is not None else None
    wrong = _single_token(model, args.wrong, "--wrong") if args.wrong is not None else None
    if answer is not None and answer == wrong:
        raise _BadInput(f"--answer and --wrong are the same token {args.answer!r}; give two different single tokens")

    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean_tokens, names_filter=lambda name: name in names)
        corrupted_logits = model(corrupted_tokens)
    answer = int(clean_logits[0, -1].argmax()) if answer is None else answer
    wrong = int(corrupted_logits[0, -1].argmax()) if wrong is None else wrong
    answer_str, wrong_str = model.tokenizer.decode([answer]), model.tokenizer.decode([wrong])
    if answer == wrong:
        raise _BadInput(f"--answer and --wrong are the same token {answer_str!r}, so the logit difference is 0 on every "
                        "run; give two different single tokens")
    metric = logit_diff_metric(answer, wrong)
    clean_value, corrupted_value = float(metric(clean_logits)), float(metric(corrupted_logits))
    if args.normalize:
        try:
            metric = normalized_metric(metric, clean_logits, corrupted_logits)
        except ValueError as err:
            raise _BadInput(str(err).splitlines()[0]) from None

    start = time.perf_counter()
    try:
        sweep = activation_patch(model, corrupted_tokens, clean_cache, metric, args.hook, layers=layers,
                                 positions=positions, heads=args.heads, progress=not args.no_progress)
    except ValueError as err:  # a head spec out of range, heads for a hook without a head axis, ...
        raise _BadInput(str(err).splitlines()[0]) from None
    seconds = time.perf_counter() - start

    grid = " x ".join(f"{len(axis)} {name}s" for name, axis in
                      (("layer", sweep.layers), ("position", sweep.positions), ("head", sweep.heads)) if axis is not None)
    label = "recovered fraction" if args.normalize else "logit difference"
    print(f"clean        {args.clean!r} ({n_clean} tokens), predicts {model.tokenizer.decode([int(clean_logits[0, -1].argmax())])!r}")
    print(f"corrupted    {args.corrupted!r}, predicts {model.tokenizer.decode([int(corrupted_logits[0, -1].argmax())])!r}")
    print(f"metric       logit({answer_str!r}) - logit({wrong_str!r}) at the last position: "
          f"clean {clean_value:.4f}, corrupted {corrupted_value:.4f}"
          + ("; normalised: (patched - corrupted) / (clean - corrupted)" if args.normalize else ""))
    print(f"sweep        {sweep.hook}: {grid} = {sweep.values.numel()} patches in {seconds:.2f} s")
    baseline = 0.0 if args.normalize else corrupted_value  # the value of a patch that changes nothing
    ranked = "by |value|; 0 = as corrupted" if args.normalize else f"by the change from the corrupted run's {baseline:.4f}"
    print(f"\nstrongest cells ({label}, {ranked}):")
    head_col = sweep.heads is not None
    pos_col = sweep.positions is not None
    print(f"{'rank':>4}  {'layer':>5}" + (f"  {'pos':>4}  {'token (clean/corrupted)':<26}" if pos_col else "")
          + (f"  {'head':>4}" if head_col else "") + f"  {'value':>9}")
    for rank, cell in enumerate(_strongest(sweep.values, baseline, args.top_k), start=1):
        row = f"{rank:>4}  {sweep.layers[cell[0]]:>5}"
        if pos_col:
            p = sweep.positions[cell[1]]
            token = repr(clean_str[p]) if clean_str[p] == corrupted_str[p] else f"{clean_str[p]!r}/{corrupted_str[p]!r}"
            row += f"  {p:>4}  {token:<26}"
        if head_col:
            row += f"  {sweep.heads[cell[-1]]:>4}"
        print(row + f"  {float(sweep.values[cell]):>9.4f}")

    # normalised values are centred on 0 (= the corrupted run) with a diverging map; raw logit
    # differences are not centred on 0, so they get a sequential map
    title = f"patching {sweep.hook}: {label} ({answer_str!r} vs {wrong_str!r})"
    rows = [str(layer) for layer in sweep.layers]
    if sweep.values.ndim == 2 and sweep.positions is not None:
        cols = [f"{p} {corrupted_str[p]!r}" for p in sweep.positions]
    elif sweep.values.ndim == 2:
        cols = [f"h{h}" for h in sweep.heads]
    else:  # layer x position x head: one column per (position, head)
        cols = [f"{p} {corrupted_str[p]!r} h{h}" for p in sweep.positions for h in sweep.heads]
    xlabel = {("layer", "pos"): "position", ("layer", "head"): "head"}.get(sweep.axis_names, "position, head")
    plot_heatmap(sweep.values.flatten(1), out, row_labels=rows, col_labels=cols, xlabel=xlabel, title=title,
                 center=args.normalize)
    print(f"\nheatmap written to {out}")
    return 0


# --------------------------------------------------------------------------------------------
# routes
# --------------------------------------------------------------------------------------------


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
    _prompt_tokens(model, args.prompt)
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
    print("\nstrongest paths (weight = product of the shares along the path):")
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


# --------------------------------------------------------------------------------------------
# circuit
# --------------------------------------------------------------------------------------------


def _cmd_circuit(args: argparse.Namespace) -> int:
    if args.model not in CIRCUIT_MODELS:
        raise _BadInput(f"circuit --model must be one of {', '.join(CIRCUIT_MODELS)} (trained induction models), "
                        f"got {args.model!r}")
    if not math.isfinite(args.lam) or args.lam < 0:
        raise _BadInput(f"--lambda must be a finite number >= 0, got {args.lam}")
    if args.steps < _EPOCHS:
        raise _BadInput(f"--steps must be >= {_EPOCHS} (one per temperature epoch), got {args.steps}")
    if args.length < 2:
        raise _BadInput(f"--length must be >= 2, got {args.length}")
    if not 0 <= args.seed < 2**63:
        raise _BadInput(f"--seed must be in 0..2**63-1, got {args.seed}")
    out = _out_path(args.out, "--out", ".png")

    import torch

    from minterp_tl.circuits import CircuitConfig, find_subnetwork
    from minterp_tl.models import induction_report, repeated_random_tokens, second_half_loss, train_induction_model

    torch.set_num_threads(1)  # a tiny model: a second thread only adds contention
    head_dropout = CIRCUIT_MODELS[args.model]
    model = train_induction_model(2, head_dropout=head_dropout, progress=not args.no_progress)
    max_length = (model.cfg.n_ctx - 1) // 2
    if args.length > max_length:
        raise _BadInput(f"--length must be in 2..{max_length} (the model's context is {model.cfg.n_ctx}), got {args.length}")
    d_vocab = model.cfg.d_vocab - 1  # the last id is BOS
    gen = torch.Generator().manual_seed(args.seed)  # checked before the model was loaded
    train = [repeated_random_tokens(48, length, d_vocab, gen) for length in CIRCUIT_TRAIN_LENGTHS]
    test = repeated_random_tokens(_EVAL_SEQUENCES, args.length, d_vocab, torch.Generator().manual_seed(_EVAL_SEED))
    report = induction_report(model, args.length)
    with torch.no_grad():
        full = float(second_half_loss(model(test), test))

    hparams = dict(ablation="none", mask_unit="head", mask_bias=False, mask_init_value=2.0)
    config = CircuitConfig("continuous_sparsification", hparams, ("attn.W_O",), l0_lambda=args.lam)
    start = time.perf_counter()
    circuit, _ = find_subnetwork(model, config, train, second_half_loss, steps=args.steps, epochs=_EPOCHS, lr=0.1,
                                 progress=not args.no_progress)
    seconds = time.perf_counter() - start
    try:
        with torch.no_grad():
            heads = circuit.kept_heads()
            kept = float(second_half_loss(circuit(test), test))
            random_losses = []
            for i in range(8) if 0 < len(heads) else ():
                circuit.set_ablate_mode("randomly_sampled", force_resample=True, seed=i)
                random_losses.append(float(second_half_loss(circuit(test), test)))
            circuit.set_ablate_mode("zero_ablate")
            removed = float(second_half_loss(circuit(test), test))
            circuit.set_ablate_mode("none")
        circuit.plot_masks(out)
    finally:
        circuit.detach()

    n_heads = model.cfg.n_layers * model.cfg.n_heads
    print(f"model        {args.model}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads, attention only"
          + (f", trained with head dropout {head_dropout:g}" if head_dropout else ""))
    print(f"masks        continuous sparsification on attn.W_O heads, init 2.0, lambda {args.lam:g}, "
          f"{args.steps} steps, {_EPOCHS} epochs, lr 0.1, seed {args.seed}; trained in {seconds:.1f} s")
    print(f"kept         {len(heads)} of {n_heads} heads")
    print(f"\nkept heads (attention scores at repeat length {args.length}):")
    print(f"{'head':<6} {'prev-token':>10} {'induction':>10}")
    for layer, head in heads:
        print(f"{f'L{layer}H{head}':<6} {float(report.prev_token_scores[layer, head]):>10.3f} "
              f"{float(report.induction_scores[layer, head]):>10.3f}")
    if not heads:
        print("  none: the penalty removed every head; try a smaller --lambda")
    print(f"\nsecond-half loss at repeat length {args.length} ({_EVAL_SEQUENCES} held-out sequences; "
          f"chance = ln {d_vocab} = {math.log(d_vocab):.3f}):")
    print(f"{'full model':<32} {full:.4f}")
    print(f"{f'subnetwork ({len(heads)} heads)':<32} {kept:.4f}")
    print(f"{'subnetwork zero-ablated':<32} {removed:.4f}")
    if random_losses:
        print(f"{f'random {len(heads)} heads (mean of 8)':<32} {sum(random_losses) / len(random_losses):.4f}")
    print(f"\nmask PNG written to {out}")
    return 0


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


_SPEC_OPTIONS = ("--layers", "--positions", "--heads")


def _attach_spec_values(argv: Sequence[str]) -> list[str]:
    """``--positions -3:`` -> ``--positions=-3:``: argparse takes a value that starts with ``-`` (and is
    not a plain negative number) for an option, so negative specs would otherwise need the ``=`` form."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _SPEC_OPTIONS and i + 1 < len(argv) and argv[i + 1].startswith("-") and not argv[i + 1].startswith("--"):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``minterp-tl``; returns the exit code (0 success, 2 bad input)."""
    args = _parser().parse_args(_attach_spec_values(sys.argv[1:] if argv is None else list(argv)))
    commands = {"info": _cmd_info, "lens": _cmd_lens, "patch": _cmd_patch, "routes": _cmd_routes,
                "circuit": _cmd_circuit}
    try:
        return commands[args.command](args)
    except _BadInput as err:
        return _fail(str(err))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["main"]
