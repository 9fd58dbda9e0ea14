"""minterp_tl.patching against transformer_lens.patching, side by side in one process.

Sweeps: ``resid_pre`` layer x pos and attention-head output (z) by position, on a 4-layer toy and on
SmolLM2-135M (a 15-token IOI prompt against two corruptions: one that differs at token 10, where
every patch before it leaves the corrupted run unchanged and runs no forward, and one that differs from
token 2 on, where nearly every patch runs). For each: time of TransformerLens's function and of ours,
their ratio, max |difference| of the results, which starts of the fast path were on
(:func:`minterp_tl.patching.fast_path_status`), and "x of the limit": our time against the time of the work
a patch can change, measured in the same run. A patch at layer ``l`` and position ``p`` can change only the
layers ``>= l`` at the positions ``>= p`` (causality), and nothing at all when the clean activation equals
the corrupted one there; the limit is the sum over patches of that fraction of ``n_layers x n_pos``, in
plain batched forwards (``model(tokens.repeat(...))`` at 64 sequences, timed just before and just after
our run, as the machine's speed drifts). SmolLM2 runs with one
prompt per patched copy (batch 1) and with eight IOI pairs at once (batch 8, other names).

TransformerLens runs one forward per index; where that would take too long (``--tl-rows``), it runs a
random sample of the index rows through TL's own ``generic_activation_patch`` with ``index_df`` and
its full time is extrapolated from the rate (the row says so). The max |difference| is over the
rows both ran.

Run: ``.venv/bin/python benchmarks/bench_patching.py [--tl-rows 160] [--skip-smollm2]``
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformer_lens import patching as tl

from minterp_tl import patching
from minterp_tl.models import load_model, toy_model

TEMPLATE = "When {a} and {b} went to the store, {c} gave a drink to"
CORRUPTIONS = {
    # the usual IOI corruption: the prompts differ at the second name only (token 10 of 15), so
    # patches at tokens 0-9 leave the corrupted run unchanged and run no forward (skip_unchanged)
    "IOI@10": lambda a, b: TEMPLATE.format(a=a, b=b, c=a),
    # names swapped everywhere: the prompts differ from token 2 on, so almost every patch runs
    "swap@2": lambda a, b: TEMPLATE.format(a=b, b=a, c=a),
}
NAMES = [
    ("Mary", "John"),
    ("Anna", "Tom"),
    ("Sarah", "David"),
    ("Emma", "James"),
    ("Lucy", "Paul"),
    ("Kate", "Mark"),
    ("Alice", "Bob"),
    ("Laura", "Peter"),
]


@dataclass
class Row:
    model: str
    case: str
    sweep: str
    patches: int
    tl: float
    ours: float
    limit: float
    rate: float
    diff: float
    path: str
    note: str


def _plain_rate(model, tokens: torch.Tensor, sequences: int = 64) -> float:
    """Plain forwards per second (sequences of ``tokens``'s length) at ``sequences`` in one batch."""
    big = tokens[:1].repeat(sequences, 1)
    with torch.no_grad():
        model(big)
        t0 = time.perf_counter()
        model(big)
    return sequences / (time.perf_counter() - t0)


def _limit(model, clean, corrupted, act: str, axes, shape, rate: float) -> float:
    """Seconds of plain batched forwards for the work the patches can change (see the module docstring)."""
    n_layers, n_pos = int(model.cfg.n_layers), int(corrupted.shape[1])
    names = [
        f"blocks.{layer}.{'hook_resid_pre' if act == 'resid_pre' else 'attn.hook_' + act}"
        for layer in range(n_layers)
    ]
    with torch.no_grad():
        _, a = model.run_with_cache(clean, names_filter=lambda n: n in names)
        _, b = model.run_with_cache(corrupted, names_filter=lambda n: n in names)
    work = 0.0
    for cell in itertools.product(*[range(n) for n in shape]):
        layer, pos = cell[0], cell[1]
        index = (slice(None), pos) + ((cell[2],) if len(cell) > 2 else ())
        if not torch.equal(a[names[layer]][index], b[names[layer]][index]):
            work += (n_layers - layer) / n_layers * (n_pos - pos) / n_pos
    return work * corrupted.shape[0] / rate


def _bench(model_label, case, model, clean, corrupted, metric, spec, tl_rows) -> Row:
    sweep, setter, act, axes = spec
    _, cache = model.run_with_cache(clean)
    ours_fn = getattr(patching, sweep)
    before = _plain_rate(model, corrupted)
    t0 = time.perf_counter()
    ours = ours_fn(model, corrupted, cache, metric, progress=False)
    t_ours = time.perf_counter() - t0
    rate = 2 / (1 / before + 1 / _plain_rate(model, corrupted))  # the machine's speed around our run
    n = ours.numel()
    status = patching.fast_path_status(model)
    parts = [("layers", "layers"), ("per_layer", "joins"), ("positions", "positions")]
    path = "+".join(label for part, label in parts if getattr(status, part)) or "off"
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
        note = "*"
        idx = tuple(torch.tensor(df[a].values) for a in axes)
        diff = float((ours[idx] - ref).abs().max())
    limit = _limit(model, clean, corrupted, act, axes, tuple(ours.shape), rate)
    return Row(
        model_label, case, sweep.replace("get_act_patch_", ""), n, t_tl, t_ours, limit, rate, diff, path, note
    )


SWEEPS = [
    ("get_act_patch_resid_pre", tl.layer_pos_patch_setter, "resid_pre", ("layer", "pos")),
    (
        "get_act_patch_attn_head_out_by_pos",
        tl.layer_pos_head_vector_patch_setter,
        "z",
        ("layer", "pos", "head"),
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tl-rows", type=int, default=160, help="most TL forwards per sweep before sampling")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--batches", default="1,8", help="SmolLM2 prompts per patched copy (default: 1,8)")
    args = parser.parse_args()

    rows: list[Row] = []
    toy = toy_model("ln")
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 50, (1, 16), generator=gen)
    corrupted = clean.clone()
    corrupted[0, 3] = (clean[0, 3] + 1) % 50
    target = toy(clean)[0, -1].argmax()
    metric = patching.logit_diff_metric(target, (target + 1) % 50)
    for spec in SWEEPS:
        rows.append(_bench("toy-4L", "token 3 of 16", toy, clean, corrupted, metric, spec, args.tl_rows))
    if not args.skip_smollm2:
        model = load_model(progress=False)
        for batch in (int(b) for b in args.batches.split(",")):
            pairs = NAMES[:batch]
            clean = model.to_tokens([TEMPLATE.format(a=a, b=b, c=b) for a, b in pairs])
            answers = [model.to_single_token(f" {a}") for a, _ in pairs]
            wrong = [model.to_single_token(f" {b}") for _, b in pairs]
            metric = patching.logit_diff_metric(answers, wrong)
            for case, corrupt in CORRUPTIONS.items():
                corrupted = model.to_tokens([corrupt(a, b) for a, b in pairs])
                assert corrupted.shape == clean.shape, "every name must be one token"
                for spec in SWEEPS:
                    case_label = f"{case} x{batch}"
                    row = _bench("SmolLM2", case_label, model, clean, corrupted, metric, spec, args.tl_rows)
                    rows.append(row)

    from importlib.metadata import version

    print(
        f"{torch.get_num_threads()} threads; times in s; torch {torch.__version__}, transformer-lens "
        f"{version('transformer-lens')}, transformers {version('transformers')}; plain seq/s: the plain "
        "batched rate measured just before and after our run (the limit's rate); * = TL time extrapolated "
        "from a sample of rows"
    )
    header = [
        "model",
        "case",
        "sweep",
        "patches",
        "TL (s)",
        "ours (s)",
        "x TL",
        "plain seq/s",
        "limit (s)",
        "x of the limit",
        "max abs diff",
        "fast path",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [
            r.model,
            r.case,
            r.sweep,
            str(r.patches),
            f"{r.tl:.1f}{r.note}",
            f"{r.ours:.2f}",
            f"{r.tl / r.ours:.1f}",
            f"{r.rate:.1f}",
            f"{r.limit:.2f}",
            f"{r.ours / max(r.limit, 1e-9):.2f}",
            f"{r.diff:.1e}",
            r.path,
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
