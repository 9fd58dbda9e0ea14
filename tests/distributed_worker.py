"""The job ``tests/test_distributed.py`` launches with ``torchrun --nproc_per_node 2``: the same sweeps a
single process runs (:func:`sweeps`), each rank's results saved to ``OUT/rank{r}.pt``.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 distributed_worker.py MODE OUT
[FOLDER [NAME=FOLDER ...]]`` where MODE is ``sweeps`` (the toy model, SmolLM2, with FOLDER the 2-layer HF
model there loaded over two devices, and each further family's model), ``raise`` (rank 1's metric
raises) or ``hang`` (rank 1 never reaches the sweep).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from minterp_tl import _patch_engine, distributed, load_model, toy_model
from minterp_tl.attribution import attribution_patch
from minterp_tl.edges import edge_attribution, edge_patch
from minterp_tl.metrics import logit_diff_metric
from minterp_tl.patching import get_act_patch_attn_head_out_all_pos, get_act_patch_resid_pre
from minterp_tl.sweeps import activation_patch

SPREAD = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}
"""A ``device_map`` for the 2-layer Llama test model: block 1 offloaded to disk, the rest on the CPU."""

IOI = [
    ("When Mary and John went to the store, John gave a drink to", " Mary", " John"),
    ("When Tom and Anna went to the park, Anna gave a ball to", " Tom", " Anna"),
]


def toy_inputs(model: Any, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Random clean prompts of 6 tokens, corrupted at position 2, and a logit-difference metric."""
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, 6), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 2] = (corrupted[:, 2] + 11) % model.cfg.d_vocab
    return clean, corrupted, logit_diff_metric(3, 7)


def smollm2_inputs(model: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Two IOI prompts (corrupted: the other name repeated) and the mean logit difference."""
    clean = model.to_tokens([p for p, _, _ in IOI])
    corrupted = model.to_tokens([p.replace(f"{w.strip()} gave", f"{a.strip()} gave") for p, a, w in IOI])
    answers = [model.to_single_token(a) for _, a, _ in IOI]
    wrongs = [model.to_single_token(w) for _, _, w in IOI]
    return clean, corrupted, logit_diff_metric(answers, wrongs)


def sweeps(model: Any, clean: torch.Tensor, corrupted: torch.Tensor, metric: Any, small: bool) -> dict:
    """The layer x position, head and attribution sweeps (and on a small model, edge scores and edge
    patching), as a dict of tensors."""
    _, cache = model.run_with_cache(clean)
    out: dict[str, Any] = {}
    if small:  # two copies per forward, so there are chunks to share
        out["resid_pre"] = get_act_patch_resid_pre(model, corrupted, cache, metric, max_batch=4)
        out["heads"] = get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metric, max_batch=4)
        out["eap_ig"] = edge_attribution(model, clean, corrupted, metric, ig_steps=5, max_batch=6).scores
        sets = [[0], [1, 2], [3], list(range(0, 40, 3)), [5, 9], [], list(range(20))]
        out["edge_patch"] = edge_patch(model, clean, corrupted, sets, metric, max_batch=4)
        out["eap"] = edge_attribution(model, clean, corrupted, metric).scores  # one step: rank 1 has none
        one = attribution_patch(model, clean[:1], corrupted[:1], metric, "z", positions=None, heads="all")
        out["attribution_one_prompt"] = one.values  # rank 1 has no prompt
        clean3, corrupted3, _ = toy_inputs(model, batch=3)
        out["attribution_three_prompts"] = attribution_patch(model, clean3, corrupted3, metric).values
    else:
        # 4 copies per forward: enough chunks to share as they are (the head sweep's are cut finer)
        sweep = activation_patch(model, corrupted, cache, metric, layers="-6:", progress=False, max_batch=8)
        out["resid_pre"] = sweep.values
        out["heads"] = activation_patch(
            model, corrupted, cache, metric, "z", layers="-6:", positions=None, heads="all", progress=False
        ).values
    attribution = attribution_patch(model, cache, corrupted, metric, "resid_pre")
    out["attribution"] = attribution.values
    out["attribution_metric"] = torch.tensor(attribution.corrupted_metric)
    return out


def main(mode: str, out: Path, folder: str = "", *families: str) -> None:
    world = distributed.world()
    forwards = [0]
    plain_forward = _patch_engine._forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        forwards[0] += 1
        return plain_forward(*args, **kwargs)

    _patch_engine._forward = counted  # type: ignore[assignment]
    results: dict[str, Any] = {"world": (world.rank, world.size)}
    if mode == "sweeps":
        toy = toy_model("gqa")
        results["toy"] = sweeps(toy, *toy_inputs(toy), small=True)
        results["toy_forwards"] = forwards[0]
        smollm2 = load_model(progress=False)
        start = time.perf_counter()
        results["smollm2"] = sweeps(smollm2, *smollm2_inputs(smollm2), small=False)
        results["smollm2_seconds"] = time.perf_counter() - start
        results["smollm2_forwards"] = forwards[0] - results["toy_forwards"]
        if folder:  # one replica over two devices (the CPU and disk offload) per rank
            offload = str(out / f"offload{world.rank}")
            model = load_model(folder, progress=False, device_map=SPREAD, offload_folder=offload)
            results["n_devices"] = model.cfg.n_devices
            results["spread"] = sweeps(model, *toy_inputs(model), small=False)
        for family in families:  # "name=folder": a 2-layer HF model of another family
            name, path = family.split("=", 1)
            model = load_model(path, progress=False)
            results[f"family:{name}"] = sweeps(model, *toy_inputs(model), small=False)
    elif mode in ("raise", "hang"):
        toy = toy_model("gqa")
        clean, corrupted, metric = toy_inputs(toy)

        def failing(logits: torch.Tensor) -> torch.Tensor:
            if world.rank == 1:
                raise ValueError("metric failed on purpose on rank 1")
            return metric(logits)

        if mode == "hang" and world.rank == 1:
            time.sleep(600)
        _, cache = toy.run_with_cache(clean)
        get_act_patch_resid_pre(toy, corrupted, cache, failing if mode == "raise" else metric)
    torch.save(results, out / f"rank{world.rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), *sys.argv[3:])
