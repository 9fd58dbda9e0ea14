"""Circuits from edge scores on the trained induction model: the known circuit, faithfulness, pruning,
EAP-IG against EAP and exact patching, the curve and the graph."""

from __future__ import annotations

import pytest
import torch

from minterp_tl.attribution import compare
from minterp_tl.edges import edge_attribution
from minterp_tl.edges.circuits import (
    circuit_graph,
    faithfulness,
    faithfulness_curve,
    greedy_order,
    plot_circuit,
    prune,
    save_circuit,
    top_edges,
)
from minterp_tl.edges.patch import edge_patch
from minterp_tl.induction import repeated_random_tokens
from minterp_tl.routes import load_json

L = 8


def _task():
    g = torch.Generator().manual_seed(0)
    clean = repeated_random_tokens(4, L, 64, generator=g)
    corrupted = clean.clone()
    corrupted[:, 1 : 1 + L] = repeated_random_tokens(4, L, 64, generator=g)[:, 1 : 1 + L]

    def metric(logits):
        return logits[:, L:-1].log_softmax(-1).gather(-1, clean[:, L + 1 :, None]).mean()

    return clean, corrupted, metric


def test_induction_circuit(induction_model, tmp_path):
    model = induction_model
    clean, corrupted, metric = _task()
    eap = edge_attribution(model, clean, corrupted, metric)
    ig = edge_attribution(model, clean, corrupted, metric, ig_steps=10)
    graph = ig.graph
    top = ig.top(20)
    # induction heads (layer 1) into the logits lead; a previous-token head (layer 0) into a layer-1 key
    assert top[0][0].kind == "attn_head_out" and top[0][0].layer == 1 and top[0][1].kind == "logits"
    assert any(w.kind == "attn_head_out" and w.layer == 0 and r.kind == "k_input" for w, r, _ in top)
    # a greedy, pruned circuit of at most 10% of the edges recovers at least 90% of the gap
    n = graph.n_edges // 10
    mask = torch.zeros(graph.n_edges, dtype=torch.bool)
    mask[greedy_order(ig, n)] = True
    pruned = prune(graph, mask)
    assert int(pruned.sum()) < int(mask.sum())
    share = faithfulness(model, clean, corrupted, [mask, pruned, top_edges(ig, 0)], metric, graph=graph)
    assert share[0] >= 0.9 and abs(float(share[0] - share[1])) < 1e-4  # pruning changes nothing
    assert abs(float(share[2])) < 1e-4
    # EAP-IG ranks the exact noising effects of single edges better than EAP (Hanna et al.'s comparison)
    exact = -(
        edge_patch(model, clean, corrupted, [[i] for i in range(graph.n_edges)], metric) - ig.clean_metric
    )
    assert compare(ig.scores, exact).spearman >= compare(eap.scores, exact).spearman
    curve = faithfulness_curve(model, clean, corrupted, ig, metric, greedy=True)
    assert curve.smallest(0.9) is not None and curve.smallest(0.9) <= graph.n_edges // 10
    assert curve.plot(tmp_path / "curve.png").stat().st_size > 0
    circuit = circuit_graph(graph, pruned, ig)
    # the graph holds the two steps of induction: a layer-0 head into a layer-1 head's key, and a layer-1
    # head into the logits; its edges' scores are the summed scores of the circuit's edges
    kinds = {
        (circuit.nodes[u]["layer"], circuit.nodes[v]["kind"], tuple(d["inputs"]))
        for u, v, d in circuit.edges(data=True)
    }
    assert any(layer == 0 and any(i.startswith("k") for i in inputs) for layer, _, inputs in kinds)
    assert any(layer == 1 and kind == "logits" for layer, kind, _ in kinds)
    total = sum(d["score"] for _, _, d in circuit.edges(data=True))
    assert abs(total - float(ig.scores[pruned].sum())) < 1e-4
    with pytest.raises(ValueError, match="is a folder"):
        plot_circuit(circuit, tmp_path)  # a folder as the PNG path: refused before anything is written
    assert (
        load_json(save_circuit(circuit, tmp_path / "c.json")).number_of_edges() == circuit.number_of_edges()
    )
    assert plot_circuit(circuit, tmp_path / "c.png").stat().st_size > 0
    with pytest.raises(ValueError, match="circuit size must be an integer"):
        faithfulness_curve(model, clean, corrupted, ig, metric, sizes=[10.5])


def test_one_edge_for_all_positions(induction_model):
    """per_position=False: pruning still changes no faithfulness value, and every edge kept is the sum of
    its positions (EAP is linear in the positions)."""
    clean, corrupted, metric = _task()
    per_pos = edge_attribution(induction_model, clean, corrupted, metric)
    merged = edge_attribution(induction_model, clean, corrupted, metric, per_position=False)
    summed = per_pos.scores.view(-1, merged.graph.per_slot).sum(0)
    assert torch.allclose(merged.scores, summed, atol=1e-5)
    graph = merged.graph
    mask = top_edges(merged, 40)
    pruned = prune(graph, mask)
    share = faithfulness(induction_model, clean, corrupted, [mask, pruned], metric, graph=graph)
    assert abs(float(share[0] - share[1])) < 1e-4


def test_greedy_order_equals_its_definition(induction_model):
    """The heap-based greedy order is the step-by-step definition: each step takes the largest |score|
    among the edges whose reader is the logits or belongs to a head already written from (a key/value
    reader: any head of its group)."""
    clean, corrupted, metric = _task()
    scores = edge_attribution(induction_model, clean, corrupted, metric, ig_steps=3)
    graph = scores.graph
    left, connected, expected = scores.scores.abs().tolist(), {"logits"}, []
    edges = graph.edges()
    group = graph.n_heads // graph.n_kv_heads

    def component(node):
        if node.kind == "logits":
            return "logits"
        if node.kind in ("k_input", "v_input"):
            return ("kv", node.layer, node.head)
        return (
            "mlp" if node.kind in ("mlp_in", "mlp_out") else "head",
            node.layer,
            node.head if "q" in node.kind or node.kind == "attn_head_out" else None,
        )

    for _ in range(300):
        best = max(
            (i for i in range(graph.n_edges) if left[i] >= 0 and component(edges[i][1]) in connected),
            key=lambda i: (left[i], -i),
        )
        expected.append(best)
        left[best] = -1.0
        writer = edges[best][0]
        if writer.kind != "embed":
            connected.add(component(writer))
            if writer.kind == "attn_head_out":
                connected.add(("kv", writer.layer, writer.head // group))
    assert greedy_order(scores, 300).tolist() == expected
