"""The implementations of the ``minterp-tl`` subcommands and the checks of their input.

:mod:`minterp_tl.cli` parses the command line and dispatches to the ``cmd_*`` functions here; each takes
the parsed arguments and returns the exit code. Bad input raises :class:`BadInput`, whose message
:func:`fail` prints as one line on stderr (exit code 2). What can be checked without a model (specs,
numbers, output paths) is checked before a model is loaded. The heavy imports (torch, TransformerLens,
matplotlib, networkx) happen inside the commands, so importing this module stays fast.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # the heavy imports happen inside the commands, so --help and bad input stay fast
    from jaxtyping import Float
    from torch import Tensor

IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
CIRCUIT_MODELS: dict[str, float] = {"induction-redundant": 0.5, "induction": 0.0}
"""``circuit --model`` choices -> the ``head_dropout`` the 2-layer induction model is trained with."""

CIRCUIT_TRAIN_LENGTHS: tuple[int, ...] = (8, 10, 12, 14, 17, 19, 22, 24)
"""Repeat lengths of the mask-training batches (48 sequences each); 11, 16 and 21 are held out."""

CIRCUIT_EPOCHS = 8
CIRCUIT_EVAL_SEQUENCES, CIRCUIT_EVAL_SEED = 128, 5  # the fixed held-out evaluation set of ``circuit``


# --------------------------------------------------------------------------------------------
# Shared checks
# --------------------------------------------------------------------------------------------


def fail(message: str) -> int:
    print(f"minterp-tl: error: {message}", file=sys.stderr)
    return 2


class BadInput(Exception):
    """Bad command-line input; its message is the one line ``fail`` prints."""


def check_prompt(text: str, what: str, example: str) -> None:
    if not text.strip():
        raise BadInput(f"the {what} is empty; give some text, e.g. {example}")


MAX_TOP_K = 1000


def check_top_k(top_k: int) -> None:
    if not 1 <= top_k <= MAX_TOP_K:
        raise BadInput(f"--top-k must be in 1..{MAX_TOP_K}, got {top_k}")


def check_common(args: argparse.Namespace, command: str) -> None:
    """The checks the one-prompt subcommands share: a non-empty prompt and ``--top-k >= 1``."""
    check_prompt(args.prompt, "prompt", f'minterp-tl {command} "The capital of France is"')
    check_top_k(args.top_k)


def out_path(value: str, option: str, suffix: str) -> Path:
    """``value`` as a path with ``suffix`` in an existing directory, or :class:`BadInput`."""
    path = Path(value)
    if path.suffix.lower() != suffix or not path.parent.is_dir():
        raise BadInput(f"{option} must be a {suffix} path in an existing directory, got {value!r}")
    if path.is_dir() or (path.exists() and not path.is_file()):
        raise BadInput(f"{option} {value!r} exists and is not a file; give a new file name")
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise BadInput(f"{option} {value!r} cannot be written (no permission in {str(path.parent)!r})")
    return path


def prompt_tokens(model: Any, text: str, option: str = "prompt") -> Any:
    """``text`` tokenized in full: a prompt longer than the model's context is :class:`BadInput`."""
    from minterp_tl._checks import text_tokens

    return checked(option, lambda: text_tokens(model, text, option))


def check_spec_option(value: Optional[str], option: str, what: str) -> None:
    """The syntax of a layer / position / head spec, before any model is loaded."""
    from minterp_tl.specs import check_spec

    if value is None:
        return
    try:
        check_spec(value, what)
    except ValueError as err:
        raise BadInput(f"{option}: {err}") from None


def load_text_model(args: argparse.Namespace) -> Any:
    """Load ``--model``; a model that cannot be loaded or has no tokenizer is :class:`BadInput`."""
    from minterp_tl.models import load_model

    try:
        model = load_model(args.model, progress=not args.no_progress)  # progress=False hides every bar
    except (ValueError, ImportError) as err:
        raise BadInput(str(err).splitlines()[0]) from None
    if model.tokenizer is None:
        raise BadInput(f"model {args.model!r} has no tokenizer; cannot read a text prompt")
    return model


def checked(option: str, value: Callable[[], Any]) -> Any:
    """``value()``, with a ``ValueError`` turned into :class:`BadInput` naming ``option``."""
    try:
        return value()
    except ValueError as err:
        raise BadInput(f"{option}: {str(err).splitlines()[0]}") from None


