"""Edge-level circuits: the residual-stream edge graph (:mod:`~minterp_tl.edges.graph`), EAP / EAP-IG scores
(:mod:`~minterp_tl.edges.scores`), exact batched edge patching (:mod:`~minterp_tl.edges.patch`), and
circuits with their faithfulness (:mod:`~minterp_tl.edges.circuits`)."""

from minterp_tl.edges.circuits import (
    FaithfulnessCurve,
    circuit_graph,
    faithfulness,
    faithfulness_curve,
    greedy_order,
    plot_circuit,
    prune,
    save_circuit,
    top_edges,
)
from minterp_tl.edges.graph import READERS, WRITERS, Edge, EdgeGraph, Node
from minterp_tl.edges.patch import edge_patch
from minterp_tl.edges.scores import EdgeScores, edge_attribution

__all__ = [
    "READERS",
    "WRITERS",
    "Edge",
    "EdgeGraph",
    "EdgeScores",
    "FaithfulnessCurve",
    "Node",
    "circuit_graph",
    "edge_attribution",
    "edge_patch",
    "faithfulness",
    "faithfulness_curve",
    "greedy_order",
    "plot_circuit",
    "prune",
    "save_circuit",
    "top_edges",
]
