"""Exact edge patching, batched: the metric with chosen sets of edges patched, many sets per forward.

Patching edge ``u -> v`` replaces, in ``v``'s input only, ``u``'s write in this run by ``u``'s write in
the other run (or its mean): ``input[v] += write_other[u] - write_live[u]``. ``write_live`` is the write
in the patched run itself, so an edge set behaves as ACDC's and TransformerLens's ``faithfulness`` do
(a writer downstream of a patched edge carries its changed value along the edges that are not patched).
Each set is one copy of the prompts in the batch; the edges into a reader are one ``"function"``
:class:`~minterp_tl.interventions.Intervention` at the reader's hook, applied by the toolkit's one applier.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Optional

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from minterp_tl import distributed
from minterp_tl._checks import token_ids
from minterp_tl._patch_engine import agreed_budget, check_sizes, copies_per_forward
from minterp_tl.edges._streams import Reader, Streams, open_streams, refuse_unsupported, switches
from minterp_tl.edges.graph import EdgeGraph, graph_for
from minterp_tl.edges.scores import check_pair, scalar
from minterp_tl.interventions import Intervention, hook_functions, resolve_steps

Direction = Literal["noising", "denoising"]
Ablation = Literal["patch", "mean"]


def _live_writes(
    streams: Streams, live: dict[str, Tensor], cols: Tensor
) -> Float[Tensor, "rows pos n_cols d_model"]:
    """The writes of writer ids ``cols`` in the running forward (``live`` holds its writer activations);
    the heads of one block in one product."""
    graph = streams.graph
    per_layer = graph.n_heads + int(graph.has_mlp)
    parts: list[Optional[Tensor]] = [None] * len(cols)
    heads: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for k, w in enumerate(cols.tolist()):
        layer, j = divmod(w - 1, per_layer)
        if w == 0:
            parts[k] = live["blocks.0.hook_resid_pre"]
        elif j < graph.n_heads:
            heads[layer].append((k, j))
        else:
            parts[k] = live[f"blocks.{layer}.hook_mlp_out"]
    for layer, items in heads.items():
        z = live[f"blocks.{layer}.attn.hook_z"]
        writes = streams.head_writes(layer, z, torch.tensor([j for _, j in items]))
        for n, (k, _) in enumerate(items):
            parts[k] = writes[:, :, n]
    return torch.stack(parts, dim=2)  # type: ignore[arg-type]  # every column is filled above


def _reader_hook(
    streams: Streams,
    r: Reader,
    mask: Bool[Tensor, "k pos_or_1 size avail"],
    other: Float[Tensor, "b_or_1 pos writers d_model"],
    live: dict[str, Tensor],
    b: int,
) -> Optional[Callable[..., Tensor]]:
    """The hook adding each copy's patched edges into reader group ``r``; ``None`` if no copy patches it."""
    cols = mask.flatten(0, 2).any(0).nonzero()[:, 0]
    if cols.numel() == 0:
        return None
    k, n_pos = mask.shape[0], other.shape[1]
    weights = mask[..., cols].to(other.dtype).to(other.device).expand(k, n_pos, *mask.shape[2:3], -1)
    replacement = other[:, :, cols.to(other.device)]

    def hook(act: Tensor, hook: Any = None) -> Tensor:
        d = replacement.unsqueeze(0) - _live_writes(streams, live, cols).view(k, b, n_pos, len(cols), -1)
        delta = torch.einsum("kpgc,kbpcd->kbpgd", weights, d).flatten(0, 1)  # [rows, pos, size, d_model]
        if r.source is None:  # a fork: the reader's own input
            return act + (delta if act.ndim == 4 else delta[:, :, 0])
        assert r.f is not None  # verified by open_streams
        x = live[r.source]
        if r.group.kind == "mlp_in":
            return act + r.f(x + delta[:, :, 0]) - r.f(x)
        x = x.unsqueeze(2).expand_as(delta)
        return act + r.f(x + delta) - r.f(x)

    return hook


