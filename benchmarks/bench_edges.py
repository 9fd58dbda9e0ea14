"""Exact edge (direct-path) patching: minterp_tl.patching against transformer_lens.patching in one process.

SmolLM2-135M on the IOI pair (clean "When Mary and John went to the store, John gave a drink to", corrupted
"..., Mary gave a drink to"; logit difference " Mary" - " John"). Rows: the paths from one head
(layer 24, head 3) into every later head's query, both libraries in full (same values); and every path
of the model (all 270 source heads into every later query), ours in full and TransformerLens's time
extrapolated from its rate on the one-source row (one forward per edge).

Run: ``.venv/bin/python benchmarks/bench_edges.py [--skip-all-sources]``
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformer_lens import patching as tl

from minterp_tl import patching
from minterp_tl.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-all-sources", action="store_true")
    args = parser.parse_args()
    model = load_model(progress=False)
    clean = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    corrupted = model.to_tokens("When Mary and John went to the store, Mary gave a drink to")
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
        _, corrupted_cache = model.run_with_cache(corrupted)
    metric = patching.logit_diff_metric(model.to_single_token(" Mary"), model.to_single_token(" John"))
    common = (model, corrupted, clean_cache, corrupted_cache, metric)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    src = (24, 3)

    t0 = time.perf_counter()
    ref = tl.get_act_patch_direct_path(*common, *src, "q", verbose=False)
    t_tl = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = patching.get_act_patch_direct_path(*common, *src, "q", verbose=False)
    t_ours = time.perf_counter() - t0
    edges = (n_layers - src[0] - 1) * n_heads
    rows = [
        ("one source (24, 3) -> later queries", edges, f"{t_tl:.1f}", t_ours, float((ours - ref).abs().max()))
    ]
    if not args.skip_all_sources:
        t0 = time.perf_counter()
        every = patching.get_act_patch_direct_path_all_sources(*common, "q", verbose=False)
        t_every = time.perf_counter() - t0
        all_edges = sum((n_layers - layer - 1) * n_heads * n_heads for layer in range(n_layers))
        same = float((every[src] - ours).abs().max())
        rows.append(
            ("every source -> later queries", all_edges, f"{t_tl / edges * all_edges:.0f}*", t_every, same)
        )

    from importlib.metadata import version

    print(
        f"{torch.get_num_threads()} threads; torch {torch.__version__}, transformer-lens "
        f"{version('transformer-lens')}, transformers {version('transformers')}; * = extrapolated from TL's "
        "rate on the one-source row; max abs diff: against TL (one source) or against our one-source row"
    )
    print("| sweep | edges | TL (s) | ours (s) | x TL | max abs diff |")
    print("|---|---|---|---|---|---|")
    for label, n, tl_time, our_time, diff in rows:
        x = float(tl_time.rstrip("*")) / our_time
        print(f"| {label} | {n:,} | {tl_time} | {our_time:.1f} | {x:.1f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
