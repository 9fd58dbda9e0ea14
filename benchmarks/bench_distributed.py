"""Sweeps over ranks: 1 process x 2 threads against ``torchrun --nproc_per_node 2`` x 1 thread, SmolLM2.

The same sweeps both ways, on the IOI pair (clean "When Mary and John went to the store, John gave a
drink to", corrupted "..., Mary gave a drink to"; logit difference " Mary" - " John"):
``get_act_patch_resid_pre`` (every layer x position) and ``get_act_patch_attn_head_out_by_pos`` (every
layer x position x head). Each configuration runs in a fresh process (the model loaded, one warm-up
sweep, then the timed sweep, started together on every rank); the two alternate ``--repeats`` times and
the table gives medians. Columns: seconds with one process (2 threads) and with two ranks (1 thread
each; wall time of the sweep on rank 0, gather included), the speed-up (one / two), the balance (the
slowest rank's time in forward passes over the mean of the ranks'), and the largest difference between
the two results.

``--estimate`` prints instead the worked estimate for a 7B model (Llama-2-7B's shape) on 8 GPUs, one
replica per GPU: the engine's own planner (:func:`minterp_tl._patch_engine._plan`, the chunks and their
modelled cost in sequence-forwards) on a head x position sweep of 8 IOI-like prompts of 20 tokens that
differ at position 10, priced at an assumed rate (``--tflops`` achieved per GPU, bf16, 2 FLOPs per
parameter per token).

Run: ``.venv/bin/python benchmarks/bench_distributed.py [--repeats 3]`` or ``... --estimate``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
SWEEPS = ("get_act_patch_resid_pre", "get_act_patch_attn_head_out_by_pos")


def worker(out: Path) -> None:
    """One configuration: load SmolLM2, warm up, time each sweep; rank 0 writes the results."""
    from minterp_tl import _patch_engine, distributed, load_model, patching
    from minterp_tl.metrics import logit_diff_metric

    world = distributed.world()
    busy = [0.0]
    plain = _patch_engine._forward

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return plain(*args, **kwargs)
        finally:
            busy[0] += time.perf_counter() - start

    _patch_engine._forward = timed  # type: ignore[assignment]
    model = load_model(progress=False)
    clean, corrupted = model.to_tokens(CLEAN), model.to_tokens(CORRUPTED)
    metric = logit_diff_metric(model.to_single_token(" Mary"), model.to_single_token(" John"))
    _, cache = model.run_with_cache(clean)
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "ranks": world.size}
    for name in SWEEPS:
        sweep = getattr(patching, name)
        sweep(model, corrupted, cache, metric, progress=False)  # warm-up
        world.exchange(lambda: None)  # start together
        busy[0] = 0.0
        start = time.perf_counter()
        values = sweep(model, corrupted, cache, metric, progress=False)
        seconds = time.perf_counter() - start
        busy_all = world.exchange(lambda: busy[0])
        results[name] = {"seconds": seconds, "busy": busy_all, "values": values.flatten().tolist()}
    if world.main:
        out.write_text(json.dumps(results))


def run(config: str, out: Path) -> dict[str, Any]:
    """Run one configuration (``"one"``: 1 process x 2 threads; ``"two"``: torchrun x 2, 1 thread each)."""
    script = [str(Path(__file__).resolve()), "--worker", str(out)]
    if config == "one":
        cmd = [sys.executable, *script]
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
    else:
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        cmd = [sys.executable, *launch, *script]
        env = {"GLOO_SOCKET_IFNAME": "lo", **os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


CASES = ((8, 20, 10), (64, 64, 32), (32, 128, 0))
"""Estimated sweeps: (prompts, tokens, first position where clean and corrupted differ)."""


def estimate(tflops: float, gpus: int) -> None:
    """The 7B-on-``gpus`` estimate from the engine's planner (see the module docstring)."""
    from types import SimpleNamespace

    from minterp_tl._patch_engine import Patch, _plan
    from minterp_tl.fast_path import FastPathStatus

    cfg = SimpleNamespace(n_layers=32, d_model=4096, n_heads=32, d_mlp=11008, d_vocab=32000, device="cuda")
    n_params, weights = 6.74e9, 2 * 6.74e9  # bf16
    budget = int((80e9 - weights) / 4)  # a quarter of what the weights leave on an 80 GB GPU
    print(f"7B (Llama-2-7B shape: 32 layers x 32 heads) on {gpus} x 80 GB GPUs, one replica per GPU")
    print(
        f"memory per rank: weights {weights / 1e9:.1f} GB (bf16) + a forward budget of {budget / 1e9:.1f} GB"
    )
    print(f"rate: {tflops:g} TFLOP/s achieved per GPU (2 FLOPs per parameter per token)\n")
    head = [
        "prompts x tokens (differ from)",
        "patches (TL loop)",
        "with forwards",
        "forwards",
        "sequence-forwards",
    ]
    print("| " + " | ".join([*head, "per rank /s", "1 GPU", f"{gpus} GPUs"]) + " |")
    print("|---" * (len(head) + 3) + "|")
    for batch, n_pos, changed in CASES:
        patches, first = [], {}
        for layer in range(cfg.n_layers):
            for pos in range(changed, n_pos):  # earlier positions change nothing: no forward
                for h in range(cfg.n_heads):
                    first[len(patches)] = pos
                    patches.append(Patch("z", lambda a, i, c: a, (layer, pos, h), torch.empty(0), layer))
        status = FastPathStatus(True, True, True, "")
        sizes = dict(max_batch=None, memory_budget=budget)
        todo = list(range(len(patches)))
        chunks, costs = _plan(SimpleNamespace(cfg=cfg), todo, patches, first, status, sizes, batch, n_pos)
        per_second = tflops * 1e12 / (2 * n_params * n_pos)  # full sequence-forwards per second per GPU
        ranks = [0.0] * gpus
        for cost in sorted(costs, reverse=True):  # as World.share deals them
            ranks[ranks.index(min(ranks))] += cost
        cells = [
            f"{batch} x {n_pos} ({changed})",
            f"{cfg.n_layers * n_pos * cfg.n_heads:,}",
            f"{len(patches):,}",
        ]
        cells += [
            f"{len(chunks):,}",
            f"{sum(costs):,.0f} (TL: {cfg.n_layers * n_pos * cfg.n_heads * batch:,})",
        ]
        cells += [
            f"{per_second:,.0f}",
            _duration(sum(costs) / per_second),
            _duration(max(ranks) / per_second),
        ]
        print("| " + " | ".join(cells) + " |")


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--estimate", action="store_true")
    parser.add_argument("--tflops", type=float, default=400.0)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.estimate:
        estimate(args.tflops, args.gpus)
        return
    if args.worker is not None:
        worker(args.worker)
        return
    runs: dict[str, list[dict[str, Any]]] = {"one": [], "two": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for config in ("one", "two") if r % 2 == 0 else ("two", "one"):
                runs[config].append(run(config, Path(tmp) / f"{config}{r}.json"))
                print(f"run {r + 1}/{args.repeats} {config}: done", file=sys.stderr)
    print(f"SmolLM2-135M, IOI pair ({torch.get_num_threads()} threads here), medians of {args.repeats} runs")
    head = ["sweep", "patches", "1 proc x 2 threads (s)", "2 procs x 1 thread (s)", "speed-up", "balance"]
    print("| " + " | ".join([*head, "max diff"]) + " |")
    print("|---|---|---|---|---|---|---|")
    for name in SWEEPS:
        one = statistics.median(r[name]["seconds"] for r in runs["one"])
        two = statistics.median(r[name]["seconds"] for r in runs["two"])
        busy = [r[name]["busy"] for r in runs["two"]]
        balance = statistics.median(max(b) / statistics.mean(b) for b in busy)
        a = torch.tensor(runs["one"][0][name]["values"])
        b = torch.tensor(runs["two"][0][name]["values"])
        diff = float((a - b).abs().max())
        cells = [f"`{name}`", str(a.numel()), f"{one:.2f}", f"{two:.2f}", f"{one / two:.2f}x"]
        print("| " + " | ".join([*cells, f"{balance:.2f}", f"{diff:.1e}"]) + " |")


if __name__ == "__main__":
    main()
