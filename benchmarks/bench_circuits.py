"""Learned head masks on the trained induction model, against an exhaustive search; mask overhead on SmolLM2.

Part 1 (induction). The 2-layer x 4-head attention-only induction model (``train_induction_model(2)``)
is masked with continuous-sparsification head masks on ``attn.W_O`` (= scaling ``hook_z`` per head).
For several L0 weights ``lambda`` :func:`find_subnetwork` trains a "keep" mask (minimise the
second-half loss + lambda * L0); a "break" mask is trained under ``zero_ablate`` to maximise the loss
of the model without the selected heads + lambda * L0. Every subnetwork is scored on held-out
sequences (L = 11) and compared with the best subset of the same size, found by trying all 256 head
subsets (other heads zeroed at ``hook_z`` with TransformerLens hooks), and with random subsets of the
same size (``randomly_sampled``, 16 samples). A PNG plots every subset's loss against its size with
the learned masks on top.

Part 2 (overhead). SmolLM2-135M forward time with masks on every attention and MLP weight (weight
units) and with head masks on every ``W_O``, against the plain model (median of interleaved runs).

Run: ``.venv/bin/python benchmarks/bench_circuits.py [--out benchmarks/circuits_frontier.png] [--no-smollm2]``
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from minterp_tl._files import save_png
from minterp_tl.circuits import CircuitConfig, CircuitModel, find_subnetwork
from minterp_tl.models import (
    induction_report,
    load_model,
    repeated_random_tokens,
    second_half_loss,
    train_induction_model,
)


def all_subsets(model, test: torch.Tensor, chunk: int = 16) -> dict[tuple, float]:
    """Loss of every subset of heads (the others zeroed at hook_z), ``chunk`` subsets per forward."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    heads = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    subsets = [s for k in range(len(heads) + 1) for s in itertools.combinations(heads, k)]
    b = test.shape[0]
    out: dict[tuple, float] = {}
    with torch.no_grad():
        for start in range(0, len(subsets), chunk):
            part = subsets[start : start + chunk]
            mask = torch.zeros(len(part), n_layers, n_heads)
            for i, keep in enumerate(part):
                for l, h in keep:
                    mask[i, l, h] = 1.0
            mask = mask.repeat_interleave(b, dim=0)

            def hook(z, hook, mask=mask):
                return z * mask[:, int(hook.name.split(".")[1])][:, None, :, None]

            logits = model.run_with_hooks(
                test.repeat(len(part), 1), fwd_hooks=[(lambda n: n.endswith("attn.hook_z"), hook)]
            )
            for i, keep in enumerate(part):
                out[keep] = float(second_half_loss(logits[i * b : (i + 1) * b], test))
    return out


def train_mask(
    model, train, lam: float, variant: str, method: str = "continuous_sparsification", seed: int = 0
):
    keep = variant == "keep"
    if method == "continuous_sparsification":
        hp = dict(
            ablation="none" if keep else "zero_ablate",
            mask_unit="head",
            mask_bias=False,
            mask_init_value=2.0 if keep else -2.0,
        )
    else:
        hp = dict(
            ablation="none" if keep else "zero_ablate",
            mask_unit="head",
            mask_bias=False,
            mask_init_percentage=0.9 if keep else 0.1,
        )
    cfg = CircuitConfig(method, hp, ("attn.W_O",), l0_lambda=lam)
    start = time.perf_counter()
    circuit, history = find_subnetwork(
        model,
        cfg,
        train,
        second_half_loss,
        steps=80,
        epochs=8,
        lr=0.1,
        maximize=not keep,
        seed=seed,
        progress=False,
    )
    return circuit, history, time.perf_counter() - start


