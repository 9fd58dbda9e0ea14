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

This module holds the public constants, the argument parser and :func:`main`; the subcommands and the
checks of their input are in :mod:`minterp_tl._cli_commands`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn, Optional

# the constants the commands share with the parser are defined next to the commands (no import cycle)
from minterp_tl._cli_commands import (
    CIRCUIT_EPOCHS,
    CIRCUIT_EVAL_SEQUENCES,
    CIRCUIT_MODELS,
    CIRCUIT_TRAIN_LENGTHS,
    IOI_CLEAN,
    IOI_CORRUPTED,
    BadInput,
    cmd_circuit,
    cmd_info,
    cmd_lens,
    cmd_patch,
    cmd_routes,
    cmd_serve,
    fail,
)

DEFAULT_PROMPT = "The capital of France is"

_EXAMPLES = (
    "examples:\n"
    '  minterp-tl info "The capital of France is"\n'
    '  minterp-tl lens "The capital of France is" --out lens.png\n'
    "  minterp-tl patch --normalize --out patch.png                  "
    "# the IOI pair, resid_pre, every layer x position\n"
    '  minterp-tl patch --hook z --heads all --layers "n//2:"        '
    "# heads of the upper half, all positions at once\n"
    '  minterp-tl routes "The capital of France is" --json routes.json\n'
    "  minterp-tl circuit --lambda 0.15 --steps 80 --out circuit.png\n"
    "\n"
    'Layer / position / head specs: 3, -1, "0, 5, -1", ":n//2", "n//2:", "-3:", "::2", "last", '
    '"first_half", ...\n'
    '(positions may also be a token of the corrupted prompt, e.g. " John"). Bad input exits with code 2.'
)


# --------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit code 2), like every other
    bad input, instead of the usage block plus a line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"minterp-tl: error: {message} (see: {self.prog} --help)\n")


