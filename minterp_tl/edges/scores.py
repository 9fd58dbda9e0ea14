"""Edge attribution: EAP (Syed et al. 2023) and EAP-IG (Hanna et al. 2024) scores for every edge.

The score of edge ``u -> v`` estimates how much the metric moves when, in the corrupted run, ``v``'s
input receives ``u``'s clean write instead of its corrupted one (denoising, TransformerLens's sign)::

    score(u -> v) = (write_clean[u] - write_corrupted[u]) . mean_k  d metric / d input[v]  at  alpha_k

EAP takes the gradient on the corrupted run (one step, ``alpha = 0``); EAP-IG averages it over
``ig_steps`` runs whose input embeddings are interpolated from corrupted to clean, ``alpha_k = k /
ig_steps`` for ``k = 0 .. ig_steps - 1`` (the left Riemann sum, so ``ig_steps=1`` is EAP exactly, as in
TransformerLens's ``EdgeAttributionConfig``; Hanna et al. use ``k = 1 .. ig_steps``). All steps of a chunk
share one forward and one backward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from minterp_tl import distributed
from minterp_tl._checks import positive_int, token_ids
from minterp_tl._patch_engine import check_sizes, copies_per_forward
from minterp_tl.edges._streams import Streams, open_streams, record, refuse_unsupported, switches
from minterp_tl.edges.graph import Edge, EdgeGraph, Node, graph_for


@dataclass(frozen=True, eq=False)
class EdgeScores:
    """A score per edge of ``graph``.

    Attributes:
        graph: The edge graph; ``scores[i]`` belongs to ``graph.edge(i)``.
        scores: ``[n_edges]`` estimated metric change per edge (positive: the clean write moves the metric
            up).
        method: ``"EAP"`` or ``"EAP-IG"``.
        ig_steps: Integration steps (1 for EAP).
        clean_metric: The metric on the clean prompts.
        corrupted_metric: The metric on the corrupted prompts.
    """

    graph: EdgeGraph
    scores: Float[Tensor, " n_edges"]
    method: str
    ig_steps: int
    clean_metric: float
    corrupted_metric: float

    def top(self, k: int = 10) -> list[tuple[Node, Node, float]]:
        """The ``k`` edges of largest ``|score|``, strongest first, as ``(writer, reader, score)``."""
        k = min(positive_int(k, "k"), self.graph.n_edges)
        idx = self.scores.abs().topk(k).indices.tolist()
        return [(*self.graph.edge(i), float(self.scores[i])) for i in idx]

    def to_dict(self) -> dict[Edge, float]:
        """``{(writer, reader): score}`` for every edge (TransformerLens's ``edge_scores``; small graphs)."""
        return {self.graph.edge(i): float(s) for i, s in enumerate(self.scores.tolist())}


def check_pair(model: Any, clean_tokens: Any, corrupted_tokens: Any) -> tuple[Tensor, Tensor]:
    """Both token batches checked, of the same ``[batch, pos]`` shape."""
    clean = token_ids(model, clean_tokens, "clean_tokens")
    corrupted = token_ids(model, corrupted_tokens, "corrupted_tokens")
    if clean.shape != corrupted.shape:
        raise ValueError(
            f"clean_tokens is {list(clean.shape)} and corrupted_tokens {list(corrupted.shape)} [batch, pos]: "
            "edges pair the prompts position by position, so both need the same number of prompts of the "
            "same length (pad or choose prompts that tokenize alike)"
        )
    return clean, corrupted


def scalar(metric: Callable[[Tensor], Tensor], logits: Tensor) -> Tensor:
    """``metric(logits)`` as a 0-d tensor (a clear error otherwise)."""
    value = metric(logits)
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError(
            f"metric must return a scalar tensor, got {type(value).__name__}"
            + (f" of shape {tuple(value.shape)}" if isinstance(value, Tensor) else "")
        )
    return value.reshape(())


def _input_grads(
    streams: Streams,
    corrupted: Int[Tensor, "batch pos"],
    start: Float[Tensor, "batch pos d_model"],
    delta: Float[Tensor, "batch pos d_model"],
    alphas: list[float],
    metric: Callable[[Tensor], Tensor],
) -> list[Float[Tensor, "batch pos size d_model"]]:
    """Per reader group, the gradient of the metric with respect to each reader's input, summed over the
    runs whose embeddings are ``start + alpha * delta`` (one forward and backward for all ``alphas``)."""
    model, b, s = streams.model, corrupted.shape[0], len(alphas)
    alpha = torch.tensor(alphas, device=start.device, dtype=start.dtype).repeat_interleave(b)[:, None, None]
    embeds = (start.repeat(s, 1, 1) + alpha * delta.repeat(s, 1, 1)).requires_grad_(True)
    outs: dict[str, Tensor] = {}
    sources: dict[str, Tensor] = {}

    def embed(act: Tensor, hook: Any) -> Tensor:
        return embeds

    def keep(name: str) -> Callable[..., Tensor]:
        def hook(act: Tensor, hook: Any) -> Tensor:
            outs[name] = out = act.clone()
            return out

        return hook

    def source(name: str) -> Callable[..., None]:
        def hook(act: Tensor, hook: Any) -> None:
            sources[name] = act.detach()

        return hook

    hooks = [("blocks.0.hook_resid_pre", embed)] + [(r.hook, keep(r.hook)) for r in streams.readers]
    hooks += [(r.source, source(r.source)) for r in streams.readers if r.source is not None]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(corrupted.repeat(s, 1))
        total = torch.stack([scalar(metric, logits[k * b : (k + 1) * b]) for k in range(s)]).sum()
        names = list(outs)
        grads = dict(zip(names, torch.autograd.grad(total, [outs[n] for n in names], allow_unused=True)))
    result = []
    for r in streams.readers:
        g = grads.get(r.hook)
        if g is None:
            g = torch.zeros_like(outs[r.hook])
        if r.source is not None:  # a virtual fork: back through f, once per reader, at each run's input
            x = sources[r.source]
            if r.group.kind != "mlp_in":
                x = x.unsqueeze(-2).expand(*x.shape[:-1], g.shape[-2], x.shape[-1])
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                assert r.f is not None  # verified by open_streams
                (g,) = torch.autograd.grad(r.f(x), x, g)
        if g.ndim == 3:
            g = g.unsqueeze(2)
        result.append(g.view(s, b, *g.shape[1:]).sum(0))
    return result


def edge_attribution(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: Callable[[Float[Tensor, "batch pos d_vocab"]], Tensor],
    *,
    ig_steps: int = 1,
    per_position: bool = True,
    graph: Optional[EdgeGraph] = None,
    max_batch: Optional[int] = None,
    progress: bool = False,
) -> EdgeScores:
    """EAP (``ig_steps=1``) or EAP-IG scores of every edge of the model's residual-stream graph.

    Args:
        model: A ``TransformerBridge`` in eval mode.
        clean_tokens: ``[batch, pos]`` clean prompts.
        corrupted_tokens: ``[batch, pos]`` corrupted prompts, paired with the clean ones row by row.
        metric: ``[batch, pos, d_vocab]`` logits -> scalar, e.g. the mean logit difference; with a metric
            that averages over the batch, the scores are TransformerLens's per-pair averages.
        ig_steps: Integration steps (``>= 1``); 1 is EAP.
        per_position: One edge per position (default) or one for all positions (the sum of those).
        graph: An :class:`EdgeGraph` of this model and length to reuse (default: built here).
        max_batch: The most sequences in one forward and backward pass.
        progress: Show a progress bar over the integration steps.

    Returns:
        :class:`EdgeScores`. Costs ``ig_steps`` forward+backward passes (batched) and two forwards.

    Raises:
        ValueError: bad tokens, prompts of different shapes, ``ig_steps < 1``, a metric that is not a
            scalar, a model in training mode or with post-norm blocks.
        NotImplementedError: a bridge where a reader's input cannot be reached exactly.
    """
    clean, corrupted = check_pair(model, clean_tokens, corrupted_tokens)
    steps = positive_int(ig_steps, "ig_steps")
    check_sizes(max_batch, None)
    if not callable(metric):
        raise ValueError(f"metric must be callable (logits -> scalar), got {type(metric).__name__}")
    refuse_unsupported(model)
    b, n_pos = clean.shape
    graph = graph_for(model, n_pos, graph, per_position)
    world = distributed.world()
    mine = world.rows(steps)  # this rank's integration steps (all of them in one process)

    def integrate() -> tuple[tuple[float, float], Optional[Tensor]]:
        """The clean and corrupted metrics, and the scores of this rank's steps (``None``: no step)."""
        with switches(model):
            streams, clean_logits, clean_acts = open_streams(model, graph, clean)
            corrupted_logits, corrupted_acts = record(model, corrupted, streams.writer_names(graph))
            with torch.no_grad():
                clean_writes = streams.writes(clean_acts)
                delta = clean_writes - streams.writes(corrupted_acts)
                metrics = float(scalar(metric, clean_logits)), float(scalar(metric, corrupted_logits))
            start = corrupted_acts["blocks.0.hook_resid_pre"]
            embed_delta = clean_acts["blocks.0.hook_resid_pre"] - start
            per_pass = max(1, copies_per_forward(model, b, n_pos, max_batch=max_batch) // 3)  # backward: ~3x
            grads: Optional[list[Tensor]] = None
            shown = progress and world.main
            desc = "EAP-IG" if steps > 1 else "EAP"
            with tqdm(total=mine.stop - mine.start, desc=desc, disable=not shown) as bar:
                for first in range(mine.start, mine.stop, per_pass):
                    alphas = [k / steps for k in range(first, min(mine.stop, first + per_pass))]
                    part = _input_grads(streams, corrupted, start, embed_delta, alphas, metric)
                    grads = part if grads is None else [g + p for g, p in zip(grads, part)]
                    bar.update(len(alphas))
        if grads is None:  # more ranks than steps
            return metrics, None
        scores = torch.zeros(n_pos if graph.per_position else 1, graph.per_slot, dtype=delta.dtype)
        with torch.no_grad():
            for g, grad in zip(graph.groups, grads):
                s = torch.einsum("bpgd,bpad->pga", grad / steps, delta[:, :, : g.avail]).reshape(n_pos, -1)
                scores[:, graph.group_slice(g)] = (s if graph.per_position else s.sum(0, keepdim=True)).cpu()
        return metrics, scores

    parts = world.exchange(integrate)
    metrics = parts[0][0]
    scores = functools.reduce(torch.add, [p[1] for p in parts if p[1] is not None])
    return EdgeScores(graph, scores.reshape(-1), "EAP-IG" if steps > 1 else "EAP", steps, *metrics)


__all__ = ["EdgeScores", "edge_attribution"]
