"""Latency of the explorer (``minterp-tl serve``): a scripted session over HTTP on SmolLM2-135M.

After the model is loaded, the explorer's local server is started on a free port and a script plays what a
person does: a new prompt ("The capital of France is": the run, the graph at the default threshold and the
logit-lens table, the three requests the page sends for a prompt), then clicks: the graph at other
thresholds and with the L2 norm, representations, attention edges, FFN blocks, neurons, heads, a patching
sweep against "The capital of Italy is" (a new corrupted prompt: a prompt, not a click) and patched cells'
lenses. Each is timed from request to parsed
JSON answer (the browser's drawing is not included). The session is repeated ``--repeats`` times, each with
a fresh prompt cache (a new prompt each time: the last word alternates), and the table gives the median
and the worst over all of them, against the targets (a click under 0.5 s, a new prompt under 3 s).

Run: ``.venv/bin/python benchmarks/bench_explorer.py [--repeats 5]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.request
from collections.abc import Callable
from urllib.parse import urlencode

import torch

from minterp_tl.explorer import Explorer
from minterp_tl.explorer.server import App, make_server
from minterp_tl.models import load_model


def _client(base: str) -> Callable[..., float]:
    def call(action: str, post: bool = False, **params: object) -> float:
        start = time.perf_counter()
        if post:
            data = json.dumps(params).encode()
            request = urllib.request.Request(f"{base}/api/{action}", data=data, method="POST")
        else:
            request = urllib.request.Request(f"{base}/api/{action}?{urlencode(params)}")
        with urllib.request.urlopen(request, timeout=120) as response:
            json.loads(response.read())
        return time.perf_counter() - start

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_model("smollm2-135m", progress=False)
    httpd = make_server(App(Explorer(model), name="smollm2-135m"))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    call = _client(f"http://127.0.0.1:{httpd.server_address[1]}")
    prompts = ["The capital of France is", "The capital of France was"]
    call("run", post=True, prompt=prompts[1])  # warm-up (first-call costs of torch and the tokenizer)
    prompt_times: list[float] = []
    patch_times: list[float] = []  # a new corrupted prompt: a layer x position sweep (180 patches)
    clicks: dict[str, list[float]] = {}
    for r in range(args.repeats):
        prompt = prompts[r % 2]
        corrupted = prompt.replace("France", "Italy")
        prompt_times.append(
            call("run", post=True, prompt=prompt) + call("graph", threshold=0.04) + call("lens")
        )
        patch_times.append(call("patch", post=True, corrupted=corrupted))
        session = [
            ("graph, threshold 0.1", lambda: call("graph", threshold=0.1)),
            ("graph, threshold 0.02", lambda: call("graph", threshold=0.02)),
            ("graph, L2", lambda: call("graph", threshold=0.04, distance_norm=2)),
            ("representation", lambda: call("representation", layer=29, pos=5)),
            ("representation", lambda: call("representation", layer=10, pos=3)),
            ("attention edge", lambda: call("edge", layer=23, target=5, source=4)),
            ("attention edge", lambda: call("edge", layer=5, target=5, source=0)),
            ("FFN block", lambda: call("ffn", layer=29, pos=5)),
            ("neuron", lambda: call("neuron", layer=29, neuron=676)),
            ("head", lambda: call("head", layer=23, pos=5, head=4)),
            ("patched cell", lambda: call("patched_lens", corrupted=corrupted, layer=0, pos=4)),
            ("patched cell", lambda: call("patched_lens", corrupted=corrupted, layer=20, pos=4)),
        ]
        for name, click in session:
            clicks.setdefault(name, []).append(click())
    httpd.shutdown()
    every = [t for times in clicks.values() for t in times]
    print(f"SmolLM2-135M, {args.repeats} sessions, 2 threads; seconds from request to parsed answer\n")
    print("| request | n | median (s) | worst (s) | target |")
    print("|---|---|---|---|---|")
    rows = [("new prompt (run + graph + lens)", prompt_times, 3.0)]
    rows += [("new corrupted prompt (patching sweep, 30 x 6)", patch_times, 3.0)]
    rows += [(name, times, 0.5) for name, times in clicks.items()]
    rows += [("every click", every, 0.5)]
    for name, times, target in rows:
        ok = "met" if max(times) < target else "missed"
        median, worst = statistics.median(times), max(times)
        print(f"| {name} | {len(times)} | {median:.3f} | {worst:.3f} | < {target} s: {ok} |")


if __name__ == "__main__":
    main()
