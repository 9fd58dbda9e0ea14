"""Exact edge patching: identities on every family, TransformerLens's direct path, mean ablation, bad
input."""

from __future__ import annotations

import pytest
import torch
from edge_task import EDGE_MODELS, pair, pick
from edge_task import metric as _metric

from minterp_tl import patching
from minterp_tl.edges import EdgeGraph, Node
from minterp_tl.edges.patch import edge_patch


@pytest.mark.parametrize("family", EDGE_MODELS)
def test_identities(hf_model, toys, induction_model, family):
    """No edge patched is the run itself; every edge (or every edge into the logits) patched is the other
    run. Native toys have no per-head forks: their virtual forks are exercised here."""
    model = pick(family, hf_model, toys, induction_model)
    clean, corrupted = pair(model)
    graph = EdgeGraph(model, 5)
    into_logits = [i for i in range(graph.n_edges) if graph.edge(i)[1].kind == "logits"]
    every = torch.ones(graph.n_edges, dtype=torch.bool)
    with torch.no_grad():
        m_clean, m_corrupted = float(_metric(model(clean))), float(_metric(model(corrupted)))
    assert abs(m_clean - m_corrupted) > 1e-5
    noised = edge_patch(model, clean, corrupted, [[], every, into_logits], _metric, graph=graph)
    denoised = edge_patch(model, clean, corrupted, [[], every], _metric, direction="denoising", graph=graph)
    tol = 1e-4 * max(1.0, abs(m_clean))
    assert noised.tolist() == pytest.approx([m_clean, m_corrupted, m_corrupted], abs=tol)
    assert denoised.tolist() == pytest.approx([m_corrupted, m_clean], abs=tol)


@pytest.mark.parametrize("family", ["gpt2", "llama", "phi"])
def test_single_edges_equal_direct_path(hf_model, family):
    """One head -> head edge at every position, denoised: TransformerLens's direct-path value (our drop-in
    equals TransformerLens's, tests/test_direct_path.py); on GQA also per key/value head."""
    model = hf_model(family)
    clean, corrupted = pair(model)
    _, clean_cache = model.run_with_cache(clean)
    _, corrupted_cache = model.run_with_cache(corrupted)
    graph = EdgeGraph(model, 5, per_position=False)
    for component, kind in (("q", "q_input"), ("k", "k_input")):
        reference = patching.get_act_patch_direct_path(
            model, corrupted, clean_cache, corrupted_cache, _metric, 0, 1, component
        )
        heads = reference.shape[1]
        sets = [[(Node("attn_head_out", None, 0, 1), Node(kind, None, 1, h))] for h in range(heads)]  # type: ignore[arg-type]
        ours = edge_patch(model, clean, corrupted, sets, _metric, direction="denoising", graph=graph)
        assert torch.allclose(ours, reference[1].cpu(), atol=1e-5)


def test_mean_ablation(hf_model):
    """The mean over one prompt is that prompt's writes: mean ablation over the corrupted prompt equals
    patching in the corrupted run's writes."""
    model = hf_model("llama")
    clean, corrupted = pair(model, batch=1)
    graph = EdgeGraph(model, 5)
    torch.manual_seed(0)
    sets = [torch.rand(graph.n_edges) < share for share in (0.05, 0.3, 0.9)]
    patched = edge_patch(model, clean, corrupted, sets, _metric, graph=graph)
    mean = edge_patch(
        model, clean, corrupted, sets, _metric, graph=graph, ablation="mean", mean_tokens=corrupted
    )
    assert torch.allclose(patched, mean, atol=1e-5)
    other = edge_patch(
        model, clean, corrupted, sets, _metric, graph=graph, ablation="mean", mean_tokens=clean
    )
    with torch.no_grad():
        m_clean = float(_metric(model(clean)))
    assert torch.allclose(other, torch.full((3,), m_clean), atol=1e-4)


def test_bad_input_before_compute(hf_model, monkeypatch):
    from minterp_tl.edges import patch as patch_module

    def no_compute(*args, **kwargs):
        raise AssertionError("computed before checking the input")

    monkeypatch.setattr(patch_module, "_run_sets", no_compute)
    model = hf_model("gpt2")
    clean, corrupted = pair(model)
    graph = EdgeGraph(model, 5)
    with pytest.raises(ValueError, match="same number of prompts of the same length"):
        edge_patch(model, clean, corrupted[:1], [[0]], _metric)
    with pytest.raises(ValueError, match="reader comes before its writer"):
        edge_patch(model, clean, corrupted, [[(Node("mlp_out", 0, 1), Node("q_input", 0, 1, 0))]], _metric)
    with pytest.raises(ValueError, match="unknown node kind"):
        edge_patch(model, clean, corrupted, [[(Node("head", 0, 1, 0), Node("logits", 0, 1))]], _metric)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="direction must be"):
        edge_patch(model, clean, corrupted, [[0]], _metric, direction="forwards")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="use direction='noising'"):
        edge_patch(model, clean, corrupted, [[0]], _metric, direction="denoising", ablation="mean")
    with pytest.raises(ValueError, match="another model or prompt length"):
        edge_patch(model, clean[:, :4], corrupted[:, :4], [[0]], _metric, graph=graph)
    with pytest.raises(ValueError, match="sequence of edge sets"):
        edge_patch(model, clean, corrupted, 3, _metric)  # type: ignore[arg-type]
    monkeypatch.undo()
    assert edge_patch(model, clean, corrupted, [[0]], _metric).shape == (1,)  # the guard could fail


def test_virtual_fork_equals_hand_written_hooks(induction_model):
    """The native induction model has no per-head q/k/v forks (and no LayerNorm): the edge a0.1 -> a1.2's
    key, denoised at every position, is the corrupted run with hook_k[:, :, 2] moved by
    (z_clean - z_corrupted)[:, :, 1] @ W_O[1] @ W_K[2]."""
    model = induction_model
    clean, corrupted = pair(model, n=9)
    _, clean_cache = model.run_with_cache(clean)
    _, corrupted_cache = model.run_with_cache(corrupted)
    a0, a1 = model.blocks[0].attn, model.blocks[1].attn
    with torch.no_grad():
        m_corrupted = float(_metric(model(corrupted)))
    write = (clean_cache["blocks.0.attn.hook_z"] - corrupted_cache["blocks.0.attn.hook_z"])[:, :, 1] @ a0.W_O[
        1
    ]
    for c, kind in (("q", "q_input"), ("k", "k_input"), ("v", "v_input")):

        def move(act, hook, c=c):
            act = act.clone()
            act[:, :, 2] += write @ getattr(a1, f"W_{c.upper()}")[2]
            return act

        with torch.no_grad():
            expected = float(
                _metric(model.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.1.attn.hook_{c}", move)]))
            )
        edge = (Node("attn_head_out", None, 0, 1), Node(kind, None, 1, 2))  # type: ignore[arg-type]
        ours = edge_patch(
            model, clean, corrupted, [[edge]], _metric, direction="denoising", per_position=False
        )
        assert abs(float(ours[0]) - expected) < 1e-5
        assert abs(expected - m_corrupted) > 1e-4  # the edge matters
