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
WINDOWED = {"mistral", "gemma2", "gemma3"}


def _fast_path(family: str, pos: int) -> str:
    """The fast path the README's families table promises for a ``pos``-token prompt."""
    if family == "bloom":
        return "off"  # ALiBi: resuming at a block differs from the plain run by 2-4e-4
    return "layers+joins" if family in WINDOWED and pos > 6 else "layers+joins+positions"


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
            for fn in (
                "get_act_patch_resid_pre",
                "get_act_patch_attn_head_out_by_pos",
                "get_act_patch_mlp_out",
            ):
                ref = getattr(tl_patching, fn)(model, corrupted, cache, metric)
                assert ref.abs().max() > 1e-4, fn
                for max_batch in (batch, 64 * batch):
                    ours = getattr(patching, fn)(
                        model, corrupted, cache, metric, progress=False, max_batch=max_batch
                    )
                    assert (ours - ref).abs().max() <= TOL, (fn, batch, max_batch)
            ref = tl_patching.generic_activation_patch(
                model, corrupted, cache, metric, _also_before, "resid_pre", index_axis_names=("layer", "pos")
            )
            for max_batch in (batch, 64 * batch):
                ours = patching.generic_activation_patch(
                    model,
                    corrupted,
                    cache,
                    metric,
                    _also_before,
                    "resid_pre",
                    index_axis_names=("layer", "pos"),
                    progress=False,
                    max_batch=max_batch,
                )
                assert (ours - ref).abs().max() <= TOL, ("custom setter", batch, max_batch)
        status = patching.fast_path_status(model)
        parts = [("layers", "layers"), ("per_layer", "joins"), ("positions", "positions")]
        path = "+".join(label for part, label in parts if getattr(status, part)) or "off"
        assert path == _fast_path(family, pos), status
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
            one = llm.attention_output_per_head(1, layer, 4, head)
            assert _close(one, parts[4, :, head].sum(0), rel=1e-5)
            assert torch.equal(llm.attention_output(1, layer, 4, head), one)  # the seed's signature
        # what the tool's app reads: the whole attention output at a position (heads, bias, post-norm)
        assert _close(llm.attention_output(1, layer, 4), cache[f"blocks.{layer}.hook_attn_out"][0, 4])
        for pos in (0, 4):
            ffn = llm.decomposed_ffn_out(1, layer, pos).sum(0) + llm.ffn_output_bias(layer)
            assert _close(ffn, cache[f"blocks.{layer}.hook_mlp_out"][0, pos]), ("ffn", layer, pos)
        resid_in, after_attn, out = (
            llm.residual_in(layer)[1, :5],
            llm.residual_after_attn(layer)[1, :5],
            llm.residual_out(layer)[1, :5],
        )
        attn_out, mlp_out = (
            cache[f"blocks.{layer}.hook_attn_out"][0],
            cache[f"blocks.{layer}.hook_mlp_out"][0],
        )
        assert _close(after_attn, resid_in + attn_out)
        assert _close(out, resid_in + attn_out + mlp_out)
    last = llm.residual_out(model.cfg.n_layers - 1)[1, 4]
    assert _close(llm.unembed(last, normalize=True), logits[0, 4])
    graph = build_graph(llm, 1, threshold=0.0, progress=False)
    for node in graph.nodes:  # every representation's shares sum to 1 (the FFN node has one edge in)
        into = [d["weight"] for _, _, d in graph.in_edges(node, data=True)]
        if node[0] in "AI" and into:
            assert abs(sum(into) - 1.0) <= 1e-4, node


