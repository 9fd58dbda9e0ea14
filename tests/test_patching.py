"""Batched patching against TransformerLens's own transformer_lens.patching functions."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import patching as tl_patching

from minterp_tl import _patch_engine, patching
from minterp_tl.fast_path import FastPathStatus

TOL = 1e-4


def _pair(model, seed: int, batch: int = 2, pos: int = 6):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 1] = torch.randint(0, model.cfg.d_vocab, (batch,), generator=gen)
    corrupted[:, 3] = torch.randint(0, model.cfg.d_vocab, (batch,), generator=gen)
    return clean, corrupted


def _metric(clean_logits):
    target = clean_logits[:, -1].argmax(-1)
    return patching.logit_diff_metric(target, (target + 1) % clean_logits.shape[-1])


SWEEPS = [
    "get_act_patch_resid_pre",
    "get_act_patch_resid_mid",
    "get_act_patch_attn_out",
    "get_act_patch_mlp_out",
    "get_act_patch_attn_head_out_by_pos",
    "get_act_patch_attn_head_q_by_pos",
    "get_act_patch_attn_head_k_by_pos",
    "get_act_patch_attn_head_v_by_pos",
    "get_act_patch_attn_head_pattern_by_pos",
    "get_act_patch_attn_head_out_all_pos",
    "get_act_patch_attn_head_v_all_pos",
    "get_act_patch_attn_head_pattern_all_pos",
    "get_act_patch_block_every",
    "get_act_patch_attn_head_all_pos_every",
]


@pytest.mark.parametrize("fn", SWEEPS)
def test_each_sweep_equals_transformer_lens(toy, fn) -> None:
    if toy.cfg.attn_only and fn in (
        "get_act_patch_resid_mid",
        "get_act_patch_mlp_out",
        "get_act_patch_block_every",
    ):
        pytest.skip("attention-only model has no resid_mid / mlp_out")
    clean, corrupted = _pair(toy, 0)
    clean_logits, cache = toy.run_with_cache(clean)
    metric = _metric(clean_logits)
    ours = getattr(patching, fn)(toy, corrupted, cache, metric, progress=False, max_batch=16)
    ref = getattr(tl_patching, fn)(toy, corrupted, cache, metric)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= TOL
    assert ref.abs().max() > 1e-3  # the sweep measured something


def test_pattern_dest_src_and_index_df_and_result_forms(toys) -> None:
    model = toys["gqa"]
    clean, corrupted = _pair(model, 1, pos=4)
    clean_logits, cache = model.run_with_cache(clean)
    metric = _metric(clean_logits)
    ours = patching.get_act_patch_attn_head_pattern_dest_src_pos(
        model, corrupted, cache, metric, progress=False
    )
    ref = tl_patching.get_act_patch_attn_head_pattern_dest_src_pos(model, corrupted, cache, metric)
    assert (ours - ref).abs().max() <= TOL

    df = tl_patching.make_df_from_ranges([4, 4], ["layer", "pos"]).sample(7, random_state=0)
    ours, ours_df = patching.generic_activation_patch(
        model,
        corrupted,
        cache,
        metric,
        tl_patching.layer_pos_patch_setter,
        "resid_pre",
        index_df=df,
        return_index_df=True,
        progress=False,
    )
    ref = tl_patching.generic_activation_patch(
        model, corrupted, cache, metric, tl_patching.layer_pos_patch_setter, "resid_pre", index_df=df
    )
    assert ours.shape == (7,) and (ours - ref).abs().max() <= TOL and ours_df is df

    per_example = patching.logit_diff_metric(clean_logits[:, -1].argmax(-1), 0, reduce="none")
    ours = patching.get_act_patch_resid_pre(
        model, corrupted, cache, per_example, reduce="none", baseline=True, progress=False
    )
    ref = tl_patching.get_act_patch_resid_pre(
        model, corrupted, cache, per_example, reduce="none", baseline=True
    )
    assert isinstance(ours, tl_patching.PatchingResult)
    assert (ours.values - ref.values).abs().max() <= TOL and (ours.baseline - ref.baseline).abs().max() <= TOL
    both = patching.get_act_patch_attn_out(
        model, corrupted, cache, {"ld": metric, "p": patching.prob_metric(3)}, progress=False
    )
    assert both.values.shape == (2, 4, 4) and both.metric_names == ["ld", "p"]


@pytest.mark.parametrize("max_batch", [1, 5, 64])
def test_chunking_does_not_change_results(toys, max_batch) -> None:
    model = toys["ln"]
    clean, corrupted = _pair(model, 2, batch=3)
    clean_logits, cache = model.run_with_cache(clean)
    metric = _metric(clean_logits)
    ref = tl_patching.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, metric)
    ours = patching.get_act_patch_attn_head_out_by_pos(
        model, corrupted, cache, metric, max_batch=max_batch * 3, progress=False
    )
    assert (ours - ref).abs().max() <= TOL
    tiny = patching.copies_per_forward(model, 3, 6, memory_budget=1)
    assert tiny == 1


def test_metrics_by_hand(toys) -> None:
    model = toys["ln"]
    clean, corrupted = _pair(model, 3)
    clean_logits, corrupted_logits = model(clean).detach(), model(corrupted).detach()
    ld = patching.logit_diff_metric([5, 7], 9)
    assert torch.allclose(
        ld(clean_logits),
        (
            (clean_logits[0, -1, 5] - clean_logits[0, -1, 9])
            + (clean_logits[1, -1, 7] - clean_logits[1, -1, 9])
        )
        / 2,
    )
    p = patching.prob_metric(4, position=2, log=True, reduce="none")
    assert torch.allclose(p(clean_logits), clean_logits[:, 2].log_softmax(-1)[:, 4])
    norm = patching.normalized_metric(ld, clean_logits, corrupted_logits)
    assert torch.allclose(norm(clean_logits), torch.tensor(1.0)) and torch.allclose(
        norm(corrupted_logits), torch.tensor(0.0), atol=1e-6
    )
    with pytest.raises(ValueError, match="nothing to normalise by"):
        patching.normalized_metric(ld, clean_logits, clean_logits)
    with pytest.raises(ValueError, match="one per prompt"):
        patching.logit_diff_metric([1, 2, 3], 0)(clean_logits)


def test_spec_sweep_matches_the_tl_grid_and_plots(toys, tmp_path) -> None:
    model = toys["gqa"]
    clean, corrupted = _pair(model, 4, batch=1, pos=8)
    clean_logits, cache = model.run_with_cache(clean)
    metric = _metric(clean_logits)
    full = tl_patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
    sweep = patching.activation_patch(
        model, corrupted, cache, metric, "resid_pre", layers="n//2:", positions="-3:", progress=False
    )
    assert sweep.layers == [2, 3] and sweep.positions == [5, 6, 7]
    assert (sweep.values - full[2:, 5:]).abs().max() <= TOL
    heads = patching.activation_patch(
        model, corrupted, cache, metric, "z", layers="all", positions=None, heads="all", progress=False
    )
    ref = tl_patching.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metric)
    assert heads.axis_names == ("layer", "head") and (heads.values - ref).abs().max() <= TOL
    png = sweep.plot(tmp_path / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.png.*"))
    with pytest.raises(ValueError, match="no head axis"):
        patching.activation_patch(model, corrupted, cache, metric, "resid_pre", heads=0, progress=False)
    with pytest.raises(ValueError, match="n_layers=4"):
        patching.activation_patch(model, corrupted, cache, metric, "resid_pre", layers=9, progress=False)


def test_smollm2_resid_pre_sweep_equals_transformer_lens(smollm2) -> None:
    clean = smollm2.to_tokens("The capital of France is")
    corrupted = smollm2.to_tokens("The capital of Italy is")
    clean_logits, cache = smollm2.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    paris, rome = smollm2.to_single_token(" Paris"), smollm2.to_single_token(" Rome")
    metric = patching.logit_diff_metric(paris, rome)
    index_df = tl_patching.make_df_from_ranges([30, 6], ["layer", "pos"]).iloc[::7]
    ours = patching.generic_activation_patch(
        smollm2,
        corrupted,
        cache,
        metric,
        tl_patching.layer_pos_patch_setter,
        "resid_pre",
        index_df=index_df,
        progress=False,
    )
    ref = tl_patching.generic_activation_patch(
        smollm2, corrupted, cache, metric, tl_patching.layer_pos_patch_setter, "resid_pre", index_df=index_df
    )
    assert (ours - ref).abs().max() <= TOL
    middle = lambda logits: logits[0, 3, 100] - logits[0, 3, 200]  # noqa: E731 - a user metric that reads position 3
    ours = patching.generic_activation_patch(
        smollm2,
        corrupted,
        cache,
        middle,
        tl_patching.layer_pos_patch_setter,
        "resid_pre",
        index_df=index_df,
        progress=False,
    )
    ref = tl_patching.generic_activation_patch(
        smollm2, corrupted, cache, middle, tl_patching.layer_pos_patch_setter, "resid_pre", index_df=index_df
    )
    assert (ours - ref).abs().max() <= TOL and ref.abs().max() > 0.1
    full = patching.get_act_patch_resid_pre(smollm2, corrupted, cache, metric, progress=False)
    assert full.shape == (30, 6)
    # patching the subject token early restores the answer; the last position late does too
    assert full[0, 4] > 0 and full[29, 5] > 0 and full[0, 2] < full[0, 4]
    assert torch.allclose(full[0, 4], metric(clean_logits), atol=1e-3)  # all of layer 0's subject info


@pytest.mark.parametrize(
    "act,setter,axes",
    [
        ("z", tl_patching.layer_pos_head_vector_patch_setter, ["layer", "pos", "head"]),
        ("k", tl_patching.layer_pos_head_vector_patch_setter, ["layer", "pos", "head"]),
        ("v", tl_patching.layer_head_vector_patch_setter, ["layer", "head"]),
        ("pattern", tl_patching.layer_head_pos_pattern_patch_setter, ["layer", "head_index", "dest_pos"]),
        ("mlp_out", tl_patching.layer_pos_patch_setter, ["layer", "pos"]),
    ],
)
def test_smollm2_skipping_path_equals_transformer_lens(smollm2, act, setter, axes) -> None:
    """On SmolLM2 chunks start at their lowest patched block and position (corrupted residual and
    key/value cache); every hook kind must still give TL's numbers."""
    clean = smollm2.to_tokens("When Mary and John went to the store, John gave a drink to")
    corrupted = smollm2.to_tokens("When Mary and John went to the store, Mary gave a drink to")
    clean_logits, cache = smollm2.run_with_cache(clean)
    metric = patching.logit_diff_metric(smollm2.to_single_token(" Mary"), smollm2.to_single_token(" John"))
    n_heads = 3 if act in ("k", "v") else 9
    ranges = {
        "layer": 30,
        "pos": clean.shape[1],
        "dest_pos": clean.shape[1],
        "head": n_heads,
        "head_index": n_heads,
    }
    df = tl_patching.make_df_from_ranges([ranges[a] for a in axes], axes).sample(12, random_state=1)
    ours = patching.generic_activation_patch(
        smollm2, corrupted, cache, metric, setter, act, index_df=df, progress=False, max_batch=4
    )
    ref = tl_patching.generic_activation_patch(smollm2, corrupted, cache, metric, setter, act, index_df=df)
    assert patching.fast_path_status(smollm2) == FastPathStatus(
        layers=True, positions=True, last_only=True, per_layer=True
    )
    assert (ours - ref).abs().max() <= TOL
    assert ref.abs().max() > 0.1


