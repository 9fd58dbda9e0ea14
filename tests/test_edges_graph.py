"""The edge graph: numbering, TransformerLens's order, GQA / parallel / attention-only layouts, bad nodes."""

from __future__ import annotations

import pytest

from minterp_tl.edges import EdgeGraph, Node


@pytest.mark.parametrize("family", ["gpt2", "llama", "phi"])
def test_every_edge_round_trips(hf_model, family):
    model = hf_model(family)
    for per_position in (True, False):
        graph = EdgeGraph(model, 3, per_position=per_position)
        edges = graph.edges()
        assert len(edges) == graph.n_edges == len(set(edges))
        assert [graph.index(w, r) for w, r in edges] == list(range(graph.n_edges))
        assert graph.mask(edges).all()


def test_layouts(hf_model, toys):
    heads, layers = 4, 2
    gqa = EdgeGraph(hf_model("llama"), 1)  # 2 key/value heads
    readers = {(r.kind, r.layer, r.head) for _, r in gqa.edges()}
    assert ("k_input", 0, 1) in readers and ("k_input", 0, 2) not in readers and ("q_input", 0, 3) in readers
    # sequential: a layer's MLP reads that layer's heads; parallel (phi): it does not
    seq, par = EdgeGraph(hf_model("gpt2"), 1), EdgeGraph(hf_model("phi"), 1)
    head, mlp = Node("attn_head_out", 0, 1, 2), Node("mlp_in", 0, 1)
    assert seq.index(head, mlp) >= 0
    with pytest.raises(ValueError, match="reader comes before its writer.*parallel"):
        par.index(head, mlp)
    # writers: embed + per layer heads + MLP; each position has every writer into the logits
    assert len(seq.writers) == 1 + layers * (heads + 1)
    attn_only = EdgeGraph(toys["attn_only"], 2)
    assert not any(w.kind == "mlp_out" for w in attn_only.writers)
    with pytest.raises(ValueError, match="attention-only"):
        attn_only.index(Node("embed", 0), Node("mlp_in", 0, 1))


def test_bad_nodes_and_edges(hf_model):
    graph = EdgeGraph(hf_model("gpt2"), 4)
    with pytest.raises(ValueError, match="unknown node kind 'q_inptu'.*did you mean 'q_input'"):
        Node("q_inptu", 0, 1, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a head"):
        Node("q_input", 0, 1)
    with pytest.raises(ValueError, match="takes no layer"):
        Node("embed", 0, 1)
    embed = Node("embed", 0)
    with pytest.raises(ValueError, match=r"head must be in 0\.\.3"):
        graph.index(embed, Node("q_input", 0, 1, 7))
    with pytest.raises(ValueError, match=r"layer must be in 0\.\.1"):
        graph.index(embed, Node("q_input", 0, 5, 0))
    with pytest.raises(ValueError, match="reader comes before its writer"):
        graph.index(Node("attn_head_out", 0, 1, 0), Node("q_input", 0, 1, 0))
    with pytest.raises(ValueError, match="same position"):
        graph.index(Node("embed", 0), Node("q_input", 1, 1, 0))
    with pytest.raises(ValueError, match=r"position must be in 0\.\.3"):
        graph.index(Node("embed", 9), Node("logits", 9, 1))
    with pytest.raises(ValueError, match="not a writer"):
        graph.index(Node("q_input", 0, 1, 0), Node("logits", 0, 1))
    with pytest.raises(ValueError, match="edge number"):
        graph.mask([graph.n_edges])
    with pytest.raises(ValueError, match="an edge is"):
        graph.mask(["a0.1"])
