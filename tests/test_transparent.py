"""TransparentLlm on TransformerLens: every accessor against the model's own activations (run_with_cache,
an independent forward pass) and the exact identities of the decompositions, on every toy and SmolLM2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minterp_tl.models import model_info
from minterp_tl.transparent import TransformerLensTransparentLlm, TransparentLlm

REL = 1e-4


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = REL) -> bool:
    """Max abs error within ``rel`` of the reference's max abs value (float32 relative tolerance)."""
    actual, expected = actual.detach(), expected.detach()
    scale = max(float(expected.abs().max()), 1e-6)
    return float((actual - expected).abs().max()) <= rel * scale


def _cache(model, tokens):
    with torch.no_grad():
        return model.run_with_cache(tokens)


def _mid_name(model, layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post" if model.cfg.attn_only else f"blocks.{layer}.hook_resid_mid"


# Two prompts of different lengths: the second is padded on the right, so batch_i = 1 and padding are
# exercised.
PROMPTS = [[3, 17, 5, 42, 8, 1, 30], [11, 2, 29, 7, 40]]


@pytest.fixture(scope="module")
def toy_runs(toys):
    out = {}
    for kind, model in toys.items():
        llm = TransformerLensTransparentLlm(model)
        llm.run(PROMPTS)
        out[kind] = (model, llm)
    return out


@pytest.fixture(scope="module")
def smol_run(smollm2):
    llm = TransformerLensTransparentLlm(smollm2)
    llm.run(["The capital of France is", "Hello world"])
    return smollm2, llm


def _all_runs(toy_runs, smol_run):
    return [*toy_runs.values(), smol_run]


@pytest.mark.parametrize("kind", ["ln", "gqa", "attn_only", "smollm2"])
def test_state_matches_an_independent_forward_pass(kind, toy_runs, smol_run):
    model, llm = smol_run if kind == "smollm2" else toy_runs[kind]
    assert isinstance(llm, TransparentLlm)
    assert llm.model_info() == model_info(model)
    assert llm.batch_size() == 2
    for b in range(2):
        n = llm.n_tokens(b)
        tokens = llm.tokens()[b, :n]
        logits, cache = _cache(model, tokens[None])
        assert close(llm.logits()[b, :n], logits[0])
        for layer in range(model.cfg.n_layers):
            assert close(llm.residual_in(layer)[b, :n], cache[f"blocks.{layer}.hook_resid_pre"][0])
            assert close(llm.residual_after_attn(layer)[b, :n], cache[_mid_name(model, layer)][0])
            assert close(llm.residual_out(layer)[b, :n], cache[f"blocks.{layer}.hook_resid_post"][0])
            for head in range(model.cfg.n_heads):
                pattern = llm.attention_matrix(b, layer, head)[:n, :n]
                assert close(pattern, cache[f"blocks.{layer}.attn.hook_pattern"][0, head])
                assert torch.equal(pattern.triu(1), torch.zeros_like(pattern))  # lower-triangular
                assert close(pattern.sum(-1), torch.ones(n))


def test_residual_in_of_layer_0_is_the_embedding(toy_runs):
    model, llm = toy_runs["ln"]
    tokens = torch.tensor(PROMPTS[0])
    embed = model.W_E[tokens] + model.W_pos[: len(tokens)]  # learned absolute positions
    assert close(llm.residual_in(0)[0], embed)


@pytest.mark.parametrize("kind", ["ln", "gqa", "attn_only", "smollm2"])
def test_block_identities(kind, toy_runs, smol_run):
    model, llm = smol_run if kind == "smollm2" else toy_runs[kind]
    for b in range(2):
        n = llm.n_tokens(b)
        _, cache = _cache(model, llm.tokens()[b, :n][None])
        for layer in range(model.cfg.n_layers):
            attn_out = cache[f"blocks.{layer}.hook_attn_out"][0]
            decomposed = llm.decomposed_attn(b, layer)[:n, :n]  # [target, source, head, d_model]
            assert close(decomposed.sum((1, 2)) + llm.attention_output_bias(layer), attn_out)
            assert close(llm.residual_in(layer)[b, :n] + attn_out, llm.residual_after_attn(layer)[b, :n])
            assert close(
                llm.residual_after_attn(layer)[b, :n] + llm.ffn_out(layer)[b, :n],
                llm.residual_out(layer)[b, :n],
            )
        last = model.cfg.n_layers - 1
        for pos in range(n):
            assert close(llm.unembed(llm.residual_out(last)[b, pos], normalize=True), llm.logits()[b, pos])


@pytest.mark.parametrize("kind", ["ln", "gqa", "attn_only", "smollm2"])
def test_per_head_outputs_and_axis_order(kind, toy_runs, smol_run):
    """Each head's part (summed over sources) is that head's z @ W_O from the cache: checks the GQA
    head -> key/value head map and that b_V is counted once (hook_z already holds it)."""
    model, llm = smol_run if kind == "smollm2" else toy_runs[kind]
    b = 1
    n = llm.n_tokens(b)
    _, cache = _cache(model, llm.tokens()[b, :n][None])
    for layer in range(model.cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"][0]  # [pos, head, d_head]
        w_o = model.blocks[layer].attn.W_O.detach()  # [head, d_head, d_model]
        per_head = torch.einsum("phd,hdm->phm", z, w_o)
        decomposed = llm.decomposed_attn(b, layer)
        assert close(decomposed[:n, :n].sum(1), per_head)
        # axis order [target, source, ...]: causal, so a source after its target contributes nothing
        assert torch.equal(decomposed[0, 1:], torch.zeros_like(decomposed[0, 1:]))
        for pos in (0, n - 1):
            heads = torch.stack(
                [llm.attention_output_per_head(b, layer, pos, h) for h in range(model.cfg.n_heads)]
            )
            assert close(heads, per_head[pos])
            whole = llm.attention_output(b, layer, pos)
            assert close(whole, heads.sum(0) + llm.attention_output_bias(layer))
        assert close(llm.decomposed_attn_rows(b, layer, 1, 3), decomposed[1:3, :3], rel=1e-6)


@pytest.mark.parametrize("kind", ["ln", "gqa", "smollm2"])
def test_ffn_decomposition_per_neuron(kind, toy_runs, smol_run):
    model, llm = smol_run if kind == "smollm2" else toy_runs[kind]
    b = 0
    n = llm.n_tokens(b)
    _, cache = _cache(model, llm.tokens()[b, :n][None])
    layers = range(model.cfg.n_layers) if kind != "smollm2" else (0, 14, 29)
    for layer in layers:
        mlp_out = cache[f"blocks.{layer}.hook_mlp_out"][0]
        assert close(llm.ffn_out(layer)[b, :n], mlp_out)
        w_out = model.blocks[layer].mlp.W_out.detach()
        for pos in range(n):
            parts = llm.decomposed_ffn_out(b, layer, pos)
            assert parts.shape == (model.cfg.d_mlp, model.cfg.d_model)
            assert close(parts.sum(0) + llm.ffn_output_bias(layer), mlp_out[pos])
            act = llm.neuron_activations(b, layer, pos)
            # "after the activation function": recomputed from the pre-activations of the cache
            pre = cache[f"blocks.{layer}.mlp.hook_pre"][0, pos]
            if model.cfg.gated_mlp:  # SwiGLU neuron = silu(gate) * up, the input of down_proj
                expected = F.silu(pre) * cache[f"blocks.{layer}.mlp.hook_pre_linear"][0, pos]
            else:
                expected = F.gelu(pre)
            assert close(act, expected)
        for neuron in (0, 7, model.cfg.d_mlp - 1):
            assert torch.equal(llm.neuron_output(layer, neuron), w_out[neuron])
            assert close(parts[neuron], act[neuron] * w_out[neuron])


def test_attention_only_model_has_no_neurons(toy_runs):
    model, llm = toy_runs["attn_only"]
    assert torch.equal(llm.ffn_out(1), torch.zeros_like(llm.residual_out(1)))
    assert torch.equal(llm.residual_after_attn(1), llm.residual_out(1))
    with pytest.raises(ValueError, match="attention-only"):
        llm.neuron_activations(0, 0, 0)
    with pytest.raises(ValueError, match="attention-only"):
        llm.neuron_output(0, 0)


def test_smollm2_tokens_and_strings(smol_run):
    model, llm = smol_run
    assert llm.n_tokens(0) == 6 and llm.n_tokens(1) < 6
    assert llm.tokens_to_strings(llm.tokens()[0]) == model.to_str_tokens("The capital of France is")
    top = int(llm.logits()[0, 5].argmax())
    assert llm.tokens_to_strings(torch.tensor([top])) == [" Paris"]


def test_bad_input(toy_runs, toys):
    fresh = TransformerLensTransparentLlm(toys["ln"])
    assert fresh.model_info().n_layers == 4  # available before run
    with pytest.raises(RuntimeError, match="run"):
        fresh.residual_in(0)
    _, llm = toy_runs["ln"]
    with pytest.raises(ValueError, match=r"layer=4 is out of range; valid: 0..3"):
        llm.residual_in(4)
    assert torch.equal(llm.residual_in(-1), llm.residual_in(3))
    with pytest.raises(ValueError, match="head=9"):
        llm.attention_matrix(0, 0, 9)
    with pytest.raises(ValueError, match="batch_i=2"):
        llm.decomposed_attn(2, 0)
    with pytest.raises(ValueError, match="neuron=128"):
        llm.neuron_output(0, 128)
    with pytest.raises(ValueError, match="must be an int"):
        llm.residual_out("1")
    with pytest.raises(ValueError, match=r"\[d_model\]"):
        llm.unembed(torch.zeros(3), normalize=True)
    with pytest.raises(ValueError, match="TransformerBridge"):
        TransformerLensTransparentLlm(torch.nn.Linear(2, 2))
