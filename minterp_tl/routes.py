"""Information-flow routes: the LLM Transparency Tool's contribution graph, built layer by layer.

For one sentence of a :class:`~minterp_tl.transparent.TransparentLlm` run, every representation gets
the share each of its parts contributed (the L1 rule), and the shares become the edges of a graph
from the input tokens to the predictions.

Contributions (L1 rule). Parts ``p_i`` of a whole ``w`` (``w = sum_i p_i`` up to a bias)::

    c_i = max(|w|_1 - |w - p_i|_1, 1e-5),   then normalised so the c_i of one representation sum to 1.

- Attention block of layer ``l`` at target token ``t``: parts = the ``(source s <= t, head h)``
  vectors of ``decomposed_attn`` plus ``resid_pre[t]``; whole = ``resid_mid[t]``. Later sources are
  not parts (causal attention makes them exactly zero; the tool gives each one the 1e-5 floor, which
  makes a token's shares depend on how many tokens follow it).
- FFN block: parts = ``[mlp_out[t], resid_mid[t]]``; whole = ``resid_post[t]``.
- Threshold ``tau`` with renormalisation: every share ``<= tau`` becomes 0 and the rest of the
  representation's shares are divided by their sum (a representation whose shares all fall under
  ``tau`` keeps all-zero shares).

Graph (``networkx.DiGraph``), node names as in the tool: ``X0_t`` (input of token ``t``), ``A{l}_t``
(residual after the attention of layer ``l``), ``M{l}_t`` (the FFN of layer ``l``), ``I{l}_t``
(residual after layer ``l``). Edges, with ``weight`` = the thresholded share:

- ``I{l-1}_s`` (``X0_s`` for ``l = 0``) -> ``A{l}_t``: attention from source ``s`` to target ``t``,
  summed over heads; attribute ``heads`` holds the per-head shares. For ``s = t`` the residual share
  is added to the same edge (attribute ``resid``; ``attn`` is the attention part).
- ``A{l}_t`` -> ``M{l}_t`` and ``M{l}_t`` -> ``I{l}_t``: the FFN share; ``A{l}_t`` -> ``I{l}_t``:
  the residual share. In a parallel block (GPT-NeoX / Pythia, GPT-J, Phi-2) the FFN reads the block's
  input, so its edge in is ``I{l-1}_t`` -> ``M{l}_t``; ``A{l}_t`` is then ``I{l-1}_t`` plus the
  attention output (what the block would give without its FFN), and the shares are computed as usual.

Edges whose share is 0 after thresholding are left out. :func:`paths_to_prediction` keeps the edges
above a threshold that lead (backwards) to ``I{n_layers-1}_t``; :func:`strongest_paths` ranks whole
input-to-prediction paths by the product of their edge weights.

Cost: one layer at a time, and inside a layer in chunks of target tokens (at most
``chunk_elements`` floats per chunk), so the peak holds at most one layer's decomposition --
never all layers' (the tool cached per-head results of every layer before it started). The build
is vectorised (no per-pair ``.item()``).

Numerics: those of the :class:`TransparentLlm` (raw HF weights, no LayerNorm folding).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import networkx as nx
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from minterp_tl._checks import index
from minterp_tl._files import atomic_write, save_png
from minterp_tl.transparent import TransparentLlm

MAX_PATHS = 1000
"""The most paths :func:`strongest_paths` lists (its work grows with ``k`` times the graph's edges)."""

DEFAULT_THRESHOLD = 0.04
"""The tool's default threshold ``tau``."""

MIN_CONTRIBUTION = 1e-5
"""The floor of the L1 rule."""

DEFAULT_CHUNK_ELEMENTS = 1 << 23
"""Floats per chunk of one layer's attention decomposition (32 MiB in float32)."""


# --------------------------------------------------------------------------------------------
# contributions
# --------------------------------------------------------------------------------------------


def _check_norm(distance_norm: Any) -> int:
    if distance_norm not in (1, 2) or isinstance(distance_norm, bool):
        raise ValueError(f"distance_norm must be 1 (L1, the paper's) or 2 (L2), got {distance_norm!r}")
    return int(distance_norm)


def _norm(x: Tensor, distance_norm: int) -> Tensor:
    """``|x|_p`` over the last axis (``abs().sum()`` for L1: several times faster on CPU than
    ``vector_norm(ord=1)``)."""
    return x.abs().sum(-1) if distance_norm == 1 else x.square().sum(-1).sqrt()


def contributions(
    parts: Float[Tensor, "... n_parts d_model"], whole: Float[Tensor, "... d_model"], distance_norm: int = 1
) -> Float[Tensor, "... n_parts"]:
    """The rule of the paper: ``max(|w|_p - |w - p_i|_p, 1e-5)``, normalised to sum to 1 over the parts.

    Args:
        parts: The parts of each whole, ``[..., n_parts, d_model]``.
        whole: The wholes, ``[..., d_model]`` (leading axes as ``parts``).
        distance_norm: ``p``: 1 (L1, default, as in the paper) or 2 (L2), as the tool's ``distance_norm``.
    """
    distance_norm = _check_norm(distance_norm)
    if parts.shape[:-2] != whole.shape[:-1] or parts.shape[-1] != whole.shape[-1]:
        raise ValueError(
            f"contributions: parts {tuple(parts.shape)} must be whole {tuple(whole.shape)} with a parts axis "
            "before the last one"
        )
    dist = _norm(whole.unsqueeze(-2) - parts, distance_norm)
    c = (_norm(whole, distance_norm).unsqueeze(-1) - dist).clamp_min(MIN_CONTRIBUTION)
    return c / c.sum(-1, keepdim=True)


def threshold_and_renormalize(
    c_blocks: Float[Tensor, rep * parts], c_resid: Float[Tensor, rep], threshold: float
) -> tuple[Float[Tensor, rep * parts], Float[Tensor, rep]]:
    """Zero every share ``<= threshold`` and divide the rest of each representation's shares by their sum.

    Args:
        c_blocks: The block parts' shares, one row per representation (any number of part axes).
        c_resid: The residual's share of each representation.
        threshold: ``tau`` in ``[0, 1)``.

    Returns:
        ``(c_blocks, c_resid)`` renormalised; a representation with nothing above ``tau`` stays all zero.
    """
    _check_threshold(threshold)
    c_blocks = c_blocks * (c_blocks > threshold)
    c_resid = c_resid * (c_resid > threshold)
    denom = c_blocks.reshape(c_blocks.shape[0], -1).sum(-1) + c_resid
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return c_blocks / denom.view(-1, *([1] * (c_blocks.ndim - 1))), c_resid / denom


@torch.no_grad()
def attention_contributions(
    llm: TransparentLlm,
    batch_i: int,
    layer: int,
    *,
    n_tokens: Optional[int] = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    distance_norm: int = 1,
) -> tuple[Float[Tensor, "target source head"], Float[Tensor, target]]:
    """Shares of the attention block of ``layer``: each ``(source, head)`` and the residual, per target.

    Args:
        llm: A :class:`TransparentLlm` after ``run``.
        batch_i: The sentence.
        layer: The layer.
        n_tokens: Positions to use (default: the sentence's real tokens, or all positions).
        chunk_elements: Most floats of the decomposition held at once; targets are processed in
            chunks of this size (sources ``> target`` are never built).
        distance_norm: 1 (L1, default) or 2 (L2): see :func:`contributions`.

    Returns:
        ``(c_attn [target, source, head], c_resid [target])``, unthresholded; ``c_attn`` is 0 for
        ``source > target``; each target's shares sum to 1.
    """
    distance_norm = _check_norm(distance_norm)
    n = _n_tokens(llm, batch_i, n_tokens)
    resid_pre = llm.residual_in(layer)[batch_i, :n]
    whole = llm.residual_after_attn(layer)[batch_i, :n]
    whole_norm = _norm(whole, distance_norm)  # [t]
    c_resid = (whole_norm - _norm(whole - resid_pre, distance_norm)).clamp_min(MIN_CONTRIBUTION)
    n_heads = llm.model_info().n_heads
    c_attn = torch.zeros(n, n, n_heads, dtype=whole.dtype, device=whole.device)
    row_cost = n * n_heads * whole.shape[-1]
    for start, stop in _chunks(n, row_cost, chunk_elements):
        parts = llm.decomposed_attn_rows(batch_i, layer, start, stop)  # [tc, stop, head, d]
        # |p - w|_p in place (abs + sum: several times faster on CPU than vector_norm(ord=1))
        diff = parts.sub_(whole[start:stop, None, None, :])
        dist = (
            diff.abs_().sum(-1) if distance_norm == 1 else diff.square_().sum(-1).sqrt_()
        )  # [tc, stop, head]
        del parts, diff
        c = (whole_norm[start:stop, None, None] - dist).clamp_min_(MIN_CONTRIBUTION)
        causal = (
            torch.arange(stop, device=c.device)[None, :]
            <= torch.arange(start, stop, device=c.device)[:, None]
        )
        c_attn[start:stop, :stop] = c * causal[..., None]
    denom = c_attn.sum((1, 2)) + c_resid
    return c_attn / denom[:, None, None], c_resid / denom


@torch.no_grad()
def ffn_contributions(
    llm: TransparentLlm, batch_i: int, layer: int, *, n_tokens: Optional[int] = None, distance_norm: int = 1
) -> tuple[Float[Tensor, target], Float[Tensor, target]]:
    """Shares of the FFN block of ``layer``: ``(c_ffn [target], c_resid [target])`` (parts
    ``[ffn_out, residual_after_attn]``, whole ``residual_out``), unthresholded; ``distance_norm`` as for
    :func:`contributions`."""
    n = _n_tokens(llm, batch_i, n_tokens)
    parts = torch.stack([llm.ffn_out(layer)[batch_i, :n], llm.residual_after_attn(layer)[batch_i, :n]], dim=1)
    c = contributions(parts, llm.residual_out(layer)[batch_i, :n], distance_norm)
    return c[:, 0], c[:, 1]


# --------------------------------------------------------------------------------------------
# the graph
# --------------------------------------------------------------------------------------------


def node_name(kind: str, layer: int, token: int) -> str:
    """``"X0_3"``, ``"A5_3"``, ``"M5_3"``, ``"I5_3"`` (``kind`` one of X, A, M, I)."""
    if kind not in ("X", "A", "M", "I"):
        raise ValueError(f"node kind must be one of X, A, M, I, got {kind!r}")
    return f"{kind}{layer}_{token}"


def _block_input(layer: int, token: int) -> str:
    return f"X0_{token}" if layer == 0 else f"I{layer - 1}_{token}"


@torch.no_grad()
def build_graph(
    llm: TransparentLlm,
    batch_i: int = 0,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    n_tokens: Optional[int] = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    progress: bool = True,
    distance_norm: int = 1,
) -> nx.DiGraph:
    """The full contribution graph of sentence ``batch_i`` (see the module docstring).

    Args:
        llm: A :class:`TransparentLlm` after ``run``.
        batch_i: The sentence.
        threshold: ``tau``: shares ``<= tau`` are zeroed and each representation renormalised
            before the edges are made (0 keeps every share).
        n_tokens: Positions to use (default: the sentence's real tokens).
        chunk_elements: See :func:`attention_contributions`.
        progress: Show a progress bar over layers.
        distance_norm: 1 (L1, default, the paper's) or 2 (L2): see :func:`contributions`.

    Returns:
        A ``networkx.DiGraph`` with every node (attributes ``kind``, ``layer``, ``token``) and the
        edges with a share above 0 after thresholding (attributes ``weight``; attention edges also
        ``attn``, ``resid`` and ``heads``, a list of per-head shares). ``graph.graph`` holds
        ``n_layers``, ``n_tokens``, ``n_heads``, ``tokens`` (the token strings), ``threshold``
        and ``batch_i``.
    """
    _check_threshold(threshold)
    distance_norm = _check_norm(distance_norm)
    if batch_i < 0 or batch_i >= llm.batch_size():
        raise ValueError(f"batch_i={batch_i} is out of range; valid: 0..{llm.batch_size() - 1}")
    info = llm.model_info()
    n = _n_tokens(llm, batch_i, n_tokens)
    n_layers = info.n_layers
    tokens = llm.tokens_to_strings(llm.tokens()[batch_i, :n])
    graph = nx.DiGraph(
        n_layers=n_layers,
        n_tokens=n,
        n_heads=info.n_heads,
        tokens=tokens,
        threshold=float(threshold),
        batch_i=batch_i,
        distance_norm=distance_norm,
    )
    graph.add_nodes_from((f"X0_{t}", {"kind": "X", "layer": -1, "token": t}) for t in range(n))
    for layer in range(n_layers):
        for kind in ("A", "M", "I"):
            graph.add_nodes_from(
                (f"{kind}{layer}_{t}", {"kind": kind, "layer": layer, "token": t}) for t in range(n)
            )
    for layer in tqdm(range(n_layers), desc="routes", disable=not progress):
        c_attn, c_resid = attention_contributions(
            llm, batch_i, layer, n_tokens=n, chunk_elements=chunk_elements, distance_norm=distance_norm
        )
        c_attn, c_resid = threshold_and_renormalize(c_attn, c_resid, threshold)
        edge_w = c_attn.sum(-1)  # [target, source]
        targets, sources = torch.nonzero(edge_w > 0, as_tuple=True)
        weights = edge_w[targets, sources].tolist()
        heads = c_attn[targets, sources].tolist()
        resid = c_resid.tolist()
        graph.add_edges_from(
            (
                _block_input(layer, s),
                f"A{layer}_{t}",
                {
                    "weight": w + (resid[t] if s == t else 0.0),
                    "attn": w,
                    "resid": resid[t] if s == t else 0.0,
                    "heads": h,
                },
            )
            for t, s, w, h in zip(targets.tolist(), sources.tolist(), weights, heads)
        )
        graph.add_edges_from(
            (
                _block_input(layer, t),
                f"A{layer}_{t}",
                {"weight": r, "attn": 0.0, "resid": r, "heads": [0.0] * info.n_heads},
            )
            for t, r in enumerate(resid)
            if r > 0 and not graph.has_edge(_block_input(layer, t), f"A{layer}_{t}")
        )
        c_ffn, c_resid_ffn = ffn_contributions(llm, batch_i, layer, n_tokens=n, distance_norm=distance_norm)
        c_ffn, c_resid_ffn = threshold_and_renormalize(c_ffn, c_resid_ffn, threshold)
        parallel = llm.parallel_blocks()
        for t, (f, r) in enumerate(zip(c_ffn.tolist(), c_resid_ffn.tolist())):
            if f > 0:  # the FFN reads the attention's output, or (parallel block) the block's input
                graph.add_edge(
                    _block_input(layer, t) if parallel else f"A{layer}_{t}", f"M{layer}_{t}", weight=f
                )
                graph.add_edge(f"M{layer}_{t}", f"I{layer}_{t}", weight=f)
            if r > 0:
                graph.add_edge(f"A{layer}_{t}", f"I{layer}_{t}", weight=r)
    return graph


def output_node(graph: nx.DiGraph, token: int = -1) -> str:
    """The node of the prediction at ``token``: ``I{n_layers-1}_{token}`` (negatives count from the end)."""
    n = int(graph.graph["n_tokens"])
    return f"I{int(graph.graph['n_layers']) - 1}_{index(token, n, 'token')}"


def paths_to_prediction(graph: nx.DiGraph, token: int = -1, threshold: Optional[float] = None) -> nx.DiGraph:
    """The edges with weight ``> threshold`` from which the prediction at ``token`` can be reached.

    Args:
        graph: From :func:`build_graph`.
        token: The predicting position (default: the last).
        threshold: Edge threshold (default: the graph's own ``tau``).

    Returns:
        A new ``DiGraph`` (edges pointing forward, as in ``graph``) of those edges and their nodes,
        with ``graph.graph`` copied and ``target`` set to the output node.
    """
    tau = float(graph.graph["threshold"] if threshold is None else threshold)
    _check_threshold(tau)
    start = output_node(graph, token)
    kept = nx.DiGraph(**graph.graph)
    kept.graph["target"] = start
    kept.add_node(start, **graph.nodes[start])
    stack, seen = [start], {start}
    while stack:
        node = stack.pop()
        for src, _, data in graph.in_edges(node, data=True):
            if data["weight"] > tau:
                kept.add_node(src, **graph.nodes[src])
                kept.add_edge(src, node, **data)
                if src not in seen:
                    seen.add(src)
                    stack.append(src)
    return kept


@dataclass(frozen=True)
class Route:
    """One path from an input token to a prediction.

    Attributes:
        weight: Product of the edge weights along the path.
        nodes: Node names from ``X0_s`` to ``I{n_layers-1}_t``.
    """

    weight: float
    nodes: tuple[str, ...]

    def describe(self, tokens: Optional[list[str]] = None) -> str:
        """One line with the hops only, e.g.
        ``"0.0448  ' France'@4 -> ffn L0 -> attn L23 -> ' is'@5 -> I29_5"``:
        the source token, every FFN the path goes through, every attention move to another token
        (``attn L{l}``), and the output node; residual steps are left out."""

        def token(node: str) -> str:
            t = int(node.split("_")[1])
            return f"{tokens[t]!r}@{t}" if tokens is not None else f"@{t}"

        hops = [token(self.nodes[0])]
        for u, v in zip(self.nodes, self.nodes[1:]):
            if v.startswith("M"):
                hops.append(f"ffn L{v[1:].split('_')[0]}")
            elif v.startswith("A") and u.split("_")[1] != v.split("_")[1]:
                hops += [f"attn L{v[1:].split('_')[0]}", token(v)]
        return f"{self.weight:.4f}  {' -> '.join(hops + [self.nodes[-1]])}"


def strongest_paths(
    graph: nx.DiGraph, token: int = -1, k: int = 5, threshold: Optional[float] = None
) -> list[Route]:
    """The ``k`` input-to-prediction paths with the largest product of edge weights.

    Only edges with weight ``> threshold`` (default: the graph's ``tau``) are used. Exact k-best
    dynamic programming over the DAG (each node keeps its ``k`` best continuations).

    Args:
        graph: From :func:`build_graph`.
        token: The predicting position.
        k: How many paths.
        threshold: Edge threshold.

    Returns:
        Up to ``k`` :class:`Route` objects, strongest first.
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_PATHS:
        raise ValueError(f"k must be an integer in 1..{MAX_PATHS}, got {k!r}")
    sub = paths_to_prediction(graph, token, threshold)
    end = sub.graph["target"]
    best: dict[str, list[tuple[float, tuple[str, ...]]]] = {end: [(1.0, (end,))]}
    for node in reversed(list(nx.topological_sort(sub))):
        if node == end:
            continue
        cands = [
            (data["weight"] * w, (node, *path))
            for _, nxt, data in sub.out_edges(node, data=True)
            for w, path in best.get(nxt, [])
        ]
        cands.sort(key=lambda x: -x[0])
        best[node] = cands[:k]
    starts = [r for node in sub if node.startswith("X0_") for r in best.get(node, [])]
    starts.sort(key=lambda x: -x[0])
    return [Route(w, path) for w, path in starts[:k]]


# --------------------------------------------------------------------------------------------
# export and plot
# --------------------------------------------------------------------------------------------


def graph_to_dict(graph: nx.DiGraph) -> dict[str, Any]:
    """A JSON-ready dict: ``graph.graph``'s attributes, ``nodes`` (name + attributes) and ``edges``
    (``source``, ``target`` + attributes)."""
    return {
        **{k: v for k, v in graph.graph.items()},
        "nodes": [{"name": n, **d} for n, d in graph.nodes(data=True)],
        "edges": [{"source": u, "target": v, **d} for u, v, d in graph.edges(data=True)],
    }


def save_json(graph: nx.DiGraph, path: Union[str, Path]) -> Path:
    """Write :func:`graph_to_dict` to ``path`` as JSON (a temporary file, then renamed)."""
    return atomic_write(path, lambda fh: fh.write(json.dumps(graph_to_dict(graph)).encode()))


def load_json(path: Union[str, Path]) -> nx.DiGraph:
    """Read a graph written by :func:`save_json`."""
    data = json.loads(Path(path).read_text())
    nodes, edges = data.pop("nodes"), data.pop("edges")
    graph = nx.DiGraph(**data)
    graph.add_nodes_from((d.pop("name"), d) for d in nodes)
    graph.add_edges_from((d.pop("source"), d.pop("target"), d) for d in edges)
    return graph


def _xy(graph: nx.DiGraph, node: str) -> tuple[float, float]:
    d = graph.nodes[node]
    layer, token = int(d["layer"]), int(d["token"])
    if d["kind"] == "X":
        return float(token), 0.0
    if d["kind"] == "A":
        return float(token), 2.0 * layer + 1.0
    if d["kind"] == "M":
        return token + 0.35, 2.0 * layer + 1.5
    return float(token), 2.0 * layer + 2.0


def plot_routes(
    graph: nx.DiGraph,
    path: Union[str, Path],
    *,
    token: Optional[int] = -1,
    threshold: Optional[float] = None,
    title: Optional[str] = None,
) -> Path:
    """Draw the routes over a tokens x layers grid and save a PNG (written atomically).

    Args:
        graph: From :func:`build_graph`.
        path: The PNG path.
        token: Draw :func:`paths_to_prediction` for this position; ``None`` draws the whole graph
            (edges above ``threshold``).
        threshold: Edge threshold (default: the graph's ``tau``).
        title: Figure title.

    Edge width is proportional to the weight; attention edges are blue, FFN edges orange,
    residual edges grey.
    """
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure  # no pyplot: no global backend, no figure manager

    tau = float(graph.graph["threshold"] if threshold is None else threshold)
    shown = graph if token is None else paths_to_prediction(graph, token, tau)
    n_tokens, n_layers = int(graph.graph["n_tokens"]), int(graph.graph["n_layers"])
    fig = Figure(figsize=(max(6.0, 1.2 * n_tokens + 2), max(5.0, 0.15 * (2 * n_layers + 1) + 2)))
    ax = fig.subplots()
    groups: dict[str, tuple[list, list]] = {"attn": ([], []), "ffn": ([], []), "resid": ([], [])}
    for u, v, d in shown.edges(data=True):
        if d["weight"] <= tau:
            continue
        ku, kv = shown.nodes[u]["kind"], shown.nodes[v]["kind"]
        group = (
            "ffn"
            if "M" in (ku, kv)
            else ("attn" if kv == "A" and d.get("attn", 0.0) > d.get("resid", 0.0) else "resid")
        )
        groups[group][0].append([_xy(shown, u), _xy(shown, v)])
        groups[group][1].append(0.5 + 6.0 * d["weight"])
    colours = {"attn": "tab:blue", "ffn": "tab:orange", "resid": "0.55"}
    for group, (segments, widths) in groups.items():
        if segments:
            ax.add_collection(
                LineCollection(segments, linewidths=widths, colors=colours[group], alpha=0.75, label=group)
            )
    xy = [_xy(shown, node) for node in shown.nodes]
    if xy:
        ax.scatter([p[0] for p in xy], [p[1] for p in xy], s=8, color="black", zorder=3)
    if token is not None:
        end = _xy(shown, shown.graph["target"])
        ax.scatter([end[0]], [end[1]], s=60, color="tab:red", zorder=4, label="prediction")
    tokens = graph.graph.get("tokens") or [str(t) for t in range(n_tokens)]
    ax.set_xticks(range(n_tokens))
    ax.set_xticklabels([repr(t)[:12] for t in tokens], rotation=60, ha="right", fontsize=7)
    ax.set_yticks([0] + [2 * layer + 2 for layer in range(n_layers)])
    ax.set_yticklabels(["embed"] + [f"L{layer}" for layer in range(n_layers)], fontsize=6)
    ax.set_xlim(-0.6, n_tokens - 0.4)
    ax.set_ylim(-0.6, 2 * n_layers + 0.6)
    ax.set_xlabel("token")
    ax.set_ylabel("layer (residual stream after)")
    ax.legend(loc="upper left", fontsize=7)
    ax.set_title(title or f"information-flow routes (tau = {tau:g}, width = share)")
    fig.tight_layout()
    return save_png(fig, path)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check_threshold(threshold: float) -> None:
    if (
        not isinstance(threshold, (int, float))
        or isinstance(threshold, bool)
        or not 0.0 <= threshold < 1.0
        or math.isnan(threshold)
    ):
        raise ValueError(f"threshold must be a number in [0, 1), got {threshold!r}")


def _n_tokens(llm: TransparentLlm, batch_i: int, n_tokens: Optional[int]) -> int:
    padded = int(llm.tokens().shape[1])
    if n_tokens is None:
        counter = getattr(llm, "n_tokens", None)
        return int(counter(batch_i)) if callable(counter) else padded
    if not 1 <= n_tokens <= padded:
        raise ValueError(f"n_tokens must be in 1..{padded}, got {n_tokens}")
    return int(n_tokens)


def _chunks(n: int, row_cost: int, budget: int) -> list[tuple[int, int]]:
    """Split targets ``0..n-1`` into ``[start, stop)`` chunks whose causal block
    ``(stop - start) * stop * (row_cost / n)`` stays within ``budget`` floats (at least one row),
    and at most ``ceil(n / 8)`` rows, so the blocks cover little more than the causal triangle."""
    if budget < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {budget}")
    per_source = max(1, row_cost // max(n, 1))
    max_rows = max(1, -(-n // 8))
    out, start = [], 0
    while start < n:
        stop = start + 1
        while stop < n and stop - start < max_rows and (stop + 1 - start) * (stop + 1) * per_source <= budget:
            stop += 1
        out.append((start, stop))
        start = stop
    return out


__all__ = [
    "DEFAULT_THRESHOLD",
    "Route",
    "attention_contributions",
    "build_graph",
    "contributions",
    "ffn_contributions",
    "graph_to_dict",
    "load_json",
    "node_name",
    "output_node",
    "paths_to_prediction",
    "plot_routes",
    "save_json",
    "strongest_paths",
    "threshold_and_renormalize",
]
