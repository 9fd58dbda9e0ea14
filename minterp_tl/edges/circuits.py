"""Circuits from edge scores: the top-n edges, a greedy circuit grown from the logits, pruning of dangling
edges, faithfulness (share of the clean - corrupted metric gap a circuit recovers with every other edge
ablated), the faithfulness curve, and the circuit as a networkx graph (plot and JSON)."""

from __future__ import annotations

import heapq
import operator
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import networkx as nx
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from minterp_tl._files import save_png
from minterp_tl.edges.graph import EdgeGraph
from minterp_tl.edges.patch import Ablation, edge_patch
from minterp_tl.edges.scores import EdgeScores, scalar
from minterp_tl.routes import save_json


def _count(n: Any, graph: EdgeGraph) -> int:
    """``n`` as a number of edges of ``graph`` (an integer in ``0..n_edges``)."""
    try:
        value = operator.index(n) if not isinstance(n, bool) else -1
    except TypeError:
        value = -1
    if not 0 <= value <= graph.n_edges:
        raise ValueError(
            f"a circuit size must be an integer in 0..{graph.n_edges} (the graph's edges), got {n!r}"
        )
    return value


def top_edges(scores: EdgeScores, n: int) -> Bool[Tensor, " n_edges"]:
    """The ``n`` edges of largest ``|score|``, as a mask over the graph's edges."""
    mask = torch.zeros(scores.graph.n_edges, dtype=torch.bool)
    mask[scores.scores.abs().topk(_count(n, scores.graph)).indices] = True
    return mask


def _components(graph: EdgeGraph) -> tuple[Tensor, Tensor]:
    """Per edge slot: the component its reader belongs to and the one its writer is (ids over writer ids,
    then one per key/value head, then the logits)."""
    reader = torch.empty(graph.per_slot, dtype=torch.long)
    writer = torch.empty(graph.per_slot, dtype=torch.long)
    per_layer = graph.n_heads + int(graph.has_mlp)
    n_w = len(graph.writers)
    for g in graph.groups:
        s = graph.group_slice(g)
        writer[s] = torch.arange(g.avail).repeat(g.size)
        slots = torch.arange(g.size).repeat_interleave(g.avail)
        base = 1 + g.layer * per_layer
        if g.kind == "q_input":
            reader[s] = base + slots
        elif g.kind in ("k_input", "v_input"):
            reader[s] = n_w + g.layer * graph.n_kv_heads + slots
        elif g.kind == "mlp_in":
            reader[s] = base + graph.n_heads
        else:
            reader[s] = n_w + graph.n_layers * graph.n_kv_heads
    return reader, writer