def test_unchanged_patches_run_no_forward_and_match_transformer_lens(toys, monkeypatch) -> None:
    """Before the first differing token clean and corrupted activations agree bit for bit (causal
    attention), so those patches are the corrupted run itself: no forward runs for them, and every value
    still equals TL's (which does run them)."""
    model = toys["gqa"]
    clean, _ = _pair(model, 3, batch=2, pos=7)
    corrupted = clean.clone()
    corrupted[:, 4] = (clean[:, 4] + 1) % model.cfg.d_vocab  # the prompts differ at position 4 only
    clean_logits, cache = model.run_with_cache(clean)
    metric = _metric(clean_logits)
    copies = []
    real_run = _patch_engine._run_chunk

    def counting_run(corrupted, patches, chunk, *args):
        copies.append(len(chunk))  # the patched copies of each forward (the sentinels not counted)
        return real_run(corrupted, patches, chunk, *args)

    monkeypatch.setattr(_patch_engine, "_run_chunk", counting_run)
    ours = patching.get_act_patch_attn_head_out_by_pos(
        model, corrupted, cache, metric, progress=False, max_batch=64
    )
    computed = sum(copies)
    copies.clear()
    full = patching.get_act_patch_attn_head_out_by_pos(
        model, corrupted, cache, metric, progress=False, max_batch=64, skip_unchanged=False
    )
    ref = tl_patching.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, metric)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    assert computed == n_layers * 3 * n_heads  # positions 4, 5, 6 only
    assert sum(copies) == n_layers * 7 * n_heads
    assert (ours - ref).abs().max() <= TOL and (full - ref).abs().max() <= TOL
    baseline = metric(model(corrupted))
    assert torch.allclose(ours[:, :4], baseline.expand(n_layers, 4, n_heads), atol=1e-6)
    assert (ours[:, 4:] - baseline).abs().max() > 1e-3  # the patches after the difference do something


