"""Cost of saving k hook points with a ModelWrapper phase, against a plain forward and run_with_cache.

For SmolLM2-135M on a batch of prompts, each configuration runs the same forward pass:

- ``plain``: ``model(tokens)``;
- ``save k``: ``ModelWrapper.run`` of a phase that saves ``resid_post`` (every position) at ``k``
  layers -- only those ``k`` hooks are installed;
- ``run_with_cache``: TransformerLens's full cache (every hook point of the model).

Time: median of ``--repeats`` runs, interleaved so that machine noise hits every row alike; the ratio
is against ``plain``. Memory: the bytes each configuration keeps after the run (exact), and its peak
memory above the loaded model, measured in a fresh subprocess per configuration: after a warm-up
plain forward, ``malloc_trim`` and a reset of the kernel's peak-RSS counter (``/proc/self/clear_refs``),
peak RSS (``VmHWM``) minus RSS before the run; on CUDA ``torch.cuda.max_memory_allocated`` minus
the allocated bytes before the run.

Run: ``.venv/bin/python benchmarks/bench_state.py [--batch 16] [--pos 64] [--repeats 7] [--no-memory]``
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
    ctx = RepresentationContext(tokens, layers=_layers(k, model.cfg.n_layers), hooks=("resid_post",))
    return lambda: wrapper.run(ctx, StateManager())


def _kept_bytes(result) -> int:
    """Bytes of the distinct tensor storages a result holds (a cache lists aliases of one hook twice)."""
    if isinstance(result, torch.Tensor):
        tensors = [result]
    elif isinstance(result, tuple):  # (logits, cache)
        tensors = [result[0], *result[1].cache_dict.values()]
    else:
        tensors = [result.logits, *result.saved.values()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux)."""
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1)) * 1024


def measure_peak(config: str, batch: int, pos: int, device: str) -> dict:
    """Run in a child process: peak memory of ``config`` above what is held before it (bytes)."""
    model = load_model(device=device, progress=False)
    tokens = _tokens(model, batch, pos)
    run = _runner(model, tokens, config)
    with torch.no_grad():
        model(tokens)
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            base = _rss("VmRSS")
        result = run()
        kept = _kept_bytes(result)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _rss("VmHWM")
    return {"peak": peak - base, "kept": kept}


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
                [
                    sys.executable,
                    __file__,
                    "--child",
                    c,
                    "--batch",
                    str(args.batch),
                    "--pos",
                    str(args.pos),
                    "--device",
                    args.device,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            peaks[c] = json.loads(out.stdout.strip().splitlines()[-1])

    plain = statistics.median(times["plain"])
    print(
        f"SmolLM2-135M, batch {args.batch} x {args.pos} tokens, {args.device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}; model has {n_hooks} hook points"
    )
    print(f"{'config':<16}{'time (s)':>10}{'x plain':>9}{'kept (MiB)':>12}{'peak (MiB)':>12}{'x plain':>9}")
    for c in CONFIGS:
        t = statistics.median(times[c])
        peak = (
            f"{peaks[c]['peak'] / 2**20:>12.0f}{peaks[c]['peak'] / peaks['plain']['peak']:>9.2f}"
            if peaks
            else ""
        )
        print(f"{c:<16}{t:>10.3f}{t / plain:>9.2f}{kept[c] / 2**20:>12.1f}{peak}")


if __name__ == "__main__":
    main()