def greedy_order(scores: EdgeScores, n: int) -> Int[Tensor, " n"]:
    """Edges in the order a greedy circuit takes them (Hanna et al. 2024): start from the logits; each step
    takes the edge of largest ``|score|`` whose reader belongs to the logits or to a head or MLP already
    in the circuit (as a writer), so every edge taken leads to the logits. The first ``k`` are the
    greedy circuit of ``k`` edges."""
    graph = scores.graph
    n = _count(n, graph)
    reader, writer = _components(graph)
    n_slots = graph.n_edges // graph.per_slot
    ranked = scores.scores.abs().argsort(descending=True, stable=True)
    readers = reader.repeat(n_slots)[ranked].tolist()
    writers = writer.repeat(n_slots)[ranked].tolist()
    group = graph.n_heads // graph.n_kv_heads
    per_layer = graph.n_heads + int(graph.has_mlp)
    connected = [False] * (len(graph.writers) + graph.n_layers * graph.n_kv_heads) + [True]  # the logits
    parked: dict[int, list[int]] = defaultdict(list)  # component -> ranks waiting for it to connect
    ready: list[int] = []  # ranks whose reader connected after they were passed over (a heap)
    taken: list[int] = []
    rank = 0
    while len(taken) < n:
        while rank < len(readers) and not connected[readers[rank]]:
            parked[readers[rank]].append(rank)
            rank += 1
        if ready and (rank >= len(readers) or ready[0] < rank):
            r = heapq.heappop(ready)
        elif rank < len(readers):
            r, rank = rank, rank + 1
        else:
            break  # nothing left that leads to the logits
        taken.append(r)
        w = writers[r]
        if w > 0 and not connected[w]:
            layer, j = divmod(w - 1, per_layer)
            new = [w] + (
                [len(graph.writers) + layer * graph.n_kv_heads + j // group] if j < graph.n_heads else []
            )
            for c in new:  # a head also connects its key/value head's readers
                if not connected[c]:
                    connected[c] = True
                    for waiting in parked.pop(c, []):
                        heapq.heappush(ready, waiting)
    return ranked[torch.tensor(taken, dtype=torch.long)]


def prune(
    graph: EdgeGraph, mask: Bool[Tensor, " n_edges"], *, ablation: Ablation = "patch"
) -> Bool[Tensor, " n_edges"]:
    """``mask`` without its dangling edges, which change no faithfulness value:

    - an edge into a head or MLP none of whose output it can affect is in the circuit (a query at position
      ``p`` affects the head's output at ``p``; a key or value at ``p`` its group's outputs from ``p`` on);
    - with ``ablation="patch"`` also an edge out of a head or MLP none of whose inputs that its output at
      that position depends on is in the circuit (its inputs are then the corrupted run's, so it writes
      its corrupted value; under mean ablation it would not write the mean, so such edges stay).
    """
    mask = graph.mask(mask).clone()
    n_pos = graph.n_edges // graph.per_slot
    per_layer = graph.n_heads + int(graph.has_mlp)
    group = graph.n_heads // graph.n_kv_heads
    view = mask.view(n_pos, graph.per_slot)
    groups = {(g.kind, g.layer): g for g in graph.groups}

    def part(g: Any) -> Tensor:
        return view[:, graph.group_slice(g)].view(n_pos, g.size, g.avail)

    def prefix_or(x: Tensor) -> Tensor:  # over positions, up to p
        return x.to(torch.uint8).cummax(0).values.bool()

    def suffix_or(x: Tensor) -> Tensor:  # over positions, from p on
        return prefix_or(x.flip(0)).flip(0)

    while True:
        before = int(view.sum())
        out_used = torch.zeros(n_pos, len(graph.writers), dtype=torch.bool)
        for g in graph.groups:
            out_used[:, : g.avail] |= part(g).any(1)
        fed = torch.ones(n_pos, len(graph.writers), dtype=torch.bool)
        for layer in range(graph.n_layers):
            base = 1 + layer * per_layer
            heads = out_used[:, base : base + graph.n_heads]
            kv_used = suffix_or(heads.view(n_pos, graph.n_kv_heads, group).any(2))
            part(groups[("q_input", layer)])[~heads] = False
            part(groups[("k_input", layer)])[~kv_used] = False
            part(groups[("v_input", layer)])[~kv_used] = False
            kv_fed = part(groups[("k_input", layer)]).any(2) | part(groups[("v_input", layer)]).any(2)
            kv_fed = prefix_or(kv_fed).repeat_interleave(group, dim=1)
            fed[:, base : base + graph.n_heads] = part(groups[("q_input", layer)]).any(2) | kv_fed
            if graph.has_mlp:
                mlp = part(groups[("mlp_in", layer)])
                mlp[~out_used[:, base + graph.n_heads]] = False
                fed[:, base + graph.n_heads] = mlp.any(2)[:, 0]
        if ablation == "patch":
            for g in graph.groups:
                p = part(g)
                p &= fed[:, None, : g.avail]
        if int(view.sum()) == before:
            return mask


def faithfulness(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    circuits: Sequence[Any],
    metric: Callable[[Tensor], Tensor],
    *,
    graph: EdgeGraph,
    ablation: Ablation = "patch",
    mean_tokens: Optional[Tensor] = None,
    max_batch: Optional[int] = None,
    progress: bool = False,
) -> Float[Tensor, " n_circuits"]:
    """The share of the gap each circuit recovers, ``(m_circuit - m_corrupted) / (m_clean - m_corrupted)``,
    where ``m_circuit`` is the metric on the clean prompts with every edge *outside* the circuit ablated
    (corrupted writes, or their mean); all circuits in batched forwards.

    Args:
        circuits: Edge sets of ``graph`` (masks, edge numbers, ``(writer, reader[, score])`` tuples).
        graph: The graph the circuits and the scores belong to.
        ablation, mean_tokens, max_batch, progress: As for :func:`~minterp_tl.edges.patch.edge_patch`.
    """
    masks = [graph.mask(c) for c in circuits]
    kept = edge_patch(
        model,
        clean_tokens,
        corrupted_tokens,
        [~m for m in masks],
        metric,
        ablation=ablation,
        mean_tokens=mean_tokens,
        graph=graph,
        max_batch=max_batch,
        progress=progress,
    )
    with torch.no_grad():
        clean_metric = float(scalar(metric, model(clean_tokens)))
        corrupted_metric = float(scalar(metric, model(corrupted_tokens)))
    gap = clean_metric - corrupted_metric
    if gap == 0.0:
        raise ValueError(
            "the clean and corrupted prompts give the same metric: the share recovered is undefined"
        )
    return (kept - corrupted_metric) / gap


@dataclass(frozen=True)
class FaithfulnessCurve:
    """Edges kept against the share of the gap recovered.

    Attributes:
        sizes: ``[n]`` circuit sizes (edges kept).
        recovered: ``[n]`` share recovered by the circuit of that size.
        n_edges: Edges in the graph.
        method: How the circuits were chosen (``"top"`` or ``"greedy"``) and from which scores.
    """

    sizes: Int[Tensor, " n"]
    recovered: Float[Tensor, " n"]
    n_edges: int
    method: str

    def smallest(self, share: float = 0.9) -> Optional[int]:
        """The fewest edges that recover at least ``share`` of the gap (``None`` if none does)."""
        hit = (self.recovered >= share).nonzero()
        return int(self.sizes[hit[0, 0]]) if hit.numel() else None

    def plot(self, path: Union[str, Path], title: Optional[str] = None) -> Path:
        """Save the curve (share of edges kept, log scale, against share recovered) as a PNG."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        share = self.sizes.clamp(min=1).double() / self.n_edges
        ax.plot(share, self.recovered, marker="o")
        ax.axhline(1.0, color="0.6", lw=0.8, ls="--")
        ax.axhline(0.0, color="0.6", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(f"share of the {self.n_edges} edges kept")
        ax.set_ylabel("share of the clean - corrupted gap recovered")
        ax.set_title(title or f"faithfulness ({self.method})")
        fig.tight_layout()
        return save_png(fig, path)


def faithfulness_curve(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    scores: EdgeScores,
    metric: Callable[[Tensor], Tensor],
    *,
    sizes: Optional[Sequence[int]] = None,
    greedy: bool = False,
    ablation: Ablation = "patch",
    mean_tokens: Optional[Tensor] = None,
    max_batch: Optional[int] = None,
    progress: bool = False,
) -> FaithfulnessCurve:
    """Faithfulness of the top-n (or greedy, pruned) circuits of ``scores`` for each ``n`` in ``sizes``
    (default: 0, 0.1%, 0.2%, 0.5%, ..., 100% of the edges), in batched forwards."""
    graph = scores.graph
    if sizes is None:
        shares = [0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
        sizes = sorted({round(s * graph.n_edges) for s in shares})
    sizes = [_count(n, graph) for n in sizes]
    if greedy:
        order = greedy_order(scores, max(sizes))
        circuits = []
        for n in sizes:
            mask = torch.zeros(graph.n_edges, dtype=torch.bool)
            mask[order[:n]] = True
            circuits.append(prune(graph, mask, ablation=ablation))
    else:
        circuits = [top_edges(scores, n) for n in sizes]
    recovered = faithfulness(
        model,
        clean_tokens,
        corrupted_tokens,
        circuits,
        metric,
        graph=graph,
        ablation=ablation,
        mean_tokens=mean_tokens,
        max_batch=max_batch,
        progress=progress,
    )
    kept = torch.tensor([int(c.sum()) for c in circuits])
    return FaithfulnessCurve(
        kept, recovered, graph.n_edges, f"{'greedy' if greedy else 'top'} {scores.method}"
    )


def circuit_graph(graph: EdgeGraph, circuit: Any, scores: Optional[EdgeScores] = None) -> nx.DiGraph:
    """The circuit as a ``networkx.DiGraph``: a node per writer or component (``embed@p``, ``a1.2@p``,
    ``m0@p``, ``logits@p``; attributes ``kind``, ``layer``, ``head``, ``position``), an edge per
    writer -> component with attributes ``inputs`` (which of ``q``/``k``/``v``/``mlp``/``logits`` it
    feeds) and ``score`` (their summed scores, when ``scores`` is given)."""
    mask = graph.mask(circuit)
    out = nx.DiGraph(n_layers=graph.n_layers, per_position=graph.per_position, n_edges=int(mask.sum()))
    values = scores.scores if scores is not None else None
    for i in mask.nonzero()[:, 0].tolist():
        writer, reader = graph.edge(i)
        target = reader
        if reader.kind in ("q_input", "k_input", "v_input", "mlp_in"):
            kind = "attn_head_out" if reader.kind != "mlp_in" else "mlp_out"
            target = type(reader)(kind, reader.position, reader.layer, reader.head)  # type: ignore[arg-type]
        for node in (writer, target):
            out.add_node(node.label, kind=node.kind, layer=node.layer, head=node.head, position=node.position)
        feeds = {"q_input": "q", "k_input": "k", "v_input": "v", "mlp_in": "mlp", "logits": "logits"}[
            reader.kind
        ]
        data = out.get_edge_data(writer.label, target.label) or {"inputs": [], "score": 0.0}
        data["inputs"] = data["inputs"] + [
            feeds + (f".{reader.head}" if reader.kind in ("k_input", "v_input") else "")
        ]
        data["score"] = data["score"] + (float(values[i]) if values is not None else 0.0)
        out.add_edge(writer.label, target.label, **data)
    return out


def save_circuit(circuit: nx.DiGraph, path: Union[str, Path]) -> Path:
    """Write :func:`circuit_graph`'s graph as JSON (atomically; read it back with
    :func:`minterp_tl.routes.load_json`)."""
    return save_json(circuit, path)


def plot_circuit(circuit: nx.DiGraph, path: Union[str, Path], title: Optional[str] = None) -> Path:
    """Draw the circuit over a position x layer grid (heads spread within a layer) and save a PNG; edge
    width grows with ``|score|``, blue into heads, orange into MLPs, grey into the logits."""
    from matplotlib.figure import Figure

    n_layers = int(circuit.graph["n_layers"])
    heads = max([d["head"] for _, d in circuit.nodes(data=True) if d["head"] is not None] + [0]) + 1

    def xy(node: str) -> tuple[float, float]:
        d = circuit.nodes[node]
        x = float(d["position"] or 0)
        if d["kind"] == "embed":
            return x, 0.0
        if d["kind"] == "logits":
            return x, 2.0 * n_layers + 1
        if d["kind"] == "mlp_out":
            return x + 0.35, 2.0 * d["layer"] + 2
        return x - 0.35 + 0.6 * d["head"] / max(1, heads - 1), 2.0 * d["layer"] + 1

    fig = Figure(figsize=(8, 6))
    ax = fig.subplots()
    top = max([abs(d["score"]) for _, _, d in circuit.edges(data=True)] + [1e-12])
    for u, v, d in circuit.edges(data=True):
        kind = circuit.nodes[v]["kind"]
        colour = {"attn_head_out": "tab:blue", "mlp_out": "tab:orange"}.get(kind, "0.5")
        (x0, y0), (x1, y1) = xy(u), xy(v)
        ax.plot([x0, x1], [y0, y1], color=colour, lw=0.5 + 4 * abs(d["score"]) / top, alpha=0.7)
    for node in circuit.nodes:
        x, y = xy(node)
        ax.scatter([x], [y], s=14, color="black", zorder=3)
        ax.annotate(node.split("@")[0], (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_yticks([0] + [2 * layer + 1 for layer in range(n_layers)] + [2 * n_layers + 1])
    ax.set_yticklabels(["embed"] + [f"L{layer}" for layer in range(n_layers)] + ["logits"], fontsize=7)
    ax.set_xlabel("position" if circuit.graph["per_position"] else "(all positions)")
    ax.set_title(title or f"circuit ({circuit.graph['n_edges']} edges)")
    fig.tight_layout()
    return save_png(fig, path)


__all__ = [
    "FaithfulnessCurve",
    "circuit_graph",
    "faithfulness",
    "faithfulness_curve",
    "greedy_order",
    "plot_circuit",
    "prune",
    "save_circuit",
    "top_edges",
]
