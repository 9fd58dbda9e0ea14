"""Routes: the contribution graph against a direct, unoptimised implementation of the formulas written
here (from run_with_cache activations), the induction circuit of the trained model, paths, export, plot."""

from __future__ import annotations

import itertools
import json
import os

import networkx as nx
import pytest
import torch

from minterp_tl import routes
from minterp_tl.models import induction_report, repeated_random_tokens
from minterp_tl.transparent import TransformerLensTransparentLlm

# ---------------------------------------------------------------------------------------------
# the reference: the design notes' formulas, one vector at a time
# ---------------------------------------------------------------------------------------------


def _norm(x: torch.Tensor, p: int) -> float:
    return float(torch.linalg.vector_norm(x, ord=p))


def _shares(parts: list[torch.Tensor], whole: torch.Tensor, tau: float, p: int = 1) -> list[float]:
    c = [max(_norm(whole, p) - _norm(whole - part, p), 1e-5) for part in parts]
    total = sum(c)
    c = [x / total for x in c]
    c = [x if x > tau else 0.0 for x in c]
    total = sum(c)
    return [x / total for x in c] if total > 0 else c


def reference_graph(model, tokens: list[int], tau: float, p: int = 1) -> dict[tuple[str, str], float]:
    """Edge -> weight, built with Python loops from the cache of a separate forward pass."""
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([tokens]))
    n, n_heads = len(tokens), model.cfg.n_heads
    edges: dict[tuple[str, str], float] = {}

    def add(u: str, v: str, w: float) -> None:
        if w > 0:
            edges[(u, v)] = edges.get((u, v), 0.0) + w

    for layer in range(model.cfg.n_layers):
        src = (lambda s: f"X0_{s}") if layer == 0 else (lambda s, l=layer: f"I{l - 1}_{s}")
        pre = cache[f"blocks.{layer}.hook_resid_pre"][0]
        post = cache[f"blocks.{layer}.hook_resid_post"][0]
        mid = post if model.cfg.attn_only else cache[f"blocks.{layer}.hook_resid_mid"][0]
        v = cache[f"blocks.{layer}.attn.hook_v"][0]  # [pos, kv_head, d_head]
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]  # [head, query, key]
        w_o = model.blocks[layer].attn.W_O.detach()
        group = n_heads // v.shape[1]
        for t in range(n):
            keys, parts = [], []
            for s in range(t + 1):
                for h in range(n_heads):
                    keys.append(s)
                    parts.append(pattern[h, t, s] * (v[s, h // group] @ w_o[h]))
            shares = _shares(parts + [pre[t]], mid[t], tau, p)
            for s, c in zip(keys, shares[:-1]):
                add(src(s), f"A{layer}_{t}", c)
            add(src(t), f"A{layer}_{t}", shares[-1])
            mlp_out = (
                torch.zeros_like(post[t])
                if model.cfg.attn_only
                else cache[f"blocks.{layer}.hook_mlp_out"][0, t]
            )
            c_ffn, c_res = _shares([mlp_out, mid[t]], post[t], tau, p)
            add(f"A{layer}_{t}", f"M{layer}_{t}", c_ffn)
            add(f"M{layer}_{t}", f"I{layer}_{t}", c_ffn)
            add(f"A{layer}_{t}", f"I{layer}_{t}", c_res)
    return edges


# 17 tokens, so a chunk of the attention decomposition holds several target rows (ceil(17 / 8) = 3)
# and sources after a target inside a chunk must be left out; the second prompt is shorter (padded).
PROMPTS = [[3, 17, 5, 42, 8, 1, 30, 3, 9, 17, 5, 22, 48, 0, 13, 8, 1], [11, 2, 29, 7, 40]]


@pytest.mark.parametrize("tau, p", [(0.0, 1), (0.04, 1), (0.04, 2)])
def test_graph_equals_the_direct_implementation(toy, tau, p):
    """The graph against loops over a separate forward pass, with the L1 and the L2 distance (the tool's
    ``distance_norm``)."""
    llm = TransformerLensTransparentLlm(toy)
    llm.run(PROMPTS)
    for batch_i in (0, 1):  # batch 1 is shorter and padded: the tool indexed it wrongly
        graph = routes.build_graph(llm, batch_i, threshold=tau, progress=False, distance_norm=p)
        assert graph.graph["distance_norm"] == p
        expected = reference_graph(toy, PROMPTS[batch_i], tau, p)
        got = {(u, v): d["weight"] for u, v, d in graph.edges(data=True)}
        assert set(got) == set(expected)
        worst = max(abs(got[e] - expected[e]) for e in expected)
        assert worst < 1e-5, worst
        assert graph.number_of_nodes() == len(PROMPTS[batch_i]) * (3 * toy.cfg.n_layers + 1)


def test_head_breakdown_and_chunking(toys):
    model = toys["gqa"]
    llm = TransformerLensTransparentLlm(model)
    llm.run(PROMPTS)
    graph = routes.build_graph(llm, 0, threshold=0.0, progress=False)
    # the smallest chunk budget (one target row per chunk) gives the same graph
    tiny = routes.build_graph(llm, 0, threshold=0.0, chunk_elements=1, progress=False)
    assert set(graph.edges) == set(tiny.edges)
    assert max(abs(graph.edges[e]["weight"] - tiny.edges[e]["weight"]) for e in graph.edges) < 1e-6
    c_attn, c_resid = routes.attention_contributions(llm, 0, 2)
    for t in range(len(PROMPTS[0])):
        for s in range(t + 1):
            data = graph.edges[f"I1_{s}", f"A2_{t}"]
            assert data["heads"] == pytest.approx(c_attn[t, s].tolist(), abs=1e-7)
            assert data["weight"] == pytest.approx(
                sum(data["heads"]) + (float(c_resid[t]) if s == t else 0.0), abs=1e-6
            )
    # every representation's shares sum to 1: in-edges of A and I nodes
    for node, d in graph.nodes(data=True):
        if d["kind"] in ("A", "I"):
            assert sum(w for _, _, w in graph.in_edges(node, data="weight")) == pytest.approx(1.0, abs=1e-5)


def test_one_layer_decomposition_at_a_time(toys):
    """The graph asks for at most chunk_elements of decomposition at once, never a whole layer of a
    long prompt, and never calls the full decomposed_attn."""
    llm = TransformerLensTransparentLlm(toys["ln"])
    tokens = torch.arange(40)[None] % 50
    llm.run(tokens)
    sizes: list[int] = []
    rows = llm.decomposed_attn_rows

    def spy(*args):
        out = rows(*args)
        sizes.append(out.numel())
        return out

    def forbidden(*args):
        raise AssertionError("build_graph must not build a whole layer's decomposition")

    llm.decomposed_attn_rows = spy
    llm.decomposed_attn = forbidden
    one_layer = 40 * 40 * 4 * 32
    budget = one_layer // 10
    routes.build_graph(llm, 0, chunk_elements=budget, progress=False)
    assert max(sizes) <= budget < one_layer
    # the causal triangle is covered with little waste: < 0.7 of the full square per layer
    assert sum(sizes) / 4 < 0.7 * one_layer


def test_contribution_formulas_by_hand():
    parts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    whole = torch.tensor([1.0, 1.0])
    # |w|_1 = 2; |w - p|_1 = 1, 1, 4  ->  1, 1, floor 1e-5
    c = routes.contributions(parts, whole)
    assert c.tolist() == pytest.approx([1 / (2 + 1e-5), 1 / (2 + 1e-5), 1e-5 / (2 + 1e-5)], rel=1e-6)
    blocks, resid = routes.threshold_and_renormalize(
        torch.tensor([[0.5, 0.03, 0.17]]), torch.tensor([0.3]), 0.04
    )
    assert blocks.tolist()[0] == pytest.approx([0.5 / 0.97, 0.0, 0.17 / 0.97])
    assert resid.tolist() == pytest.approx([0.3 / 0.97])
    with pytest.raises(ValueError, match=r"threshold must be a number in \[0, 1\)"):
        routes.threshold_and_renormalize(blocks, resid, 1.5)
    # L2 (the tool's distance_norm=2): |w|_2 = sqrt 2; |w - p|_2 = 1, 1, sqrt 13
    c2 = routes.contributions(parts, whole, 2)
    first = 2**0.5 - 1
    assert c2.tolist() == pytest.approx(
        [first / (2 * first + 1e-5)] * 2 + [1e-5 / (2 * first + 1e-5)], rel=1e-6
    )
    for bad in (0, 3, "l2", True):
        with pytest.raises(ValueError, match="distance_norm must be 1"):
            routes.contributions(parts, whole, bad)


# ---------------------------------------------------------------------------------------------
# the induction circuit
# ---------------------------------------------------------------------------------------------


def test_induction_route(induction_model):
    """Second half of [BOS, A, A]: the prediction at i (of token i + 1 = token i - L + 1) reads, in
    layer 1, the position after the earlier occurrence (i - L + 1) through induction heads; that
    position got its token from its predecessor through layer 0's previous-token head."""
    length = 11  # held out in training
    report = induction_report(induction_model, length)
    tokens = repeated_random_tokens(1, length, 64, torch.Generator().manual_seed(7))
    llm = TransformerLensTransparentLlm(induction_model)
    llm.run(tokens)
    graph = routes.build_graph(llm, 0, progress=False)
    prev_layer, prev_head = report.best_prev_token_head()
    assert prev_layer == 0
    path_starts = 0
    for i in range(length + 1, 2 * length):
        source = i - length + 1
        into = {u: d for u, _, d in graph.in_edges(f"A1_{i}", data=True)}
        strongest = max(into, key=lambda u: into[u]["attn"])
        assert strongest == f"I0_{source}", (i, strongest)
        heads = into[strongest]["heads"]
        top = max(range(len(heads)), key=heads.__getitem__)
        assert float(report.induction_scores[1, top]) > 0.3  # an induction head of layer 1
        assert float(llm.attention_matrix(0, 1, top)[i, source]) > 0.3  # attending to i - L + 1 here
        # layer 0 at the source: the previous token arrives through the previous-token head
        prev = graph.edges[f"X0_{source - 1}", f"A0_{source}"]["heads"]
        assert max(range(len(prev)), key=prev.__getitem__) == prev_head
        best = routes.strongest_paths(graph, token=i, k=1)[0]
        path_starts += best.nodes[0] in (f"X0_{source}", f"X0_{source - 1}")
        assert f"I0_{source}" in best.nodes[:4] or best.nodes[2] == f"I0_{i}"
    assert path_starts >= length - 3  # the strongest route carries the token to predict (or its cue)


# ---------------------------------------------------------------------------------------------
# paths, export, plot
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ln_graph(toys):
    llm = TransformerLensTransparentLlm(toys["ln"])
    llm.run([PROMPTS[0][:5]])
    return routes.build_graph(llm, 0, threshold=0.04, progress=False)


def test_paths_to_prediction_are_the_thresholded_ancestors(ln_graph):
    tau = 0.08
    sub = routes.paths_to_prediction(ln_graph, token=-1, threshold=tau)
    end = "I3_4"
    assert sub.graph["target"] == end
    kept = nx.DiGraph([(u, v) for u, v, w in ln_graph.edges(data="weight") if w > tau])
    ancestors = nx.ancestors(kept, end)
    assert set(sub.nodes) == ancestors | {end}
    assert set(sub.edges) == {(u, v) for u, v in kept.edges if v in ancestors | {end}}
    assert all(w > tau for _, _, w in sub.edges(data="weight"))


def test_strongest_paths_match_brute_force(ln_graph):
    tau = 0.04
    sub = routes.paths_to_prediction(ln_graph, token=2, threshold=tau)
    brute = []
    for start in (n for n in sub if n.startswith("X0_")):
        for path in nx.all_simple_paths(sub, start, "I3_2"):
            w = 1.0
            for u, v in itertools.pairwise(path):
                w *= sub.edges[u, v]["weight"]
            brute.append((w, tuple(path)))
    brute.sort(key=lambda x: -x[0])
    got = routes.strongest_paths(ln_graph, token=2, k=4, threshold=tau)
    assert [r.weight for r in got] == pytest.approx([w for w, _ in brute[:4]], rel=1e-9)
    assert got[0].nodes == brute[0][1]
    assert got[0].nodes[0].startswith("X0_") and got[0].nodes[-1] == "I3_2"
    route = routes.Route(0.5, ("X0_1", "A0_1", "M0_1", "I0_1", "A1_2", "I1_2"))
    assert route.describe(["a", "b", "c"]) == "0.5000  'b'@1 -> ffn L0 -> attn L1 -> 'c'@2 -> I1_2"


def test_json_round_trip_and_png(ln_graph, tmp_path):
    path = routes.save_json(ln_graph, tmp_path / "routes.json")
    assert os.listdir(tmp_path) == ["routes.json"]  # no temporary file left behind
    data = json.loads(path.read_text())
    assert (
        data["n_layers"] == 4 and data["n_tokens"] == 5 and len(data["edges"]) == ln_graph.number_of_edges()
    )
    back = routes.load_json(path)
    assert set(back.edges) == set(ln_graph.edges)
    assert all(back.edges[e] == ln_graph.edges[e] for e in ln_graph.edges)
    assert dict(back.nodes(data=True)) == dict(ln_graph.nodes(data=True))
    png = routes.plot_routes(ln_graph, tmp_path / "routes.png", token=-1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    whole = routes.plot_routes(ln_graph, tmp_path / "all.png", token=None)
    assert whole.stat().st_size > 5000


def test_bad_input(ln_graph, toys):
    with pytest.raises(ValueError, match="token=5 is out of range"):
        routes.paths_to_prediction(ln_graph, token=5)
    with pytest.raises(ValueError, match="k must be an integer in 1..1000"):
        routes.strongest_paths(ln_graph, k=0)
    llm = TransformerLensTransparentLlm(toys["ln"])
    llm.run([PROMPTS[0]])
    with pytest.raises(ValueError, match="batch_i=1 is out of range"):
        routes.build_graph(llm, 1, progress=False)
    with pytest.raises(ValueError, match="threshold"):
        routes.build_graph(llm, 0, threshold=-0.1, progress=False)


def test_smollm2_graph(smollm2):
    llm = TransformerLensTransparentLlm(smollm2)
    llm.run(["The capital of France is"])
    graph = routes.build_graph(llm, 0, progress=False)
    assert graph.graph["tokens"] == smollm2.to_str_tokens("The capital of France is")
    for node, d in graph.nodes(data=True):
        if d["kind"] in ("A", "I"):
            total = sum(w for _, _, w in graph.in_edges(node, data="weight"))
            assert total == pytest.approx(1.0, abs=1e-5)
    best = routes.strongest_paths(graph, token=-1, k=3)
    assert len(best) == 3 and best[0].weight >= best[1].weight >= best[2].weight > 0
    assert all(r.nodes[-1] == "I29_5" for r in best)
