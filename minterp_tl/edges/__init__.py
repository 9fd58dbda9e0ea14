"""Edge-level circuits: the residual-stream edge graph, EAP / EAP-IG scores, exact edge patching, and
circuits with their faithfulness."""

from minterp_tl.edges.graph import READERS, WRITERS, Edge, EdgeGraph, Node
from minterp_tl.edges.scores import EdgeScores, edge_attribution

__all__ = ["READERS", "WRITERS", "Edge", "EdgeGraph", "EdgeScores", "Node", "edge_attribution"]