def single_token(model: Any, text: str, option: str) -> int:
    """The id of ``text`` if it is exactly one token, else :class:`BadInput`."""
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        raise BadInput(
            f"{option} {text!r} is {len(ids)} tokens {pieces}, not one; give a single token, e.g. ' Mary'"
        )
    return int(ids[0])


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from minterp_tl.models import model_info

    check_common(args, "info")
    out = out_path(args.out, "--out", ".png") if args.out else None
    start = time.perf_counter()
    model = load_text_model(args)
    load_s = time.perf_counter() - start
    tokens_in = prompt_tokens(model, args.prompt)
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
        plot_next_tokens(tokens, top.values.tolist(), out, f"{info.name}: next token after {args.prompt!r}")
        print(f"\nbar chart written to {out}")
    return 0


def plot_next_tokens(tokens: Sequence[str], probs: Sequence[float], path: Path, title: str) -> Path:
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


def cmd_lens(args: argparse.Namespace) -> int:
    from minterp_tl.lens import logit_lens

    check_common(args, "lens")
    out = out_path(args.out, "--out", ".png")
    model = load_text_model(args)
    lens = logit_lens(model, prompt_tokens(model, args.prompt))
    answer = args.answer
    if answer is None:
        answer = int(lens.top_k(1, prompt=0, position=-1)[1][-1, 0, 0, 0])  # the model's own top token
    try:
        table = lens.table(position=-1, k=args.top_k, answer=answer)
    except ValueError as err:
        return fail(str(err))
    print(table)
    lens.plot(out)
    print(f"\nheatmap written to {out}")
    return 0


# --------------------------------------------------------------------------------------------
# patch
# --------------------------------------------------------------------------------------------


def strongest(values: Float[Tensor, ...], baseline: float, k: int) -> list[tuple[int, ...]]:
    """Indices (into ``values``) of the ``k`` cells with the largest effect ``|value - baseline|``,
    strongest first."""
    flat = (values.flatten() - baseline).abs()
    order = flat.topk(min(k, flat.numel())).indices.tolist()
    return [tuple(int(i) for i in unravel(j, values.shape)) for j in order]


def unravel(index: int, shape: Sequence[int]) -> list[int]:
    out = []
    for size in reversed(shape):
        index, rest = divmod(index, size)
        out.append(rest)
    return out[::-1]


