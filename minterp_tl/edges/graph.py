"""The residual-stream edge graph: who writes into the stream, who reads from it, and every edge between.

Nodes and edges are TransformerLens 4.3's (``tools.analysis.attribution_patching``): *writers* are the
embeddings (``"embed"``), each head's output (``"attn_head_out"``) and each MLP's output (``"mlp_out"``);
*readers* are each head's query, key and value input (``"q_input"``, ``"k_input"``, ``"v_input"``), each
MLP's input (``"mlp_in"``) and the logits (``"logits"``, read at the last block's ``hook_resid_post``).
An edge joins a writer to every reader after it at the same position: the residual stream is a running
sum, so a reader's input is the sum of the writes before it (plus constants such as biases).

On GQA/MQA models the key and value readers are per key/value head (``n_key_value_heads`` of them), the
inputs those projections really have. On parallel blocks (GPT-NeoX, Phi-2) a layer's MLP reads the block
input, so that layer's heads do not write into it. Edges are numbered position by position, in
TransformerLens's order (readers by layer, q/k/v/mlp; writers embed, then each layer's heads and MLP);
with ``per_position=False`` one edge stands for the same edge at every position.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from jaxtyping import Bool
from torch import Tensor

from minterp_tl._checks import did_you_mean, positive_int
from minterp_tl.hooks import n_heads

NodeKind = Literal["embed", "attn_head_out", "mlp_out", "q_input", "k_input", "v_input", "mlp_in", "logits"]
WRITERS = ("embed", "attn_head_out", "mlp_out")
READERS = ("q_input", "k_input", "v_input", "mlp_in", "logits")
_HEADED = ("attn_head_out", "q_input", "k_input", "v_input")
_SHORT = {
    "attn_head_out": "",
    "q_input": ".q",
    "k_input": ".k",
    "v_input": ".v",
    "mlp_out": "",
    "mlp_in": ".in",
}


@dataclass(frozen=True)
class Node:
    """A writer or reader of the residual stream (TransformerLens's ``Node``, with the same fields).

    Attributes:
        kind: One of :data:`WRITERS` or :data:`READERS`.
        position: The position it is read or written at; ``None`` in a graph built with
            ``per_position=False`` (then the node stands for every position).
        layer: Its block (``None`` for ``"embed"``; the last block for ``"logits"``).
        head: Its head (``"attn_head_out"``; ``"q_input"``; ``"k_input"`` / ``"v_input"``, where on
            GQA models it counts key/value heads); ``None`` otherwise.
    """

    kind: NodeKind
    position: Optional[int] = None
    layer: Optional[int] = None
    head: Optional[int] = None

    def __post_init__(self) -> None:
        if self.kind not in WRITERS + READERS:
            raise ValueError(
                f"unknown node kind {self.kind!r}{did_you_mean(self.kind, WRITERS + READERS)}; valid kinds: "
                f"{list(WRITERS + READERS)}"
            )
        if (self.layer is None) != (self.kind == "embed"):
            raise ValueError(
                f"a {self.kind!r} node {'takes no' if self.kind == 'embed' else 'needs a'} layer"
            )
        if (self.head is None) == (self.kind in _HEADED):
            raise ValueError(f"a {self.kind!r} node {'needs a' if self.kind in _HEADED else 'takes no'} head")

    @property
    def label(self) -> str:
        """Short name: ``embed``, ``a1.3`` (head 3 of block 1), ``a2.0.k``, ``m1``, ``m1.in``, ``logits``;
        ``@p`` is appended for a node at one position."""
        name: str = self.kind
        if self.kind not in ("embed", "logits"):
            letter = "a" if self.kind in _HEADED else "m"
            head = f".{self.head}" if self.head is not None else ""
            name = f"{letter}{self.layer}{head}{_SHORT[self.kind]}"
        return name if self.position is None else f"{name}@{self.position}"


Edge = tuple[Node, Node]


@dataclass(frozen=True)
class _Group:
    """Readers of one kind in one block (the logits: one reader), stored contiguously per position."""

    kind: str
    layer: int
    size: int  # readers in the group (heads, or 1)
    avail: int  # writers before each of them: writer ids 0..avail-1
    offset: int  # first edge slot of the group within a position


class EdgeGraph:
    """Every writer -> reader edge of ``model`` on prompts of ``n_pos`` tokens.

    Args:
        model: A ``TransformerBridge`` (its config sizes the graph).
        n_pos: Tokens per prompt.
        per_position: One edge per position (TransformerLens's graph, default), or one edge for all.

    Attributes:
        n_edges: Number of edges; edge ``i`` is :meth:`edge` ``(i)``.
        writers: The writer nodes without position, by writer id (embed, then per block its heads, then
            its MLP).
        groups: The reader groups in edge order.
    """

    def __init__(self, model: Any, n_pos: int, *, per_position: bool = True) -> None:
        cfg = model.cfg
        self.n_pos = positive_int(n_pos, "n_pos")
        self.per_position = bool(per_position)
        self.n_layers = int(cfg.n_layers)
        self.n_heads = n_heads(model, "attn.hook_q")
        self.n_kv_heads = n_heads(model, "attn.hook_k")
        self.has_mlp = not bool(getattr(cfg, "attn_only", False))
        self.parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
        per_layer = self.n_heads + int(self.has_mlp)
        self.writers: list[Node] = [Node("embed")]
        for layer in range(self.n_layers):
            self.writers += [Node("attn_head_out", layer=layer, head=h) for h in range(self.n_heads)]
            self.writers += [Node("mlp_out", layer=layer)] if self.has_mlp else []
        groups: list[_Group] = []
        offset = 0
        for layer in range(self.n_layers):
            before = 1 + layer * per_layer
            kinds = [("q_input", self.n_heads, before), ("k_input", self.n_kv_heads, before)]
            kinds.append(("v_input", self.n_kv_heads, before))
            if self.has_mlp:
                kinds.append(("mlp_in", 1, before if self.parallel else before + self.n_heads))
            for kind, size, avail in kinds:
                groups.append(_Group(kind, layer, size, avail, offset))
                offset += size * avail
        groups.append(_Group("logits", self.n_layers - 1, 1, len(self.writers), offset))
        self.groups: tuple[_Group, ...] = tuple(groups)
        self.per_slot = offset + len(self.writers)  # edges at one position
        self.n_edges = self.per_slot * (self.n_pos if self.per_position else 1)
        self._starts = torch.tensor([g.offset for g in groups])
        self._by_key = {(g.kind, g.layer): g for g in groups}

    # -- numbering --------------------------------------------------------------------------------------

    def _writer_id(self, node: Node) -> int:
        if node.kind == "embed":
            return 0
        layer = self._layer(node)
        base = 1 + layer * (self.n_heads + int(self.has_mlp))
        if node.kind == "mlp_out":
            if not self.has_mlp:
                raise ValueError(f"{node.label}: this model is attention-only (no MLP writers)")
            return base + self.n_heads
        return base + self._head(node, self.n_heads)

    def _layer(self, node: Node) -> int:
        if not (isinstance(node.layer, int) and 0 <= node.layer < self.n_layers):
            raise ValueError(f"{node.label}: layer must be in 0..{self.n_layers - 1}, got {node.layer!r}")
        return node.layer

    def _head(self, node: Node, n: int) -> int:
        if not (isinstance(node.head, int) and 0 <= node.head < n):
            raise ValueError(f"{node.label}: head must be in 0..{n - 1} for {node.kind!r}, got {node.head!r}")
        return node.head

    def _position(self, writer: Node, reader: Node) -> int:
        if writer.position != reader.position:
            raise ValueError(
                f"edge {writer.label} -> {reader.label}: an edge joins a writer and a reader at the same "
                "position (attention moves information between positions inside a head)"
            )
        if not self.per_position:
            if writer.position is not None:
                raise ValueError(f"{writer.label}: this graph has no positions (per_position=False)")
            return 0
        p = writer.position
        if not (isinstance(p, int) and 0 <= p < self.n_pos):
            raise ValueError(f"{writer.label}: position must be in 0..{self.n_pos - 1}, got {p!r}")
        return p

    def index(self, writer: Node, reader: Node) -> int:
        """The number of the edge ``writer -> reader``; a clear error for an unknown node, a writer that
        is a reader (or the reverse), or a reader before its writer."""
        if writer.kind not in WRITERS:
            raise ValueError(f"{writer.label} is not a writer (writers: {list(WRITERS)})")
        if reader.kind not in READERS:
            raise ValueError(f"{reader.label} is not a reader (readers: {list(READERS)})")
        p = self._position(writer, reader)
        w = self._writer_id(writer)
        if reader.kind == "logits":
            if reader.layer != self.n_layers - 1:
                raise ValueError(f"the logits reader is at layer {self.n_layers - 1}, got {reader.layer!r}")
            group, slot = self.groups[-1], 0
        else:
            layer = self._layer(reader)
            if reader.kind == "mlp_in" and not self.has_mlp:
                raise ValueError(f"{reader.label}: this model is attention-only (no MLP readers)")
            group = self._by_key[(reader.kind, layer)]
            slot = 0 if reader.kind == "mlp_in" else self._head(reader, group.size)
        if w >= group.avail:
            raise ValueError(
                f"edge {writer.label} -> {reader.label}: the reader comes before its writer (a reader at "
                f"block {group.layer} reads writers of earlier blocks"
                + (", and of its own block's heads for an MLP input" if group.kind == "mlp_in" else "")
                + (" only; on parallel blocks an MLP reads the block input)" if self.parallel else ")")
            )
        return p * self.per_slot + group.offset + slot * group.avail + w

    def edge(self, i: int) -> Edge:
        """Edge number ``i`` as ``(writer, reader)``."""
        if not (isinstance(i, int) and 0 <= i < self.n_edges):
            raise ValueError(f"edge number must be in 0..{self.n_edges - 1}, got {i!r}")
        p, j = divmod(i, self.per_slot)
        position = p if self.per_position else None
        g = self.groups[int(torch.searchsorted(self._starts, j, right=True)) - 1]
        slot, w = divmod(j - g.offset, g.avail)
        writer = self.writers[w]
        writer = Node(writer.kind, position, writer.layer, writer.head)
        head = slot if g.kind in _HEADED else None
        return writer, Node(g.kind, position, g.layer, head)  # type: ignore[arg-type]

    def edges(self) -> list[Edge]:
        """All edges, in order (a Python list: for small graphs; large ones are handled as tensors)."""
        return [self.edge(i) for i in range(self.n_edges)]

    def mask(self, edges: Iterable[Any]) -> Bool[Tensor, " n_edges"]:
        """A boolean mask over the edges from edge numbers, ``(writer, reader)`` pairs,
        ``(writer, reader, score)`` triples (what ``top`` returns), or a mask of this graph."""
        if isinstance(edges, Tensor) and edges.dtype == torch.bool:
            if edges.shape != (self.n_edges,):
                raise ValueError(f"an edge mask must have shape ({self.n_edges},), got {tuple(edges.shape)}")
            return edges.cpu()
        out = torch.zeros(self.n_edges, dtype=torch.bool)
        for item in edges:
            if isinstance(item, Tensor) and item.ndim == 0:
                item = int(item)
            if isinstance(item, int) and not isinstance(item, bool):
                self.edge(item)  # checks the range
                out[item] = True
            elif (
                isinstance(item, Sequence)
                and len(item) in (2, 3)
                and all(isinstance(n, Node) for n in item[:2])
            ):
                out[self.index(item[0], item[1])] = True
            else:
                raise ValueError(
                    f"an edge is an edge number, a (writer, reader) pair of Nodes or a (writer, reader, "
                    f"score) triple; got {item!r}"
                )
        return out

    def group_slice(self, g: _Group) -> slice:
        """The edge slots of group ``g`` within a position."""
        return slice(g.offset, g.offset + g.size * g.avail)


def graph_for(model: Any, n_pos: int, graph: Optional[EdgeGraph], per_position: bool) -> EdgeGraph:
    """``graph``, checked to fit ``model`` on ``n_pos`` tokens, or a new one."""
    if graph is None:
        return EdgeGraph(model, n_pos, per_position=per_position)
    if not isinstance(graph, EdgeGraph):
        raise ValueError(f"graph must be an EdgeGraph, got {type(graph).__name__}")
    fresh = EdgeGraph(model, n_pos, per_position=graph.per_position)
    if (fresh.n_edges, fresh.groups) != (graph.n_edges, graph.groups):
        raise ValueError(
            f"graph was built for another model or prompt length (it has {graph.n_edges} edges; this "
            f"model on {n_pos} tokens has {fresh.n_edges})"
        )
    return graph


__all__ = ["READERS", "WRITERS", "Edge", "EdgeGraph", "Node", "graph_for"]
