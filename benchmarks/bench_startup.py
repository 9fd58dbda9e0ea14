"""Start-up time of the ``minterp-tl`` command line, each run a new process.

Rows:

- ``--help``: ``minterp-tl --help`` (no torch, no model; median of ``--repeats`` runs);
- ``lens, first run``: ``minterp-tl lens "The capital of France is" --out <tmp>/lens.png`` with an empty
  model cache (``MINTERP_TL_CACHE`` is a new temporary folder): SmolLM2 is de-quantised from its GGUF file
  and its weights are written to the cache;
- ``lens, second run``: the same command again, the cache warm (median of ``--repeats`` runs).

Wall time is what a user waits; CPU time (user + system of the child) is steadier on a shared machine.
With ``--breakdown`` a warm run is also timed from inside (imports, the cache read, the bridge boot, the
logit lens forward, the plot), to show where the time goes.

Run: ``.venv/bin/python benchmarks/bench_startup.py [--repeats 3] [--breakdown] [--cache DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

PROMPT = "The capital of France is"

# Timed inside one warm process: what ``minterp-tl lens`` does, with a clock around each stage.
_BREAKDOWN = r"""
import json, sys, time
start = time.perf_counter()
rows = []
def mark(label, since):
    now = time.perf_counter()
    rows.append((label, now - since))
    return now
t = start
import torch
t = mark("import torch", t)
import transformers, transformers.modeling_utils
import transformer_lens.model_bridge
t = mark("import transformers + transformer_lens", t)
import minterp_tl.cli, minterp_tl.lens, minterp_tl.models as models
t = mark("import minterp_tl (cli, lens, models, ...)", t)
timed = {}
def clock(label, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timed[label] = timed.get(label, 0.0) + time.perf_counter() - t0
    return wrapper
models.load_entry = clock("cache", models.load_entry)
bridge = models.TransformerBridge
bridge.boot_transformers = staticmethod(clock("boot", bridge.boot_transformers))
model = models.load_model(progress=False)
load = time.perf_counter() - t
rows.append(("load_model: read cache, tokenizer, HF model", timed["cache"]))
rows.append(("load_model: bridge boot (weights hashed meanwhile)", timed["boot"]))
rows.append(("load_model: the rest (wait for the hash, ...)", load - timed["cache"] - timed["boot"]))
t = time.perf_counter()
from minterp_tl._checks import text_tokens
lens = minterp_tl.lens.logit_lens(model, text_tokens(model, sys.argv[1], "prompt"))
t = mark("logit lens (tokenize + forward + unembed)", t)
answer = int(lens.top_k(1, prompt=0, position=-1)[1][-1, 0, 0, 0])
table = str(lens.table(position=-1, k=5, answer=answer))
t = mark("table", t)
lens.plot(sys.argv[2])
t = mark("plot (matplotlib import + PNG)", t)
print(json.dumps({"rows": rows, "total": time.perf_counter() - start}))
"""


@dataclass(frozen=True)
class Timing:
    """One process: wall seconds and the child's CPU seconds (user + system)."""

    wall: float
    cpu: float


def _run(command: list[str], env: dict[str, str]) -> tuple[Timing, str]:
    """Run ``command`` to the end; its timing and its stdout (a failure exits with its stderr)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)!r} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Timing(wall, cpu), done.stdout


def _median(timings: list[Timing]) -> Timing:
    return Timing(statistics.median(t.wall for t in timings), statistics.median(t.cpu for t in timings))


def _script() -> str:
    """The ``minterp-tl`` console script beside this interpreter (else the one on ``PATH``)."""
    here = Path(sys.executable).parent / "minterp-tl"
    found = str(here) if here.exists() else shutil.which("minterp-tl")
    if found is None:
        sys.exit("minterp-tl not found: install the package (pip install -e .) into this environment")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of --help and of the warm lens")
    parser.add_argument("--breakdown", action="store_true", help="also time the stages of a warm run")
    parser.add_argument("--cache", default=None, help="model cache folder, must be empty (default: temp)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    cache = Path(args.cache) if args.cache else work / "cache"
    if cache.exists() and any(cache.iterdir()):
        sys.exit(f"--cache {str(cache)!r} is not empty: the first run needs an empty model cache")
    env = {**os.environ, "MINTERP_TL_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cli = _script()
    lens = [cli, "lens", PROMPT, "--out", str(work / "lens.png")]
    try:
        help_runs = [_run([cli, "--help"], env)[0] for _ in range(args.repeats)]
        first, _ = _run(lens, env)
        warm = [_run(lens, env)[0] for _ in range(args.repeats)]
        breakdown: Optional[dict] = None
        if args.breakdown:
            code = [sys.executable, "-c", _BREAKDOWN, PROMPT, str(work / "breakdown.png")]
            timing, out = _run(code, env)
            breakdown = {**json.loads(out.strip().splitlines()[-1]), "process": timing.wall}
    finally:
        shutil.rmtree(work, ignore_errors=True)  # with the cache, unless --cache named another folder

    second = _median(warm)
    print(f"{'command':<34} {'wall s':>8} {'CPU s':>8}")
    print("-" * 52)
    rows = [
        ("minterp-tl --help", _median(help_runs)),
        ("lens, first run (empty cache)", first),
        ("lens, second run (warm cache)", second),
    ]
    for label, t in rows:
        print(f"{label:<34} {t.wall:>8.2f} {t.cpu:>8.2f}")
    print(f"{'first / second':<34} {first.wall / second.wall:>7.1f}x {first.cpu / second.cpu:>7.1f}x")
    walls = [round(t.wall, 1) for t in warm]
    print(f"(second run: median of {args.repeats} runs, wall {walls}; each run a new process)")
    if breakdown is not None:
        print(f"\nwarm run, timed inside the process (wall s; the process took {breakdown['process']:.2f} s)")
        for label, seconds in breakdown["rows"]:
            print(f"  {label:<52} {seconds:>6.2f}")
        start_up = breakdown["process"] - breakdown["total"]
        print(f"  {'interpreter start-up and exit':<52} {start_up:>6.2f}")


if __name__ == "__main__":
    main()