def cmd_patch(args: argparse.Namespace) -> int:
    import torch

    from minterp_tl.hooks import has_heads, n_heads
    from minterp_tl.names import resolve_name
    from minterp_tl.patching import activation_patch, logit_diff_metric, normalized_metric, plot_heatmap
    from minterp_tl.specs import resolve

    example = f"minterp-tl patch {IOI_CLEAN!r} {IOI_CORRUPTED!r}"
    check_prompt(args.clean, "clean prompt", example)
    check_prompt(args.corrupted, "corrupted prompt", example)
    check_top_k(args.top_k)
    check_spec_option(args.layers, "--layers", "layer")
    check_spec_option(args.positions, "--positions", "position")
    check_spec_option(args.heads, "--heads", "head")
    out = out_path(args.out, "--out", ".png")
    model = load_text_model(args)

    clean_tokens = prompt_tokens(model, args.clean, "clean prompt")
    corrupted_tokens = prompt_tokens(model, args.corrupted, "corrupted prompt")
    n_clean, n_corrupted = clean_tokens.shape[1], corrupted_tokens.shape[1]
    if n_clean != n_corrupted:
        raise BadInput(
            f"the clean and corrupted prompts must have the same number of tokens: the clean prompt has "
            f"{n_clean}, the corrupted one {n_corrupted} (BOS included)"
        )
    clean_str = list(model.to_str_tokens(clean_tokens[0]))
    corrupted_str = list(model.to_str_tokens(corrupted_tokens[0]))
    layers = checked("--layers", lambda: resolve(args.layers, model.cfg.n_layers, what="layer"))
    positions = None
    if args.positions is not None or args.heads is None:
        positions = checked(
            "--positions",
            lambda: resolve(
                "all" if args.positions is None else args.positions,
                n_corrupted,
                tokens=corrupted_str,
                what="position",
            ),
        )
    names = checked("--hook", lambda: [resolve_name(model, args.hook, layer) for layer in layers])
    if args.heads is not None:  # checked here too, so that bad heads fail before any forward pass
        if not has_heads(names[0]):
            raise BadInput(
                f"--heads {args.heads!r} given, but {names[0]} has no head axis; use a hook with one "
                "(z, q, k, v, pattern, attn_scores, result) or leave --heads out"
            )
        checked("--heads", lambda: resolve(args.heads, n_heads(model, names[0]), what="head"))
    answer = single_token(model, args.answer, "--answer") if args.answer is not None else None
    wrong = single_token(model, args.wrong, "--wrong") if args.wrong is not None else None
    if answer is not None and answer == wrong:
        raise BadInput(
            f"--answer and --wrong are the same token {args.answer!r}; give two different single tokens"
        )

    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(
            clean_tokens, names_filter=lambda name: name in names
        )
        corrupted_logits = model(corrupted_tokens)
    answer = int(clean_logits[0, -1].argmax()) if answer is None else answer
    wrong = int(corrupted_logits[0, -1].argmax()) if wrong is None else wrong
    answer_str, wrong_str = model.tokenizer.decode([answer]), model.tokenizer.decode([wrong])
    if answer == wrong:
        raise BadInput(
            f"--answer and --wrong are the same token {answer_str!r}, so the logit difference is 0 on every "
            "run; give two different single tokens"
        )
    metric = logit_diff_metric(answer, wrong)
    clean_value, corrupted_value = float(metric(clean_logits)), float(metric(corrupted_logits))
    if args.normalize:
        try:
            metric = normalized_metric(metric, clean_logits, corrupted_logits)
        except ValueError as err:
            raise BadInput(str(err).splitlines()[0]) from None

    start = time.perf_counter()
    try:
        sweep = activation_patch(
            model,
            corrupted_tokens,
            clean_cache,
            metric,
            args.hook,
            layers=layers,
            positions=positions,
            heads=args.heads,
            progress=not args.no_progress,
        )
    except ValueError as err:  # a head spec out of range, heads for a hook without a head axis, ...
        raise BadInput(str(err).splitlines()[0]) from None
    seconds = time.perf_counter() - start

    grid = " x ".join(
        f"{len(axis)} {name}s"
        for name, axis in (("layer", sweep.layers), ("position", sweep.positions), ("head", sweep.heads))
        if axis is not None
    )
    label = "recovered fraction" if args.normalize else "logit difference"
    print(
        f"clean        {args.clean!r} ({n_clean} tokens), "
        f"predicts {model.tokenizer.decode([int(clean_logits[0, -1].argmax())])!r}"
    )
    print(
        f"corrupted    {args.corrupted!r}, "
        f"predicts {model.tokenizer.decode([int(corrupted_logits[0, -1].argmax())])!r}"
    )
    print(
        f"metric       logit({answer_str!r}) - logit({wrong_str!r}) at the last position: "
        f"clean {clean_value:.4f}, corrupted {corrupted_value:.4f}"
        + ("; normalised: (patched - corrupted) / (clean - corrupted)" if args.normalize else "")
    )
    print(f"sweep        {sweep.hook}: {grid} = {sweep.values.numel()} patches in {seconds:.2f} s")
    baseline = 0.0 if args.normalize else corrupted_value  # the value of a patch that changes nothing
    ranked = (
        "by |value|; 0 = as corrupted"
        if args.normalize
        else f"by the change from the corrupted run's {baseline:.4f}"
    )
    print(f"\nstrongest cells ({label}, {ranked}):")
    head_col = sweep.heads is not None
    pos_col = sweep.positions is not None
    sweep_positions, sweep_heads = sweep.positions or [], sweep.heads or []  # [] where an axis is absent
    print(
        f"{'rank':>4}  {'layer':>5}"
        + (f"  {'pos':>4}  {'token (clean/corrupted)':<26}" if pos_col else "")
        + (f"  {'head':>4}" if head_col else "")
        + f"  {'value':>9}"
    )
    for rank, cell in enumerate(strongest(sweep.values, baseline, args.top_k), start=1):
        row = f"{rank:>4}  {sweep.layers[cell[0]]:>5}"
        if pos_col:
            p = sweep_positions[cell[1]]
            token = (
                repr(clean_str[p])
                if clean_str[p] == corrupted_str[p]
                else f"{clean_str[p]!r}/{corrupted_str[p]!r}"
            )
            row += f"  {p:>4}  {token:<26}"
        if head_col:
            row += f"  {sweep_heads[cell[-1]]:>4}"
        print(row + f"  {float(sweep.values[cell]):>9.4f}")

    # normalised values are centred on 0 (= the corrupted run) with a diverging map; raw logit
    # differences are not centred on 0, so they get a sequential map
    title = f"patching {sweep.hook}: {label} ({answer_str!r} vs {wrong_str!r})"
    rows = [str(layer) for layer in sweep.layers]
    if sweep.values.ndim == 2 and sweep.positions is not None:
        cols = [f"{p} {corrupted_str[p]!r}" for p in sweep.positions]
    elif sweep.values.ndim == 2:
        cols = [f"h{h}" for h in sweep_heads]
    else:  # layer x position x head: one column per (position, head)
        cols = [f"{p} {corrupted_str[p]!r} h{h}" for p in sweep_positions for h in sweep_heads]
    xlabels: dict[tuple[str, ...], str] = {("layer", "pos"): "position", ("layer", "head"): "head"}
    xlabel = xlabels.get(sweep.axis_names, "position, head")
    plot_heatmap(
        sweep.values.flatten(1),
        out,
        row_labels=rows,
        col_labels=cols,
        xlabel=xlabel,
        title=title,
        center=args.normalize,
    )
    print(f"\nheatmap written to {out}")
    return 0


