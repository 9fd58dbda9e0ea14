"""The explorer's answers (what the page shows) against the model itself, on SmolLM2."""

from __future__ import annotations

import pytest
import torch

from minterp_tl.explorer import Explorer
from minterp_tl.lens import logit_lens
from minterp_tl.routes import build_graph, strongest_paths

PROMPT, CORRUPTED = "The capital of France is", "The capital of Italy is"


@pytest.fixture(scope="module")
def explorer(smollm2):
    e = Explorer(smollm2)
    e.run(PROMPT)
    return e


def test_run_graph_and_paths(explorer, smollm2):
    out = explorer.run(PROMPT)
    assert out["tokens"][-1] == " is" and out["prediction"][0]["token"] == " Paris"
    with torch.no_grad():
        probs = smollm2(smollm2.to_tokens(PROMPT))[0, -1].softmax(-1)
    assert out["prediction"][0]["value"] == pytest.approx(float(probs.max()), abs=1e-5)
    loose, tight = explorer.graph(threshold=0.02), explorer.graph(threshold=0.1)
    assert len(tight["edges"]) < len(loose["edges"])  # a higher threshold draws fewer edges
    graph = build_graph(explorer.llm, 0, threshold=0.02, progress=False)
    expected = strongest_paths(graph, -1, k=5)
    assert [p["nodes"] for p in loose["paths"]] == [list(r.nodes) for r in expected]


def test_clicks_match_the_model(explorer, smollm2):
    model = smollm2
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    _, ids = logit_lens(model, PROMPT).top_k(1)  # [layer, batch, pos, 1]: an independent readout

    def text(i: int) -> str:
        return model.to_string([i])

    rep = explorer.representation(20, 3)  # the output of block 20 = lens row 21
    assert rep["top"][0]["token"] == text(int(ids[21, 0, 3, 0]))
    table = explorer.lens()
    assert [row[3]["token"] for row in table["cells"]] == [text(int(i)) for i in ids[:, 0, 3, 0]]
    # a head's pushes: its z @ W_O projected by W_U (no final norm)
    head = explorer.head(23, 5, 4)
    write = cache["blocks.23.attn.hook_z"][0, 5, 4] @ model.blocks[23].attn.W_O[4]
    expected = (write @ model.W_U).topk(3).indices.tolist()
    assert [t["token"] for t in head["promoted"][:3]] == [text(i) for i in expected]
    neuron = explorer.neuron(29, 5)
    expected = (model.blocks[29].mlp.W_out[5] @ model.W_U).topk(3).indices.tolist()
    assert [t["token"] for t in neuron["promoted"][:3]] == [text(i) for i in expected]
    # the edge panel names the head the graph's edge gives the largest share
    graph = build_graph(explorer.llm, 0, threshold=0.0, progress=False)
    shares = graph.edges["I22_4", "A23_5"]["heads"]
    assert explorer.edge(23, 5, 4)["heads"][0]["head"] == max(range(len(shares)), key=shares.__getitem__)
    l2 = build_graph(explorer.llm, 0, threshold=0.0, progress=False, distance_norm=2).edges["I22_4", "A23_5"]
    l2_heads = [h["head"] for h in explorer.edge(23, 5, 4, distance_norm=2)["heads"]]
    assert l2_heads == sorted(range(len(shares)), key=lambda h: -l2["heads"][h])  # the graph's order, L2
    ffn = explorer.ffn(29, 5)
    assert len(ffn["neurons"]) == explorer.top_k and ffn["neurons"][0]["share"] >= ffn["neurons"][-1]["share"]


def test_patching_view(explorer, smollm2):
    view = explorer.patch(CORRUPTED)
    assert view["answer"] == " Paris" and view["corrupted_answer"] == " Rome"
    values = torch.tensor(view["values"])  # [layer, pos], clean = 1, corrupted = 0
    assert values.shape == (smollm2.cfg.n_layers, 6)
    assert values[0, 4] == pytest.approx(1.0, abs=1e-4)  # the only differing token, at the embeddings
    assert values[0, :4].abs().max() < 1e-4  # positions where the prompts agree change nothing
    cell = explorer.patched_lens(CORRUPTED, 0, 4)
    assert cell["cells"][-1]["token"] == " Paris"  # that patched run is the clean run
    assert explorer.patched_lens(CORRUPTED, 0, 2)["cells"][-1]["token"] == " Rome"


def test_bad_input(smollm2):
    e = Explorer(smollm2, max_tokens=12)
    with pytest.raises(ValueError, match="run a prompt first"):
        e.graph()
    with pytest.raises(ValueError, match="the prompt is empty"):
        e.run("   ")
    with pytest.raises(ValueError, match="at most 12 are accepted"):
        e.run("word " * 30)
    e.run(PROMPT)
    with pytest.raises(ValueError, match="the corrupted prompt is 9 tokens long and the prompt 6"):
        e.patch("The capital of the Republic of Italy is")
    with pytest.raises(ValueError, match=r"pos=9 is out of range; valid: 0\.\.5"):
        e.representation(3, 9)
    with pytest.raises(ValueError, match=r"layer must be in -1\.\.29"):
        e.representation(30, 0)
    with pytest.raises(ValueError, match="comes after target"):
        e.edge(3, 2, 4)
    with pytest.raises(ValueError, match="threshold"):
        e.graph(threshold=2.0)
    with pytest.raises(ValueError, match="distance_norm must be 1"):
        e.graph(distance_norm=3)


def test_a_prompt_longer_than_the_context_is_refused_not_truncated(hf_model):
    e = Explorer(hf_model("gpt2"), max_tokens=1000)  # a 64-token context
    with pytest.raises(ValueError, match="more than the model's context of 64"):
        e.run("word " * 200)
    assert e.prompt is None