# TransformerLens functions minterp_tl.patching does not have yet, each with the issue that adds it.
KNOWN_GAPS: dict[str, str] = {}


def _public(module) -> dict:
    """Public functions, classes and partials defined in ``module`` itself."""
    import functools

    out = {}
    for name, obj in vars(module).items():
        base = obj.func if isinstance(obj, functools.partial) else obj
        if (
            not name.startswith("_")
            and callable(base)
            and getattr(base, "__module__", None) == module.__name__
        ):
            out[name] = obj
    return out


def test_public_surface_matches_transformer_lens() -> None:
    """Every public function of transformer_lens.patching exists here with the same parameters (names,
    order, kinds and defaults), ours adding keyword-only ones after them; a TransformerLens release that
    adds or changes one fails here."""
    import inspect

    theirs = _public(tl_patching)
    missing = {name for name in theirs if not hasattr(patching, name)}
    assert missing == set(KNOWN_GAPS), (
        f"missing: {sorted(missing - set(KNOWN_GAPS))}, now present: {sorted(set(KNOWN_GAPS) - missing)}"
    )
    for name, fn in theirs.items():
        if name in KNOWN_GAPS:
            continue
        tl_params = list(inspect.signature(fn).parameters.values())
        our_params = list(inspect.signature(getattr(patching, name)).parameters.values())
        assert [(p.name, p.kind) for p in tl_params] == [
            (p.name, p.kind) for p in our_params[: len(tl_params)]
        ], name
        for t, o in zip(tl_params, our_params):
            if t.default is not inspect.Parameter.empty:
                assert o.default == t.default or (callable(t.default) and o.default is t.default), (
                    name,
                    t.name,
                )
        extra = our_params[len(tl_params) :]
        assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in extra), (name, [p.name for p in extra])