# --------------------------------------------------------------------------------------------
# routes
# --------------------------------------------------------------------------------------------


def cmd_routes(args: argparse.Namespace) -> int:
    import torch

    from minterp_tl.routes import build_graph, paths_to_prediction, plot_routes, save_json, strongest_paths
    from minterp_tl.transparent import TransformerLensTransparentLlm

    check_common(args, "routes")
    if not 0.0 <= args.threshold < 1.0:
        return fail(f"--threshold must be in [0, 1), got {args.threshold}")
    out = out_path(args.out, "--out", ".png")
    json_path = out_path(args.json, "--json", ".json") if args.json else None
    model = load_text_model(args)
    prompt_tokens(model, args.prompt)
    llm = TransformerLensTransparentLlm(model)
    start = time.perf_counter()
    llm.run([args.prompt])
    n = llm.n_tokens(0)
    if not -n <= args.token < n:
        return fail(f"--token {args.token} is out of range: the prompt has {n} tokens (valid: {-n}..{n - 1})")
    graph = build_graph(
        llm, 0, threshold=args.threshold, progress=not args.no_progress, distance_norm=args.distance_norm
    )
    seconds = time.perf_counter() - start
    token = args.token % n
    tokens = graph.graph["tokens"]
    predicted = int(llm.logits()[0, token].argmax())
    paths = strongest_paths(graph, token=token, k=args.top_k)
    kept = paths_to_prediction(graph, token=token)
    print(f"prompt       {args.prompt!r} ({n} tokens)")
    print(
        f"position     {token} ({tokens[token]!r}), "
        f"predicts {llm.tokens_to_strings(torch.tensor([predicted]))[0]!r}"
    )
    print(
        f"graph        {graph.number_of_edges()} edges (tau = {args.threshold:g}); "
        f"{kept.number_of_edges()} lead to the prediction; built in {seconds:.2f} s"
    )
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