def induction_part(out_png: str) -> None:
    model = train_induction_model(2, progress=False)
    report = induction_report(model, 11)
    gen = torch.Generator().manual_seed(1)
    train = [repeated_random_tokens(48, L, 64, gen) for L in (8, 10, 12, 14, 17, 19, 22, 24)]
    test = repeated_random_tokens(128, 11, 64, torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = float(second_half_loss(model(test), test))
    start = time.perf_counter()
    subsets = all_subsets(model, test)
    brute_s = time.perf_counter() - start
    best = {}
    for keep, loss in subsets.items():
        if len(keep) not in best or loss < best[len(keep)][0]:
            best[len(keep)] = (loss, keep)

    print(
        f"induction model: full second-half loss {full:.3f} (L=11, 128 sequences); "
        f"chance ln 64 = {math.log(64):.3f}"
    )
    print(
        f"prev-token head {report.best_prev_token_head()} "
        f"(score {float(report.prev_token_scores.max()):.2f}); "
        f"induction scores layer 1: {[round(float(x), 2) for x in report.induction_scores[1]]}"
    )
    print(f"exhaustive search: {len(subsets)} subsets in {brute_s:.1f} s; best per size:")
    print("| heads kept | best loss | best subset |")
    print("|---|---|---|")
    for k in sorted(best):
        print(f"| {k} | {best[k][0]:.3f} | {list(best[k][1])} |")

    print("\nlearned masks (continuous sparsification unless marked; 80 AdamW steps, T 1 -> 200):")
    print(
        "| variant | lambda | heads selected | n | loss with mask | best of size n "
        "| random same size (mean of 16) | train s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    points = []
    runs = [("keep", lam, "continuous_sparsification") for lam in (0.01, 0.05, 0.2, 0.6, 1.0)]
    runs += [
        ("keep", 0.05, "hard_concrete"),
        ("break", 0.5, "continuous_sparsification"),
        ("break", 0.5, "hard_concrete"),
    ]
    for variant, lam, method in runs:
        circuit, history, seconds = train_mask(model, train, lam, variant, method)
        with torch.no_grad():
            heads = circuit.kept_heads()
            loss = float(second_half_loss(circuit(test), test))
            randoms = []
            for i in range(16):
                circuit.set_ablate_mode(
                    "randomly_sampled", force_resample=True, seed=i, remove=variant == "break"
                )
                randoms.append(float(second_half_loss(circuit(test), test)))
            extra = ""
            if variant == "keep":
                circuit.set_ablate_mode("zero_ablate")
                extra = f" (zero_ablate: {float(second_half_loss(circuit(test), test)):.3f})"
        circuit.detach()
        n = len(heads)
        ref = best[n][0] if variant == "keep" else max(v for k, v in subsets.items() if len(k) == 8 - n)
        tag = "" if method == "continuous_sparsification" else " (HC)"
        print(
            f"| {variant}{tag} | {lam} | {heads} | {n} | {loss:.3f}{extra} | "
            f"{ref:.3f}{' (worst removal)' if variant == 'break' else ''} | "
            f"{statistics.mean(randoms):.3f} | {seconds:.1f} |"
        )
        if variant == "keep" and method == "continuous_sparsification":
            points.append((n, loss, lam))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(
        [len(k) for k in subsets],
        list(subsets.values()),
        s=8,
        alpha=0.4,
        color="grey",
        label="every head subset",
    )
    ax.plot(
        sorted(best), [best[k][0] for k in sorted(best)], color="k", lw=1, label="best subset of each size"
    )
    ax.scatter(
        [p[0] for p in points], [p[1] for p in points], color="C3", zorder=3, label="learned masks (keep)"
    )
    labels: dict[tuple[int, float], list[str]] = {}
    for n, loss, lam in points:
        labels.setdefault((n, round(loss, 3)), []).append(str(lam))
    for (n, loss), lams in labels.items():
        ax.annotate(
            f"lambda={', '.join(lams)}", (n, loss), textcoords="offset points", xytext=(5, 5), fontsize=7
        )
    ax.axhline(1.1 * full, color="C0", ls=":", label="1.1 x full model")
    ax.set_xlabel("heads kept (of 8)")
    ax.set_ylabel("second-half loss (L=11)")
    ax.set_title("induction model: head subsets vs learned masks")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, out_png)
    print(f"\nplot: {out_png}")


def overhead_part(repeats: int) -> None:
    model = load_model("smollm2-135m", progress=False)
    tokens = torch.randint(100, model.cfg.d_vocab, (4, 32), generator=torch.Generator().manual_seed(0))
    configs = {
        "weight masks, all attn + mlp": CircuitConfig(
            mask_hparams=dict(ablation="none", mask_unit="weight", mask_bias=False, mask_init_value=1.0),
            target_layers=("all",),
        ),
        "head masks, all W_O": CircuitConfig(
            mask_hparams=dict(ablation="none", mask_unit="head", mask_bias=False, mask_init_value=1.0),
            target_layers=("attn.W_O",),
        ),
    }
    times: dict[str, list[float]] = {"plain": [], **{k: [] for k in configs}}
    with torch.no_grad():
        model(tokens)
        for _ in range(repeats):
            for name in times:
                if name == "plain":
                    start = time.perf_counter()
                    model(tokens)
                else:
                    with CircuitModel(configs[name], model) as circuit:
                        circuit.eval()
                        start = time.perf_counter()
                        circuit(tokens)
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["plain"])
    print(
        f"\nSmolLM2-135M forward, batch 4 x 32 tokens, {torch.get_num_threads()} threads, "
        f"median of {repeats}:"
    )
    print("| configuration | seconds | vs plain |")
    print("|---|---|---|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.3f} | {med / base:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/circuits_frontier.png")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: fastest on the shared 2-core machine)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-smollm2", action="store_true")
    parser.add_argument("--no-induction", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.no_induction:
        induction_part(args.out)
    if not args.no_smollm2:
        overhead_part(args.repeats)


if __name__ == "__main__":
    main()