def _run_sets(
    streams: Streams,
    tokens: Int[Tensor, "batch pos"],
    masks: Bool[Tensor, "k n_edges"],
    other: Float[Tensor, "b_or_1 pos writers d_model"],
) -> Float[Tensor, "rows pos d_vocab"]:
    """One forward of ``k`` copies of ``tokens``, copy ``i`` with the edges of ``masks[i]`` patched."""
    model, graph = streams.model, streams.graph
    b, k = tokens.shape[0], masks.shape[0]
    per_pos = masks.view(k, -1, graph.per_slot)
    live: dict[str, Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(act: Tensor, hook: Any = None) -> None:
            live[name] = act

        return hook

    names = streams.writer_names(graph) + [r.source for r in streams.readers if r.source is not None]
    hooks: list[tuple[str, Callable[..., Any]]] = [(n, keep(n)) for n in dict.fromkeys(names)]
    steps = []
    for r in streams.readers:  # each reader's change is an Intervention, applied by the one applier
        g = r.group
        mask = per_pos[:, :, graph.group_slice(g)].reshape(k, per_pos.shape[1], g.size, g.avail)
        change = _reader_hook(streams, r, mask, other[:, :, : g.avail], live, b)
        if change is not None:
            steps += resolve_steps(model, Intervention(r.hook, "function", fn=change), "edge patch")
    hooks += hook_functions(steps)
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        return model(tokens.repeat(k, 1))


def edge_patch(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    edge_sets: Sequence[Iterable[Any]],
    metric: Callable[[Float[Tensor, "batch pos d_vocab"]], Tensor],
    *,
    direction: Direction = "noising",
    ablation: Ablation = "patch",
    mean_tokens: Optional[Int[Tensor, "n pos"]] = None,
    graph: Optional[EdgeGraph] = None,
    per_position: bool = True,
    max_batch: Optional[int] = None,
    memory_budget: Optional[int] = None,
    progress: bool = False,
) -> Float[Tensor, " n_sets"]:
    """The metric with each set of edges patched (exactly), many sets per forward pass.

    Args:
        model: A ``TransformerBridge`` in eval mode.
        clean_tokens: ``[batch, pos]`` clean prompts.
        corrupted_tokens: ``[batch, pos]`` corrupted prompts, paired row by row.
        edge_sets: Each an iterable of edges of ``graph`` (edge numbers, ``(writer, reader)`` pairs or
            ``(writer, reader, score)`` triples) or a boolean mask over its edges.
        metric: ``[batch, pos, d_vocab]`` logits -> scalar.
        direction: ``"noising"`` (default): the clean run, the set's edges carrying corrupted (or mean)
            writes; ``"denoising"``: the corrupted run, the set's edges carrying clean writes (what edge
            scores estimate, as a change from the corrupted metric).
        ablation: ``"patch"`` (the other run's writes) or ``"mean"`` (noising only: each write's mean over
            ``mean_tokens`` at each position).
        mean_tokens: ``[n, pos]`` prompts the mean is taken over (default: the corrupted prompts).
        graph: The :class:`EdgeGraph` the edges belong to (default: built for this model and length).
        per_position: For the default graph: one edge per position, or one for all positions.
        max_batch: The most sequences in one forward.
        memory_budget: Bytes a forward may use (default: a quarter of the free memory).
        progress: Show a progress bar over the sets.

    Returns:
        ``[n_sets]`` metric values. An empty set gives the metric of the run itself; every edge patched
        gives the other run's metric (to float precision).
    """
    clean, corrupted = check_pair(model, clean_tokens, corrupted_tokens)
    if direction not in ("noising", "denoising"):
        raise ValueError(f"direction must be 'noising' or 'denoising', got {direction!r}")
    if ablation not in ("patch", "mean"):
        raise ValueError(f"ablation must be 'patch' or 'mean', got {ablation!r}")
    if ablation == "mean" and direction != "noising":
        raise ValueError("mean ablation replaces writes of the clean run: use direction='noising'")
    if mean_tokens is not None:
        if ablation != "mean":
            raise ValueError("mean_tokens is only used with ablation='mean'")
        mean_tokens = token_ids(model, mean_tokens, "mean_tokens")
        if mean_tokens.shape[1] != clean.shape[1]:
            raise ValueError(
                f"mean_tokens has {mean_tokens.shape[1]} positions, the prompts {clean.shape[1]}: the mean "
                "is taken per position"
            )
    if not callable(metric):
        raise ValueError(f"metric must be callable (logits -> scalar), got {type(metric).__name__}")
    check_sizes(max_batch, memory_budget)
    refuse_unsupported(model)
    b, n_pos = clean.shape
    graph = graph_for(model, n_pos, graph, per_position)
    if isinstance(edge_sets, Tensor) and edge_sets.dtype == torch.bool and edge_sets.ndim == 2:
        edge_sets = list(edge_sets)
    if isinstance(edge_sets, (str, bytes)) or not isinstance(edge_sets, Sequence):
        raise ValueError("edge_sets must be a sequence of edge sets (a list of lists of edges, or of masks)")
    masks = [graph.mask(s) for s in edge_sets]  # every set checked before any compute
    base, source = (clean, corrupted) if direction == "noising" else (corrupted, clean)
    out = torch.empty(len(masks))
    world = distributed.world()
    with switches(model):
        if ablation == "mean":  # the readers are chosen and verified on the run the writes come from
            streams, _, acts = open_streams(model, graph, corrupted if mean_tokens is None else mean_tokens)
            other = streams.writes(acts).mean(0, keepdim=True)
        else:
            streams, _, acts = open_streams(model, graph, source)
            other = streams.writes(acts)
        budget = agreed_budget(model, memory_budget)
        per_forward = copies_per_forward(model, b, n_pos, max_batch=max_batch, memory_budget=budget)
        if 1 < world.size and len(masks) < 2 * world.size * per_forward:  # cut finer, to share
            per_forward = max(1, -(-len(masks) // (2 * world.size)))
        firsts = range(0, len(masks), per_forward)
        mine = [firsts[k] for k in world.share([len(masks[f : f + per_forward]) for f in firsts])]

        def run_share() -> dict[int, float]:
            values = {}
            total = sum(len(masks[f : f + per_forward]) for f in mine)
            shown = progress and world.main
            with tqdm(total=total, desc="edge patching", unit="set", disable=not shown) as bar:
                for first in mine:
                    chunk = torch.stack(masks[first : first + per_forward])
                    logits = _run_sets(streams, base, chunk, other)
                    for c in range(chunk.shape[0]):
                        values[first + c] = float(scalar(metric, logits[c * b : (c + 1) * b]))
                    bar.update(chunk.shape[0])
            return values

        for part in world.exchange(run_share):
            for i, value in part.items():
                out[i] = value
    return out


__all__ = ["edge_patch"]