def test_every_helpers_with_result_forms_equal_transformer_lens(toys) -> None:
    """The ``_every`` helpers under ``baseline=`` / ``reduce="none"`` stack PatchingResults as TL does
    (GQA k / v padded to n_heads)."""
    model = toys["gqa"]
    clean, corrupted = _pair(model, 5, batch=2, pos=5)
    clean_logits, cache = model.run_with_cache(clean)
    per_example = patching.logit_diff_metric(clean_logits[:, -1].argmax(-1), 0, reduce="none")
    for fn, kwargs in (
        ("get_act_patch_block_every", {"baseline": True, "reduce": "mean"}),
        ("get_act_patch_attn_head_all_pos_every", {"reduce": "none"}),
        ("get_act_patch_attn_head_by_pos_every", {"reduce": "none", "baseline": True}),
    ):
        ours = getattr(patching, fn)(model, corrupted, cache, per_example, progress=False, **kwargs)
        ref = getattr(tl_patching, fn)(model, corrupted, cache, per_example, **kwargs)
        assert isinstance(ours, tl_patching.PatchingResult), fn
        assert ours.axis_names == ref.axis_names and ours.patch_type_names == ref.patch_type_names
        assert ours.values.shape == ref.values.shape and (ours.values - ref.values).abs().max() <= TOL, fn
        assert ours.index_df.equals(ref.index_df) and ours.reduced == ref.reduced
        assert (ours.baseline is None) == (ref.baseline is None)
        if ref.baseline is not None:
            assert (ours.baseline - ref.baseline).abs().max() <= TOL