def cmd_serve(args: argparse.Namespace) -> int:
    from minterp_tl.explorer import Explorer
    from minterp_tl.explorer.server import App, make_server

    if not 0 <= args.port <= 65535:
        return fail(f"--port must be in 0..65535, got {args.port}")
    model = load_text_model(args)
    try:
        httpd = make_server(App(Explorer(model), name=args.model), args.host, args.port)
    except OSError as err:
        return fail(f"cannot listen on {args.host}:{args.port}: {err.strerror or err}")
    host, port = str(httpd.server_address[0]), int(httpd.server_address[1])
    print(f"minterp_tl explorer on http://{host}:{port}/ (model {args.model}); Ctrl-C stops it", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


def cmd_circuit(args: argparse.Namespace) -> int:
    if args.model not in CIRCUIT_MODELS:
        raise BadInput(
            f"circuit --model must be one of {', '.join(CIRCUIT_MODELS)} (trained induction models), "
            f"got {args.model!r}"
        )
    if not math.isfinite(args.lam) or args.lam < 0:
        raise BadInput(f"--lambda must be a finite number >= 0, got {args.lam}")
    if args.steps < CIRCUIT_EPOCHS:
        raise BadInput(f"--steps must be >= {CIRCUIT_EPOCHS} (one per temperature epoch), got {args.steps}")
    if args.length < 2:
        raise BadInput(f"--length must be >= 2, got {args.length}")
    if not 0 <= args.seed < 2**63:
        raise BadInput(f"--seed must be in 0..2**63-1, got {args.seed}")
    out = out_path(args.out, "--out", ".png")

    import torch

    from minterp_tl.circuits import CircuitConfig, find_subnetwork
    from minterp_tl.models import (
        induction_report,
        repeated_random_tokens,
        second_half_loss,
        train_induction_model,
    )

    torch.set_num_threads(1)  # a tiny model: a second thread only adds contention
    head_dropout = CIRCUIT_MODELS[args.model]
    model = train_induction_model(2, head_dropout=head_dropout, progress=not args.no_progress)
    max_length = (model.cfg.n_ctx - 1) // 2
    if args.length > max_length:
        raise BadInput(
            f"--length must be in 2..{max_length} (the model's context is {model.cfg.n_ctx}), "
            f"got {args.length}"
        )
    d_vocab = model.cfg.d_vocab - 1  # the last id is BOS
    gen = torch.Generator().manual_seed(args.seed)  # checked before the model was loaded
    train = [repeated_random_tokens(48, length, d_vocab, gen) for length in CIRCUIT_TRAIN_LENGTHS]
    test = repeated_random_tokens(
        CIRCUIT_EVAL_SEQUENCES, args.length, d_vocab, torch.Generator().manual_seed(CIRCUIT_EVAL_SEED)
    )
    report = induction_report(model, args.length)
    with torch.no_grad():
        full = float(second_half_loss(model(test), test))

    hparams = dict(ablation="none", mask_unit="head", mask_bias=False, mask_init_value=2.0)
    config = CircuitConfig("continuous_sparsification", hparams, ("attn.W_O",), l0_lambda=args.lam)
    start = time.perf_counter()
    circuit, _ = find_subnetwork(
        model,
        config,
        train,
        second_half_loss,
        steps=args.steps,
        epochs=CIRCUIT_EPOCHS,
        lr=0.1,
        progress=not args.no_progress,
    )
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
    print(
        f"model        {args.model}: {model.cfg.n_layers} layers x {model.cfg.n_heads} heads, attention only"
        + (f", trained with head dropout {head_dropout:g}" if head_dropout else "")
    )
    print(
        f"masks        continuous sparsification on attn.W_O heads, init 2.0, lambda {args.lam:g}, "
        f"{args.steps} steps, {CIRCUIT_EPOCHS} epochs, lr 0.1, seed {args.seed}; trained in {seconds:.1f} s"
    )
    print(f"kept         {len(heads)} of {n_heads} heads")
    print(f"\nkept heads (attention scores at repeat length {args.length}):")
    print(f"{'head':<6} {'prev-token':>10} {'induction':>10}")
    for layer, head in heads:
        print(
            f"{f'L{layer}H{head}':<6} {float(report.prev_token_scores[layer, head]):>10.3f} "
            f"{float(report.induction_scores[layer, head]):>10.3f}"
        )
    if not heads:
        print("  none: the penalty removed every head; try a smaller --lambda")
    print(
        f"\nsecond-half loss at repeat length {args.length} ({CIRCUIT_EVAL_SEQUENCES} held-out sequences; "
        f"chance = ln {d_vocab} = {math.log(d_vocab):.3f}):"
    )
    print(f"{'full model':<32} {full:.4f}")
    print(f"{f'subnetwork ({len(heads)} heads)':<32} {kept:.4f}")
    print(f"{'subnetwork zero-ablated':<32} {removed:.4f}")
    if random_losses:
        print(f"{f'random {len(heads)} heads (mean of 8)':<32} {sum(random_losses) / len(random_losses):.4f}")
    print(f"\nmask PNG written to {out}")
    return 0


__all__ = [
    "IOI_CLEAN",
    "IOI_CORRUPTED",
    "CIRCUIT_MODELS",
    "CIRCUIT_TRAIN_LENGTHS",
    "CIRCUIT_EPOCHS",
    "CIRCUIT_EVAL_SEQUENCES",
    "CIRCUIT_EVAL_SEED",
    "MAX_TOP_K",
    "BadInput",
    "fail",
    "check_prompt",
    "check_top_k",
    "check_common",
    "out_path",
    "prompt_tokens",
    "check_spec_option",
    "load_text_model",
    "checked",
    "single_token",
    "cmd_info",
    "plot_next_tokens",
    "cmd_lens",
    "strongest",
    "unravel",
    "cmd_patch",
    "cmd_routes",
    "cmd_serve",
    "cmd_circuit",
]
