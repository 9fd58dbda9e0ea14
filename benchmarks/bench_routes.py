"""Cost of the information-flow graph against one forward pass and a full run_with_cache with per-head
results.

For SmolLM2-135M on one prompt of 16, 32 and 64 tokens, each configuration is timed:

- ``forward``: ``model(tokens)``, one forward pass (the unit of the ratios);
- ``graph``: everything the routes need -- :meth:`TransformerLensTransparentLlm.run` (one forward
  through the ModelWrapper that saves only the hooks the accessors need) plus
  :func:`minterp_tl.routes.build_graph` (contributions layer by layer, thresholding, the
  ``networkx`` graph) at the default threshold 0.04;
- ``cache+result``: what the LLM Transparency Tool's TransformerLens wrapper does before it starts:
  ``run_with_cache`` of every hook with ``set_use_attn_result(True)`` (per-head results
  ``[batch, pos, heads, d_model]`` at every layer). This is only the caching, not a graph.

Time: median of ``--repeats`` runs, interleaved so that machine noise hits every row alike (this is
a shared 2-core machine: look at the ratios, which are measured side by side).

Memory: peak memory above the loaded model, in a fresh subprocess per configuration and length:
after a warm-up run, ``malloc_trim`` and a reset of the kernel's peak-RSS counter
(``/proc/self/clear_refs``), peak RSS (``VmHWM``) minus RSS before the run. ``tracemalloc`` would not
see torch's CPU allocations; RSS sees everything (allocator caching included, so small rows are
noisy at the MiB level). ``max decomposition`` is exact: the most floats of attention decomposition
the graph held at once (recorded by wrapping ``decomposed_attn_rows``), against one layer's
``pos x pos x heads x d_model``.

Run: ``.venv/bin/python benchmarks/bench_routes.py [--lengths 16 32 64] [--repeats 5] [--no-memory]``
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from minterp_tl.models import load_model
from minterp_tl.routes import build_graph
from minterp_tl.transparent import TransformerLensTransparentLlm

CONFIGS = ["forward", "graph", "cache+result"]
TEXT = (
    "The capital of France is Paris, and the capital of Germany is Berlin. The capital of Italy is Rome, "
    "the capital of Spain is Madrid, and the capital of Portugal is Lisbon, a city by the sea with old "
    "trams, steep streets and many small cafes where people sit for hours and talk about the weather."
)


def _tokens(model: Any, n: int) -> torch.Tensor:
    tokens = model.to_tokens(TEXT)
    if tokens.shape[1] < n:
        raise ValueError(
            f"the benchmark text has {tokens.shape[1]} tokens; --lengths must be <= that, got {n}"
        )
    return tokens[:, :n]


def _runner(model: Any, tokens: torch.Tensor, config: str) -> Callable[[], Any]:
    if config == "forward":
        return lambda: model(tokens)
    if config == "cache+result":

        def cache_with_results() -> Any:
            model.set_use_attn_result(True)
            try:
                return model.run_with_cache(tokens)
            finally:
                model.set_use_attn_result(False)

        return cache_with_results
    llm = TransformerLensTransparentLlm(model)

    def graph() -> Any:
        llm.run(tokens)
        return build_graph(llm, 0, progress=False)

    return graph


def _rss(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux)."""
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1)) * 1024


def measure_peak(config: str, n: int) -> dict:
    """Run in a child process: peak RSS of ``config`` above what is held before it (bytes)."""
    model = load_model(progress=False)
    tokens = _tokens(model, n)
    run = _runner(model, tokens, config)
    with torch.no_grad():
        run()  # warm-up
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _rss("VmRSS")
        run()
        peak = _rss("VmHWM")
    return {"peak": peak - base}


def max_decomposition(model: Any, tokens: torch.Tensor) -> int:
    """The most floats of attention decomposition :func:`build_graph` holds at once."""
    llm = TransformerLensTransparentLlm(model)
    llm.run(tokens)
    sizes: list[int] = []
    rows = llm.decomposed_attn_rows

    def spy(*args: Any) -> torch.Tensor:
        out = rows(*args)
        sizes.append(out.numel())
        return out

    llm.decomposed_attn_rows = spy  # type: ignore[method-assign]
    build_graph(llm, 0, progress=False)
    return max(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-config subprocesses")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_peak(args.child, args.n)))
        return

    model = load_model(progress=False)
    cfg = model.cfg
    rows = []
    for n in args.lengths:
        tokens = _tokens(model, n)
        runners = {c: _runner(model, tokens, c) for c in CONFIGS}
        times: dict[str, list[float]] = {c: [] for c in CONFIGS}
        with torch.no_grad():
            for c in CONFIGS:
                runners[c]()  # warm-up
            for _ in range(args.repeats):
                for c in CONFIGS:
                    t0 = time.perf_counter()
                    runners[c]()
                    times[c].append(time.perf_counter() - t0)
        peaks: dict[str, int] = {}
        if not args.no_memory:
            for c in CONFIGS:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", c, "--n", str(n)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                peaks[c] = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
        one_layer = n * n * cfg.n_heads * cfg.d_model
        held = max_decomposition(model, tokens)
        rows.append((n, {c: statistics.median(times[c]) for c in CONFIGS}, peaks, held, one_layer))

    print(
        f"SmolLM2-135M, 1 prompt, cpu, {torch.get_num_threads()} threads, median of {args.repeats} "
        f"(interleaved); peak = VmHWM above the loaded model in a fresh process"
    )
    header = f"{'tokens':>6} {'config':<13}{'time (s)':>9}{'x fwd':>7}"
    header += f"{'peak (MiB)':>11}{'x fwd':>7}" if not args.no_memory else ""
    print(header)
    for n, t, peaks, held, one_layer in rows:
        for c in CONFIGS:
            line = f"{n:>6} {c:<13}{t[c]:>9.3f}{t[c] / t['forward']:>7.2f}"
            if peaks:
                line += f"{peaks[c] / 2**20:>11.1f}{peaks[c] / max(peaks['forward'], 1):>7.2f}"
            print(line)
        print(
            f"{n:>6} max decomposition held: {held:,} floats = {held / one_layer:.2f} of one layer "
            f"({one_layer:,}); all {cfg.n_layers} layers would be {cfg.n_layers * one_layer:,}"
        )


if __name__ == "__main__":
    main()
