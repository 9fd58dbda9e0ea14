"""Exact edge (direct-path) patching: minterp_tl.patching against transformer_lens.patching in one process.

SmolLM2-135M on the IOI pair (clean "When Mary and John went to the store, John gave a drink to", corrupted
"..., Mary gave a drink to"; logit difference " Mary" - " John"). Rows: the paths from one head
(layer 24, head 3) into every later head's query, both libraries in full (same values); and every path
of the model (all 270 source heads into every later query), ours in full and TransformerLens's time
extrapolated from its rate on the one-source row (one forward per edge).

A second table times ``minterp_tl.edges``: EAP-IG scores of every edge (``edge_attribution``, per
position) for each ``--ig-steps`` k, against ``k + 1`` plain forward+backward passes of the corrupted
prompt (the gradient of the metric with respect to the embeddings, one pass after another, no parameter
gradients), the ratio being ours / reference; and exact edge patching (``edges.patch.edge_patch``,
denoising, ``per_position=False``) of the same 45 paths as the one-source row, one edge per set, against
TransformerLens's direct-path loop (its time from the first table), compared value by value.

Run: ``.venv/bin/python benchmarks/bench_edges.py [--skip-all-sources] [--ig-steps 1 5 10]``
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import Tensor
from transformer_lens import patching as tl

from minterp_tl import patching
from minterp_tl.edges import Node, edge_attribution
from minterp_tl.edges.patch import edge_patch
from minterp_tl.models import load_model


def forward_backward(model: Any, tokens: Tensor, metric: Callable[[Tensor], Tensor]) -> None:
    """One plain forward and backward pass: the metric's gradient with respect to the embeddings (the
    residual stream entering block 0), so no parameter ``.grad`` buffer is filled."""
    leaf: list[Tensor] = []

    def embed(act: Tensor, hook: Any) -> Tensor:
        leaf.append(act.detach().requires_grad_(True))
        return leaf[-1]

    with torch.enable_grad(), model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", embed)]):
        value = metric(model(tokens))
        torch.autograd.grad(value, leaf[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-all-sources", action="store_true")
    parser.add_argument("--ig-steps", type=int, nargs="+", default=[1, 5, 10], metavar="K")
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

    # minterp_tl.edges: EAP-IG against k + 1 plain forward+backward passes (after one untimed pass).
    edge_rows: list[tuple[str, float, float, str]] = []
    forward_backward(model, corrupted, metric)
    for k in args.ig_steps:
        t0 = time.perf_counter()
        scores = edge_attribution(model, clean, corrupted, metric, ig_steps=k)
        t_eap = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(k + 1):
            forward_backward(model, corrupted, metric)
        t_passes = time.perf_counter() - t0
        label = f"{scores.method} ig_steps={k}: {scores.graph.n_edges:,} edges scored vs {k + 1} fwd+bwd"
        edge_rows.append((label, t_eap, t_passes, "-"))

    # Exact edge patching of the one-source paths, one edge per set, against TL's direct-path loop.
    dst = [(layer, head) for layer in range(src[0] + 1, n_layers) for head in range(n_heads)]
    writer = Node("attn_head_out", None, *src)
    sets = [[(writer, Node("q_input", None, layer, head))] for layer, head in dst]
    t0 = time.perf_counter()
    patched = edge_patch(model, clean, corrupted, sets, metric, direction="denoising", per_position=False)
    t_patch = time.perf_counter() - t0
    expected = torch.stack([ref[layer, head] for layer, head in dst]).cpu()
    patch_diff = float((patched - expected).abs().max())
    label = f"edge_patch {src} -> {len(sets)} later queries vs TL loop"
    edge_rows.append((label, t_patch, t_tl, f"{patch_diff:.1e}"))

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
    print()
    print(
        "minterp_tl.edges; ratio = ours / reference (below 1: ours is faster); reference: k + 1 plain "
        "forward+backward passes one after another (EAP-IG), TL's direct-path loop (edge_patch, its time "
        "from the table above); max abs diff: against TL"
    )
    print("| what | ours (s) | reference (s) | ratio | max abs diff |")
    print("|---|---|---|---|---|")
    for label, our_time, ref_time, diff_text in edge_rows:
        ratio = f"{our_time / ref_time:.2f}"
        if diff_text != "-":
            ratio += f" ({ref_time / our_time:.1f}x faster)"
        print(f"| {label} | {our_time:.2f} | {ref_time:.2f} | {ratio} | {diff_text} |")


if __name__ == "__main__":
    main()
