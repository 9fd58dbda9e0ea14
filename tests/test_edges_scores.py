"""EAP / EAP-IG edge scores: equal to TransformerLens 4.3's attribution_patch where it runs, and checked on
every family by an identity that must hold (integrated gradients' completeness) and against exact patching."""

from __future__ import annotations

import pytest
import torch
from edge_task import EDGE_MODELS, pair, pick
from edge_task import metric as _metric
from transformer_lens.tools.analysis import attribution_patching as tl_ap

from minterp_tl.attribution import compare
from minterp_tl.edges import Node, edge_attribution
from minterp_tl.edges.patch import edge_patch


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "olmo"])
def test_eap_equals_transformer_lens(hf_model, family):
    model = hf_model(family)
    clean, corrupted = pair(model)
    ours = edge_attribution(model, clean, corrupted, _metric).to_dict()
    theirs = tl_ap.attribution_patch(
        model, clean, corrupted, _metric, tl_ap.EdgeAttributionConfig(granularity="edge")
    ).edge_scores
    assert len(ours) == len(theirs)
    for (w, r), value in theirs.items():  # same edges, same order, same values
        key = (Node(w.kind, w.position, w.layer, w.head), Node(r.kind, r.position, r.layer, r.head))
        assert abs(ours[key] - value) <= 1e-4 * max(1.0, abs(value))
    assert [(w.label, r.label) for w, r in list(ours)[:40]] == [
        (Node(w.kind, w.position, w.layer, w.head).label, Node(r.kind, r.position, r.layer, r.head).label)
        for w, r in list(theirs)[:40]
    ]
    assert max(abs(v) for v in theirs.values()) > 1e-4  # the pair moves the metric


@pytest.mark.parametrize("family", EDGE_MODELS)
def test_every_family(hf_model, toys, induction_model, family):
    """Completeness: the embedding moves the metric only through the readers' inputs, so the EAP-IG scores
    of the edges out of the embeddings tend to metric(clean) - metric(corrupted) as the steps grow; and
    single-edge EAP scores track exact denoising edge patching (the scores' own linearisation)."""
    model = pick(family, hf_model, toys, induction_model)
    clean, corrupted = pair(model)
    sums = []
    for steps in (20, 40):
        ig = edge_attribution(model, clean, corrupted, _metric, ig_steps=steps)
        from_embed = torch.tensor([ig.graph.edge(i)[0].kind == "embed" for i in range(ig.graph.n_edges)])
        sums.append(float(ig.scores[from_embed].sum()))
    gap = ig.clean_metric - ig.corrupted_metric
    assert abs(gap) > 1e-5
    # the left Riemann sum's error falls as 1/steps (to float noise on the tiny gaps of random models)
    assert abs(sums[1] - gap) <= max(0.7 * abs(sums[0] - gap), 0.02 * abs(gap))
    eap = edge_attribution(model, clean, corrupted, _metric, per_position=False)
    top = eap.scores.abs().topk(30).indices.tolist()
    exact = edge_patch(
        model, clean, corrupted, [[i] for i in top], _metric, direction="denoising", graph=eap.graph
    )
    report = compare(eap.scores[top], exact - eap.corrupted_metric)
    assert max(report.pearson, report.spearman) > 0.75, report  # phi3: Pearson 0.54, Spearman 0.79


def test_gqa_key_value_readers_per_key_value_head(hf_model):
    scores = edge_attribution(hf_model("llama"), *pair(hf_model("llama")), _metric)
    kv = {r.head for _, r in scores.graph.edges() if r.kind in ("k_input", "v_input")}
    assert kv == {0, 1}


def test_refusals_and_bad_input(hf_model, monkeypatch):
    from minterp_tl.edges import scores as scores_module

    def no_compute(*args, **kwargs):
        raise AssertionError("computed before checking the input")

    monkeypatch.setattr(scores_module, "_input_grads", no_compute)
    model = hf_model("gpt2")
    clean, corrupted = pair(model)
    with pytest.raises(ValueError, match="same number of prompts of the same length"):
        edge_attribution(model, clean, corrupted[:, :4], _metric)
    with pytest.raises(ValueError, match="ig_steps must be"):
        edge_attribution(model, clean, corrupted, _metric, ig_steps=0)
    with pytest.raises(ValueError, match="metric must be callable"):
        edge_attribution(model, clean, corrupted, "logit diff")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="post-norm"):
        edge_attribution(hf_model("gemma2"), *pair(hf_model("gemma2")), _metric)
    model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            edge_attribution(model, clean, corrupted, _metric)
    finally:
        model.eval()
    monkeypatch.undo()
    with pytest.raises(ValueError, match="metric must return a scalar"):
        edge_attribution(model, clean, corrupted, lambda logits: logits[:, -1, :2])
    assert not model.cfg.use_split_qkv_input and not model.cfg.use_hook_mlp_in  # flags restored


def test_smollm2_ioi_against_exact_patching(smollm2):
    """SmolLM2 (GQA; TransformerLens's attribution_patch refuses it) on the IOI pair: on 200 random edges
    that the pair changes, EAP-IG ranks the exact effect of corrupting one edge in the clean run better than
    EAP, and EAP (the linearisation at the corrupted run) ranks the exact denoising effects well."""
    from minterp_tl import patching

    model = smollm2
    clean = model.to_tokens("When Mary and John went to the store, John gave a drink to")
    corrupted = model.to_tokens("When Mary and John went to the store, Mary gave a drink to")
    metric = patching.logit_diff_metric(model.to_single_token(" Mary"), model.to_single_token(" John"))
    eap = edge_attribution(model, clean, corrupted, metric)
    ig = edge_attribution(model, clean, corrupted, metric, ig_steps=5, graph=eap.graph)
    changed = (eap.scores != 0).nonzero()[:, 0]
    sample = changed[torch.randperm(len(changed), generator=torch.Generator().manual_seed(0))[:200]].tolist()
    sets = [[i] for i in sample]
    noising = -(edge_patch(model, clean, corrupted, sets, metric, graph=eap.graph) - eap.clean_metric)
    denoising = edge_patch(model, clean, corrupted, sets, metric, direction="denoising", graph=eap.graph)
    denoising = denoising - eap.corrupted_metric
    assert compare(ig.scores[sample], noising).spearman > compare(eap.scores[sample], noising).spearman
    assert compare(eap.scores[sample], denoising).spearman > 0.8