@pytest.mark.parametrize("family", ALL)
def test_edits_and_experiment_equal_hand_written_hooks(hf_model, family) -> None:
    """Persistent edits (head ablation, steering) and an Experiment patch give exactly the logits of the
    same interventions written by hand with ``run_with_hooks``."""
    from minterp_tl import Edits, Experiment, Phase, RepresentationContext, StateConfig

    model = hf_model(family)
    clean, corrupted = _pair(model, 2, 7, seed=3)
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))

    def zero_head(z, hook):
        z = z.clone()
        z[:, :, 1] = 0.0
        return z

    def add_v(x, hook):
        return x + 2.0 * v

    with torch.no_grad():
        by_hand = model.run_with_hooks(
            corrupted, fwd_hooks=[("blocks.0.attn.hook_z", zero_head), ("blocks.1.hook_resid_pre", add_v)]
        )
        edits = Edits(model)
        try:
            edits.ablate("head", "z", layers=0, heads=1)
            edits.steer("v", "resid_pre", v, layers=1, alpha=2.0)
            edited = model(corrupted)
        finally:
            edits.clear()
        assert torch.equal(edited, by_hand)
        assert not torch.allclose(by_hand, model(corrupted), atol=1e-4)

    ctx = RepresentationContext(clean, layers=1, positions=[3, -1], hooks=("resid_pre",))
    res = Experiment(
        model,
        [
            Phase("clean", ctx, StateConfig(save=True)),
            Phase("patched", ctx.clone(prompts=corrupted), StateConfig(load=True)),
        ],
    ).run()
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=lambda n: n == "blocks.1.hook_resid_pre")

        def patch(x, hook):
            x = x.clone()
            x[:, [3, 6]] = cache["blocks.1.hook_resid_pre"][:, [3, 6]]
            return x

        expected = model.run_with_hooks(corrupted, fwd_hooks=[("blocks.1.hook_resid_pre", patch)])
    assert torch.equal(res["patched"].logits, expected)


@pytest.mark.parametrize("family", ALL)
def test_circuit_masks(hf_model, family) -> None:
    """Masks on every attention and MLP weight: masks off give the model's logits exactly; a head mask on
    W_O equals zeroing those heads at hook_z; detach() restores the model's logits exactly."""
    from minterp_tl.circuits import CircuitConfig, CircuitModel

    model = hf_model(family)
    x, _ = _pair(model, 2, 6, seed=4)
    with torch.no_grad():
        ref = model(x)
    cs = dict(ablation="none", mask_unit="weight", mask_bias=False, mask_init_value=0.0)
    with CircuitModel(CircuitConfig(mask_hparams=cs, target_layers=("all",)), model) as circuit:
        with torch.no_grad():
            for p in circuit.mask_parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        circuit.eval()
        with torch.no_grad():
            assert not torch.allclose(circuit(x), ref, atol=1e-4)
            circuit.use_masks(False)
            assert torch.equal(circuit(x), ref)
    with torch.no_grad():
        assert torch.equal(model(x), ref)

    head_cfg = CircuitConfig(mask_hparams={**cs, "mask_unit": "head"}, target_layers=("attn.W_O",))
    with CircuitModel(head_cfg, model) as circuit:
        with torch.no_grad():
            for p in circuit.mask_parameters():
                p.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0])[: p.numel()])
        circuit.eval()
        with torch.no_grad():
            got = circuit(x)
        keep = circuit.hard_masks()

    def zero_heads(z, hook):
        m = keep[f"blocks.{hook.name.split('.')[1]}.attn.W_O"].to(z.dtype)
        return z * m[None, None, :, None]

    with torch.no_grad():
        expected = model.run_with_hooks(x, fwd_hooks=[(lambda n: n.endswith("attn.hook_z"), zero_heads)])
        assert torch.equal(model(x), ref)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ALL)
def test_attribution_equals_the_derivative(hf_model, family) -> None:
    """Attribution of resid_pre at (layer 1, position 4) is d/dalpha of the metric with the clean
    activation mixed in by alpha at that slice, at alpha = 0 (autograd on a hand-written hook)."""
    from minterp_tl import attribution

    model = hf_model(family)
    clean, corrupted = _pair(model, 1, 6, seed=5)
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(clean)
    target = clean_logits[:, -1].argmax(-1)
    metric = patching.logit_diff_metric(target, (target + 1) % model.cfg.d_vocab)
    sweep = attribution.attribution_patch(model, clean, corrupted, metric, "resid_pre")
    name = "blocks.1.hook_resid_pre"
    alpha = torch.zeros((), requires_grad=True)

    def mix(x, hook):
        mask = torch.zeros_like(x)
        mask[:, 4] = 1.0
        return x + alpha * mask * (cache[name] - x.detach())

    value = metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, mix)]))
    (derivative,) = torch.autograd.grad(value, alpha)
    assert abs(float(sweep.values[1, 4]) - float(derivative)) <= 1e-4 * max(1.0, abs(float(derivative)))
    assert sweep.values.abs().max() > 1e-4
