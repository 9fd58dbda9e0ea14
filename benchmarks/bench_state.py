"""Cost of saving k hook points with a ModelWrapper phase, against a plain forward and run_with_cache.

For SmolLM2-135M on a batch of prompts, each configuration runs the same forward pass:

- ``plain``: ``model(tokens)``;
- ``save k``: ``ModelWrapper.run`` of a phase that saves ``resid_post`` (every position) at ``k``
  layers -- only those ``k`` hooks are installed;
- ``run_with_cache``: TransformerLens's full cache (every hook point of the model).

Time: median of ``--repeats`` runs, interleaved so that machine noise hits every row alike; the ratio
is against ``plain``. Memory: the bytes each configuration keeps after the run (exact), and the peak
resident memory it adds above a plain forward, measured in a fresh subprocess per configuration
(``ru_maxrss`` after a warm-up plain forward, then after the configuration; on CUDA
``torch.cuda.max_memory_allocated``).

Run: ``.venv/bin/python benchmarks/bench_state.py [--batch 16] [--pos 64] [--repeats 7] [--no-memory]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from minterp_tl.context import RepresentationContext
from minterp_tl.models import load_model
from minterp_tl.state import StateManager
from minterp_tl.wrapper import ModelWrapper

CONFIGS = ["plain", "save 1", "save 4", "save 30", "run_with_cache"]


def _tokens(model, batch: int, pos: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, model.cfg.d_vocab, (batch, pos), generator=gen)
    tokens[:, 0] = model.tokenizer.bos_token_id
    return tokens.to(model.cfg.device)


def _layers(k: int, n: int) -> list[int]:
    return [round(i * (n - 1) / max(k - 1, 1)) for i in range(k)] if k > 1 else [n // 2]


def _runner(model, tokens: torch.Tensor, config: str):
    """A zero-argument function running ``config``; it returns what the configuration keeps."""
    wrapper = ModelWrapper(model)
    if config == "plain":
        return lambda: model(tokens)
    if config == "run_with_cache":
        return lambda: model.run_with_cache(tokens)
    k = int(config.split()[1])
    ctx = RepresentationContext(tokens, layers=_layers(k, model.cfg.n_layers), states=("resid_post",))
    return lambda: wrapper.run(ctx, StateManager())


def _kept_bytes(result) -> int:
    if isinstance(result, torch.Tensor):
        return result.numel() * result.element_size()
    if isinstance(result, tuple):  # (logits, cache)
        return _kept_bytes(result[0]) + sum(_kept_bytes(t) for t in result[1].cache_dict.values())
    return _kept_bytes(result.logits) + sum(_kept_bytes(t) for t in result.saved.values())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_peak(config: str, batch: int, pos: int, device: str) -> dict:
    """Run in a child process: extra peak memory of ``config`` above a plain forward (bytes)."""
    model = load_model(device=device, progress=False)
    tokens = _tokens(model, batch, pos)
    with torch.no_grad():
        model(tokens)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.max_memory_allocated()
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result = _runner(model, tokens, config)()
        kept = _kept_bytes(result)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"extra_peak": max(peak - base, 0), "kept": kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pos", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-config subprocesses")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_peak(args.child, args.batch, args.pos, args.device)))
        return

    torch.set_num_threads(torch.get_num_threads())
    model = load_model(device=args.device, progress=False)
    tokens = _tokens(model, args.batch, args.pos)
    runners = {c: _runner(model, tokens, c) for c in CONFIGS}
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    kept: dict[str, int] = {}
    n_hooks = len({id(h) for h in model.hook_dict.values()})
    with torch.no_grad():
        for c in CONFIGS:  # warm-up
            kept[c] = _kept_bytes(runners[c]())
        for _ in range(args.repeats):
            for c in CONFIGS:
                _sync(args.device)
                t0 = time.perf_counter()
                runners[c]()
                _sync(args.device)
                times[c].append(time.perf_counter() - t0)

    peaks: dict[str, dict] = {}
    if not args.no_memory:
        for c in CONFIGS:
            out = subprocess.run(
                [sys.executable, __file__, "--child", c, "--batch", str(args.batch), "--pos", str(args.pos),
                 "--device", args.device],
                capture_output=True, text=True, check=True,
            )
            peaks[c] = json.loads(out.stdout.strip().splitlines()[-1])

    plain = statistics.median(times["plain"])
    print(f"SmolLM2-135M, batch {args.batch} x {args.pos} tokens, {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}; model has {n_hooks} hook points")
    print(f"{'config':<16}{'time (s)':>10}{'x plain':>9}{'kept (MiB)':>12}{'extra peak (MiB)':>18}")
    for c in CONFIGS:
        t = statistics.median(times[c])
        extra = f"{peaks[c]['extra_peak'] / 2**20:.1f}" if c in peaks else "-"
        print(f"{c:<16}{t:>10.3f}{t / plain:>9.2f}{kept[c] / 2**20:>12.1f}{extra:>18}")


if __name__ == "__main__":
    main()