def _common(
    sub: argparse.ArgumentParser, *, model: str, model_help: str, out: Optional[str], out_help: str
) -> None:
    """The options every subcommand has: ``--model``, ``--out``, ``--no-progress``."""
    sub.add_argument("--model", default=model, help=f"{model_help} (default: {model})")
    sub.add_argument(
        "--out", default=out, metavar="PNG", help=out_help + (f" (default: {out})" if out else "")
    )
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
        return sub.add_parser(
            name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
        )

    info = add(
        "info",
        "load a model, print its ModelInfo and the top next tokens",
        "Load a model, print its summary (layers, heads, sizes, load time) and the top-k next tokens "
        "of a prompt with their probabilities.",
    )
    info.add_argument(
        "prompt", nargs="?", default=DEFAULT_PROMPT, help=f"prompt (default: {DEFAULT_PROMPT!r})"
    )
    info.add_argument("--top-k", type=int, default=5, help="how many next tokens to print (default: 5)")
    _common(
        info,
        model="smollm2-135m",
        model_help=text_model,
        out=None,
        out_help="also write a bar chart of the top next tokens to this PNG",
    )

    lens = add(
        "lens",
        "logit lens: every layer's top tokens, as a table and a PNG heatmap",
        "The logit lens: project every layer's residual stream through the final norm and the "
        "unembedding. Prints each layer's top tokens at the last position (and the rank of the "
        "answer) and writes a layers x positions heatmap of the answer's probability.",
    )
    lens.add_argument(
        "prompt", nargs="?", default=DEFAULT_PROMPT, help=f"prompt (default: {DEFAULT_PROMPT!r})"
    )
    lens.add_argument("--top-k", type=int, default=3, help="top tokens per layer in the table (default: 3)")
    lens.add_argument(
        "--answer", help="a single-token answer to track (default: the model's own top prediction)"
    )
    _common(
        lens,
        model="smollm2-135m",
        model_help=text_model,
        out="lens.png",
        out_help="where to write the heatmap PNG",
    )

    patch = add(
        "patch",
        "activation patching of a clean / corrupted pair: strongest cells and a heatmap PNG",
        "Activation patching: run the clean and the corrupted prompt, then put the clean activation of\n"
        "--hook into the corrupted run at each selected layer x position (x head) and measure\n"
        "logit(answer) - logit(wrong) at the last position (--normalize: 0 = as corrupted, 1 = as clean).\n"
        "Many patched copies run per forward pass (minterp_tl.patching.activation_patch). Prints the\n"
        "cells with the largest effect |value - corrupted value| and writes the heatmap PNG.\n\n"
        "The two prompts must have the same number of tokens. Default pair (IOI):\n"
        f"  clean:     {IOI_CLEAN!r}\n  corrupted: {IOI_CORRUPTED!r}",
    )
    patch.add_argument(
        "clean", nargs="?", default=IOI_CLEAN, help="the clean prompt (default: the IOI prompt above)"
    )
    patch.add_argument(
        "corrupted",
        nargs="?",
        default=IOI_CORRUPTED,
        help="the corrupted prompt, same token count (default: the IOI prompt with the names swapped)",
    )
    patch.add_argument("--answer", help="single-token correct answer (default: the clean run's top token)")
    patch.add_argument("--wrong", help="single-token wrong answer (default: the corrupted run's top token)")
    patch.add_argument(
        "--hook",
        default="resid_pre",
        help="what to patch: any per-layer hook name or alias, e.g. resid_pre, resid_mid, attn_out, "
        "mlp_out, z, v, pattern, blocks.{l}.hook_resid_post (default: resid_pre)",
    )
    patch.add_argument(
        "--layers", default="all", help="layer spec, e.g. all, 'n//2:', '0, 5, -1' (default: all)"
    )
    patch.add_argument(
        "--positions",
        default=None,
        help="position spec, e.g. all, '-3:', last, or a token such as ' John' (default: all; with "
        "--heads: every position at once)",
    )
    patch.add_argument(
        "--heads",
        default=None,
        help="head spec for hooks with a head axis (z, q, k, v, pattern, ...), e.g. all, '0, 3' "
        "(default: no head axis)",
    )
    patch.add_argument(
        "--normalize",
        action="store_true",
        help="report (patched - corrupted) / (clean - corrupted) instead of the raw logit difference",
    )
    patch.add_argument("--top-k", type=int, default=5, help="how many strongest cells to print (default: 5)")
    _common(
        patch,
        model="smollm2-135m",
        model_help=text_model,
        out="patch.png",
        out_help="where to write the heatmap PNG",
    )

    routes = add(
        "routes",
        "information-flow routes to the prediction: strongest paths and a PNG",
        "Information-flow routes (LLM Transparency Tool): L1 contributions of attention heads, MLPs and "
        "the residual stream, thresholded into a graph; prints the strongest input-to-prediction paths "
        "and writes a tokens x layers PNG (--json: the whole graph).",
    )
    routes.add_argument(
        "prompt", nargs="?", default=DEFAULT_PROMPT, help=f"prompt (default: {DEFAULT_PROMPT!r})"
    )
    routes.add_argument(
        "--threshold", type=float, default=0.04, help="contribution threshold tau in [0, 1) (default: 0.04)"
    )
    routes.add_argument(
        "--token", type=int, default=-1, help="position whose prediction to explain (default: -1, the last)"
    )
    routes.add_argument("--top-k", type=int, default=5, help="how many strongest paths to print (default: 5)")
    routes.add_argument(
        "--distance-norm",
        type=int,
        choices=(1, 2),
        default=1,
        help="distance of the contributions: 1 (L1, the paper's; default) or 2 (L2)",
    )
    routes.add_argument("--json", help="also write the full graph as JSON to this path")
    _common(
        routes,
        model="smollm2-135m",
        model_help=text_model,
        out="routes.png",
        out_help="where to write the routes PNG",
    )

    serve = add(
        "serve",
        "the explorer: a local web app (contribution graph, lens, patching) for any model",
        "Start the explorer on http://127.0.0.1:PORT: type a prompt, see its contribution graph, click an "
        "edge,\na block or a neuron, read the logit lens, patch against a corrupted prompt. Everything it "
        "loads comes\nfrom the package (no internet). Stop with Ctrl-C.",
    )
    serve.add_argument("--model", default="smollm2-135m", help=f"{text_model} (default: smollm2-135m)")
    serve.add_argument("--port", type=int, default=8765, help="port (default: 8765; 0: any free port)")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    serve.add_argument("--no-progress", action="store_true", help="hide the model loading bars")

    circuit = add(
        "circuit",
        "learn the smallest set of heads that keeps induction (trained induction model)",
        "Learn a head mask (continuous sparsification on attn.W_O, init 2.0, AdamW lr 0.1, 8 temperature "
        "epochs)\non the trained 2-layer attention-only induction model: the smallest set of heads that "
        "keeps the\nsecond-half loss on repeated random tokens low (task loss + lambda * number of heads).\n"
        "Training batches: 48 sequences at each repeat length in "
        f"{', '.join(map(str, CIRCUIT_TRAIN_LENGTHS))} (seeded by --seed).\n"
        f"Evaluation: {CIRCUIT_EVAL_SEQUENCES} fixed held-out sequences of repeat length --length. "
        "Prints the kept "
        "heads with their\nprevious-token / induction scores and the losses of the full model, the "
        "subnetwork, the model with the\nsubnetwork zero-ablated and random head sets of the same size "
        "(mean of 8); writes the mask PNG.\n\n"
        "Models: induction-redundant (trained with head dropout 0.5, so a few heads can do the task alone)\n"
        "and induction (the standard model). Each is trained once (a few minutes) and cached on disk.",
    )
    circuit.add_argument(
        "--lambda",
        dest="lam",
        type=float,
        default=0.15,
        metavar="LAMBDA",
        help="weight of the head-count penalty (default: 0.15; larger keeps fewer heads)",
    )
    circuit.add_argument(
        "--steps", type=int, default=80, help=f"optimiser steps, >= {CIRCUIT_EPOCHS} (default: 80)"
    )
    circuit.add_argument(
        "--length",
        type=int,
        default=11,
        help="repeat length of the evaluation sequences; 11, 16, 21 are held out of both trainings "
        "(default: 11)",
    )
    circuit.add_argument("--seed", type=int, default=1, help="seed of the mask-training batches (default: 1)")
    _common(
        circuit,
        model="induction-redundant",
        model_help="induction-redundant or induction",
        out="circuit.png",
        out_help="where to write the mask PNG",
    )
    return parser


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
        if (
            arg in _SPEC_OPTIONS
            and i + 1 < len(argv)
            and argv[i + 1].startswith("-")
            and not argv[i + 1].startswith("--")
        ):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``minterp-tl``; returns the exit code (0 success, 2 bad input)."""
    args = _parser().parse_args(_attach_spec_values(sys.argv[1:] if argv is None else list(argv)))
    commands = {
        "info": cmd_info,
        "lens": cmd_lens,
        "patch": cmd_patch,
        "routes": cmd_routes,
        "serve": cmd_serve,
        "circuit": cmd_circuit,
    }
    from minterp_tl import distributed  # after parsing: --help imports no torch

    if distributed.world().main:
        try:
            return commands[args.command](args)
        except BadInput as err:
            return fail(str(err))
    # under torchrun, the other ranks take their share of the sweep and print nothing (rank 0 prints
    # the same lines, and names a rank that failed)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        try:
            return commands[args.command](args)
        except BadInput:
            return 2


def run() -> NoReturn:
    """The ``minterp-tl`` console script: :func:`main`, then exit without tearing the interpreter down.

    Every file a command writes is closed and renamed into place before :func:`main` returns, so all
    that is left is to flush stdout / stderr; skipping the interpreter's teardown of torch and
    transformers saves about 2 s per call (a quarter of a warm ``minterp-tl lens``). An exception or
    ``SystemExit`` (``--help``, a usage error) leaves the normal way.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()


__all__ = [
    "CIRCUIT_MODELS",
    "CIRCUIT_TRAIN_LENGTHS",
    "DEFAULT_PROMPT",
    "IOI_CLEAN",
    "IOI_CORRUPTED",
    "main",
    "run",
]
