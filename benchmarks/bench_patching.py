"""minterp_tl.patching against transformer_lens.patching, side by side in one process.

Sweeps: ``resid_pre`` layer x pos and attention-head output (z) by position, on a 4-layer toy and on
SmolLM2-135M (a 15-token IOI prompt against two corruptions: one that differs at token 10, where
every patch before it leaves the corrupted run unchanged and runs no forward, and one that differs from
token 2 on, where nearly every patch runs). For each: time of TransformerLens's function and of ours,
their ratio, max |difference| of the results, which starts of the fast path were on
(:func:`minterp_tl.patching.fast_path_status`), and throughput in patched forwards per second, next to
plain batched forwards per second (``model(tokens.repeat(64, 1))``), the ceiling for any method that
runs full forward passes.

TransformerLens runs one forward per index; where that would take too long (``--tl-rows``), it runs a
random sample of the index rows through TL's own ``generic_activation_patch`` with ``index_df`` and
its full time is extrapolated from the rate (the row says so). The max |difference| is over the
rows both ran.

Run: ``.venv/bin/python benchmarks/bench_patching.py [--tl-rows 160] [--skip-smollm2]``
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformer_lens import patching as tl

from minterp_tl import patching
from minterp_tl.models import load_model, toy_model

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = {
    # the usual IOI corruption: the prompts differ at the second name only (token 10 of 15), so
    # patches at tokens 0-9 leave the corrupted run unchanged and run no forward (skip_unchanged)
    "IOI@10": "When Mary and John went to the store, Mary gave a drink to",
    # names swapped everywhere: the prompts differ from token 2 on, so almost every patch runs
    "swap@2": "When John and Mary went to the store, Mary gave a drink to",
}


def _plain_rate(model, tokens: torch.Tensor, batch: int = 64) -> float:
    """Plain forwards per second at ``batch`` copies of ``tokens``."""
    big = tokens.repeat(batch // tokens.shape[0], 1)
    with torch.no_grad():
        model(big)
        t0 = time.perf_counter()
        model(big)
    return big.shape[0] / (time.perf_counter() - t0)


def _bench(label, model, clean, corrupted, metric, sweep: str, setter, act, axes, tl_rows: int):
    _, cache = model.run_with_cache(clean)
    ours_fn = getattr(patching, sweep)
    t0 = time.perf_counter()
    ours = ours_fn(model, corrupted, cache, metric, progress=False)
    t_ours = time.perf_counter() - t0
    n = ours.numel()
    status = patching.fast_path_status(model)
    path = "+".join(part for part in ("layers", "positions") if getattr(status, part)) or "off"

    if n <= tl_rows:
        t0 = time.perf_counter()
        ref = getattr(tl, sweep)(model, corrupted, cache, metric)
        t_tl, note = time.perf_counter() - t0, ""
        diff = float((ours - ref).abs().max())
    else:
        df = tl.make_df_from_ranges(list(ours.shape), list(axes)).sample(tl_rows, random_state=0)
        t0 = time.perf_counter()
        ref = tl.generic_activation_patch(model, corrupted, cache, metric, setter, act, index_df=df)
        t_tl = (time.perf_counter() - t0) * n / tl_rows
        note = f" (TL: {tl_rows} of {n} rows, extrapolated)"
        idx = tuple(torch.tensor(df[a].values) for a in axes)
        diff = float((ours[idx] - ref).abs().max())
    return (
        f"{label:<10}{sweep.replace('get_act_patch_', ''):<24}{n:>7}{t_tl:>10.1f}{t_ours:>9.1f}"
        f"{t_tl / t_ours:>8.1f}{diff:>10.1e}{n / t_tl:>9.1f}{n / t_ours:>9.1f}  {path:<17}"
    ), note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tl-rows", type=int, default=160, help="most TL forwards per sweep before sampling")
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()

    rows = []
    toy = toy_model("ln")
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50, (1, 16), generator=gen)
    corrupted = clean.clone()
    corrupted[0, 3] = (clean[0, 3] + 1) % 50
    target = toy(clean)[0, -1].argmax()
    metric = patching.logit_diff_metric(target, (target + 1) % 50)
    rows.append(
        (
            toy,
            clean,
            "toy-4L",
            [
                _bench(
                    "toy-4L",
                    toy,
                    clean,
                    corrupted,
                    metric,
                    "get_act_patch_resid_pre",
                    tl.layer_pos_patch_setter,
                    "resid_pre",
                    ("layer", "pos"),
                    args.tl_rows,
                ),
                _bench(
                    "toy-4L",
                    toy,
                    clean,
                    corrupted,
                    metric,
                    "get_act_patch_attn_head_out_by_pos",
                    tl.layer_pos_head_vector_patch_setter,
                    "z",
                    ("layer", "pos", "head"),
                    args.tl_rows,
                ),
            ],
        )
    )
    if not args.skip_smollm2:
        model = load_model(progress=False)
        clean = model.to_tokens(CLEAN)
        metric = patching.logit_diff_metric(model.to_single_token(" Mary"), model.to_single_token(" John"))
        lines = []
        for label, prompt in CORRUPTED.items():
            corrupted = model.to_tokens(prompt)
            lines += [
                _bench(
                    label,
                    model,
                    clean,
                    corrupted,
                    metric,
                    "get_act_patch_resid_pre",
                    tl.layer_pos_patch_setter,
                    "resid_pre",
                    ("layer", "pos"),
                    args.tl_rows,
                ),
                _bench(
                    label,
                    model,
                    clean,
                    corrupted,
                    metric,
                    "get_act_patch_attn_head_out_by_pos",
                    tl.layer_pos_head_vector_patch_setter,
                    "z",
                    ("layer", "pos", "head"),
                    args.tl_rows,
                ),
            ]
        rows.append((model, clean, "SmolLM2", lines))

    from importlib.metadata import version

    print(
        f"{torch.get_num_threads()} threads; times in s; rates in patched forwards/s; "
        f"torch {torch.__version__}, "
        f"transformer-lens {version('transformer-lens')}, transformers {version('transformers')}"
    )
    print(
        f"{'model':<10}{'sweep':<24}{'patches':>7}{'TL':>10}{'ours':>9}{'x TL':>8}{'max|d|':>10}"
        f"{'TL/s':>9}{'ours/s':>9}  {'fast path':<17}"
    )
    for model, tokens, label, lines in rows:
        for line, note in lines:
            print(line + note)
        print(
            f"{label:<10}{'plain batched forward':<24}{'':>7}{'':>10}{'':>9}{'':>8}{'':>10}{'':>9}"
            f"{_plain_rate(model, tokens):>9.1f}   <- ceiling (batch 64, {tokens.shape[1]} tokens)"
        )


if __name__ == "__main__":
    main()
