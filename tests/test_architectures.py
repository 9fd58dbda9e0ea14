"""The architecture matrix: every feature on tiny random Hugging Face models of 16 families (see
``tests/hf_families.py``), each checked against an independent reference (TransformerLens's own patching,
the model's logits, hand-written ``run_with_hooks``, identities that must hold).

Families cover GPT-2's Conv1D, parallel attention + MLP blocks (GPT-NeoX, GPT-J, Phi-2), GQA, post-norms
(Gemma-2, Gemma-3, OLMo-2), final logit soft-capping (Gemma-2), sliding windows (Mistral, Gemma-2/3, 6
tokens: the 9-token prompts are longer), ALiBi (BLOOM) and learned positions (GPT-2, OPT).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hf_families import FAMILIES
from transformer_lens import patching as tl_patching

from minterp_tl import patching
from minterp_tl.lens import logit_lens
from minterp_tl.names import resolve_name
from minterp_tl.transparent import TransformerLensTransparentLlm

TOL = 1e-4
ALL = sorted(FAMILIES)


def _pair(model, batch: int, pos: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, model.cfg.d_vocab, (batch, pos), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 2:] = torch.randint(3, model.cfg.d_vocab, (batch, pos - 2), generator=gen)
    return clean, corrupted


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = TOL) -> bool:
    actual, expected = actual.detach().float(), expected.detach().float()
    scale = max(float(expected.abs().max()), 1e-6)
    return float((actual - expected).abs().max()) <= rel * scale


def _also_before(act, index, clean_act):
    """A custom setter: patch the index's position and the one before it."""
    layer, pos = index
    act[:, max(pos - 1, 0) : pos + 1] = clean_act[:, max(pos - 1, 0) : pos + 1]
    return act


@pytest.mark.parametrize("family", ALL)
def test_names_patching_and_lens(hf_model, family) -> None:
    """Names resolve; patching equals TransformerLens's for three sweeps and a custom setter, with one and
    two corrupted prompts, one and many copies per forward, and a short then a long call (longer than the
    sliding windows); the lens's last row is the model's own logits."""
    model = hf_model(family)
    assert resolve_name(model, ("resid_pre", 1)) == "blocks.1.hook_resid_pre"
    assert resolve_name(model, "mlp_out", layer=-1) == "blocks.1.hook_mlp_out"
    for batch, pos in ((1, 5), (2, 9)):
        clean, corrupted = _pair(model, batch, pos, seed=pos)
        with torch.no_grad():
            clean_logits, cache = model.run_with_cache(clean)
        target = clean_logits[:, -1].argmax(-1)
        metric = patching.logit_diff_metric(target, (target + 1) % model.cfg.d_vocab)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a fast-path start that is off says so
            for fn in ("get_act_patch_resid_pre", "get_act_patch_attn_head_out_by_pos", "get_act_patch_mlp_out"):
                ref = getattr(tl_patching, fn)(model, corrupted, cache, metric)
                assert ref.abs().max() > 1e-4, fn
                for max_batch in (batch, 64 * batch):
                    ours = getattr(patching, fn)(model, corrupted, cache, metric, progress=False, max_batch=max_batch)
                    assert (ours - ref).abs().max() <= TOL, (fn, batch, max_batch)
            ref = tl_patching.generic_activation_patch(model, corrupted, cache, metric, _also_before, "resid_pre",
                                                       index_axis_names=("layer", "pos"))
            for max_batch in (batch, 64 * batch):
                ours = patching.generic_activation_patch(model, corrupted, cache, metric, _also_before, "resid_pre",
                                                         index_axis_names=("layer", "pos"), progress=False,
                                                         max_batch=max_batch)
                assert (ours - ref).abs().max() <= TOL, ("custom setter", batch, max_batch)
        lens = logit_lens(model, clean)
        assert _close(lens.logits[-1], clean_logits)


@pytest.mark.parametrize("family", ALL)
def test_transparent_llm_identities(hf_model, family) -> None:
    """Decomposed attention + bias = attention output; decomposed FFN + bias = FFN output; the residual
    stream adds up (sequential or parallel blocks); unembed of the last residual = the logits; the routes
    graph's shares into each node sum to 1."""
    from minterp_tl.routes import build_graph

    model = hf_model(family)
    llm = TransformerLensTransparentLlm(model)
    llm.run([[5, 17, 9, 42, 8, 30, 11], [7, 19, 23, 4, 50]])
    with torch.no_grad():
        logits, cache = model.run_with_cache(llm.tokens()[1:2, :5])
    assert _close(llm.logits()[1, :5], logits[0])
    for layer in range(model.cfg.n_layers):
        parts = llm.decomposed_attn(1, layer)[:5, :5]  # [target, source, head, d_model]
        total = parts.sum(dim=(1, 2)) + llm.attention_output_bias(layer)
        assert _close(total, cache[f"blocks.{layer}.hook_attn_out"][0]), ("attention", layer)
        for head in (0, 3):
            one = llm.attention_output(1, layer, 4, head)
            assert _close(one, parts[4, :, head].sum(0), rel=1e-5)
        for pos in (0, 4):
            ffn = llm.decomposed_ffn_out(1, layer, pos).sum(0) + llm.ffn_output_bias(layer)
            assert _close(ffn, cache[f"blocks.{layer}.hook_mlp_out"][0, pos]), ("ffn", layer, pos)
        resid_in, after_attn, out = (llm.residual_in(layer)[1, :5], llm.residual_after_attn(layer)[1, :5],
                                     llm.residual_out(layer)[1, :5])
        attn_out, mlp_out = cache[f"blocks.{layer}.hook_attn_out"][0], cache[f"blocks.{layer}.hook_mlp_out"][0]
        assert _close(after_attn, resid_in + attn_out)
        assert _close(out, resid_in + attn_out + mlp_out)
    last = llm.residual_out(model.cfg.n_layers - 1)[1, 4]
    assert _close(llm.unembed(last, normalize=True), logits[0, 4])
    graph = build_graph(llm, 1, threshold=0.0, progress=False)
    for node in graph.nodes:  # every representation's shares sum to 1 (the FFN node has one edge in)
        into = [d["weight"] for _, _, d in graph.in_edges(node, data=True)]
        if node[0] in "AI" and into:
            assert abs(sum(into) - 1.0) <= 1e-4, node
