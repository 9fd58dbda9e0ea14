"""ModelWrapper / Experiment: declared phases against hand-written TransformerLens hooks."""

from __future__ import annotations

import pytest
import torch

from minterp_tl.context import RepresentationContext
from minterp_tl.specs import Token
from minterp_tl.state import (
    LoadRule,
    MeanOverBatch,
    SaveRule,
    Scale,
    StateConfig,
    StateManager,
)
from minterp_tl.wrapper import Experiment, ModelWrapper, Phase


def _tokens(seed: int, batch: int = 3, pos: int = 9, vocab: int = 50) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _cache(model, tokens, name):
    _, cache = model.run_with_cache(tokens, names_filter=[name])
    return cache[name]


def _patched(model, tokens, name, fn):
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=[(name, lambda act, hook: fn(act.clone()))])


@pytest.mark.parametrize("state,layer", [("resid_pre", 2), ("attn_out", 1), ("resid_post", -1)])
def test_declared_patch_equals_hand_written_patch_on_toys(toy, state, layer) -> None:
    clean, corrupt = _tokens(0), _tokens(1)
    ctx = RepresentationContext(clean, layers=layer, positions=[5, -1], hooks=(state,))
    res = Experiment(
        toy,
        [
            Phase("clean", ctx, StateConfig(save=True)),
            Phase("patched", ctx.clone(prompts=corrupt), StateConfig(load=True)),
        ],
    ).run()

    name = (
        f"blocks.{layer % 4}."
        + {"resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out", "resid_post": "hook_resid_post"}[state]
    )
    src = _cache(toy, clean, name)

    def patch(act):
        act[:, [5, 8]] = src[:, [5, 8]]
        return act

    expected = _patched(toy, corrupt, name, patch)
    assert torch.equal(res["patched"].logits, expected)
    assert torch.equal(res["clean"].logits, toy(clean).detach())
    assert not torch.equal(expected, toy(corrupt).detach())  # the patch changed something
    assert torch.equal(res["clean"][name], src[:, [5, 8]])


def test_per_head_patch_of_z_equals_hand_written(toy) -> None:
    clean, corrupt = _tokens(2), _tokens(3)
    ctx = RepresentationContext(clean, layers=1, positions="last", heads=[3, 1], hooks=("z",))
    res = Experiment(
        toy, [Phase("clean", ctx), Phase("patched", ctx.clone(prompts=corrupt), StateConfig(load=True))]
    ).run()
    src = _cache(toy, clean, "blocks.1.attn.hook_z")

    def patch(act):
        act[:, -1, [3, 1]] = src[:, -1, [3, 1]]
        return act

    assert torch.equal(res["patched"].logits, _patched(toy, corrupt, "blocks.1.attn.hook_z", patch))
    assert res["clean"]["blocks.1.attn.hook_z"].shape == (3, 1, 2, 8)


def test_pattern_selection_is_query_positions_and_heads(toys) -> None:
    model, tokens = toys["gqa"], _tokens(4)
    res = ModelWrapper(model).run(
        RepresentationContext(tokens, layers=[0, 3], positions="last", heads=[2, 0], hooks=("pattern",))
    )
    for layer in (0, 3):
        full = _cache(model, tokens, f"blocks.{layer}.attn.hook_pattern")
        assert torch.equal(res[f"blocks.{layer}.attn.hook_pattern"], full[:, [2, 0]][:, :, [-1]])
    # GQA: k has 2 key/value heads, so heads=[2, 0] is out of range there ... unless asked of k only
    with pytest.raises(ValueError, match="n_heads=2"):
        ModelWrapper(model).run(RepresentationContext(tokens, layers=0, heads=[2], hooks=("k",)))
    k = ModelWrapper(model).run(RepresentationContext(tokens, layers=0, heads=[1], hooks=("k",)))
    assert torch.equal(k["blocks.0.attn.hook_k"], _cache(model, tokens, "blocks.0.attn.hook_k")[:, :, [1]])


def test_position_map_save_at_5_load_at_7(toys) -> None:
    model, clean, corrupt = toys["ln"], _tokens(5), _tokens(6)
    name = "blocks.2.hook_resid_pre"
    src = _cache(model, clean, name)

    def patch(act):
        act[:, 7] = src[:, 5]
        return act

    expected = _patched(model, corrupt, name, patch)
    ctx = RepresentationContext(clean, layers=2, hooks=("resid_pre",))
    # 1. save only position 5, load it at position 7
    a = Experiment(
        model,
        [
            Phase("clean", ctx, StateConfig(save=SaveRule(positions=5))),
            Phase("patched", ctx.clone(prompts=corrupt), StateConfig(load=LoadRule(positions=7))),
        ],
    ).run()
    # 2. save every position, choose the source position when loading
    b = Experiment(
        model,
        [
            Phase("clean", ctx, StateConfig(save=True)),
            Phase(
                "patched",
                ctx.clone(prompts=corrupt),
                StateConfig(load=LoadRule(positions=7, source_positions=5)),
            ),
        ],
    ).run()
    assert torch.equal(a["patched"].logits, expected)
    assert torch.equal(b["patched"].logits, expected)


def test_source_layers_map_and_missing_source_position(toys) -> None:
    model, clean, corrupt = toys["ln"], _tokens(7), _tokens(8)
    src = _cache(model, clean, "blocks.0.hook_resid_post")

    def patch(act):
        act[:, 4] = src[:, 4]
        return act

    expected = _patched(model, corrupt, "blocks.2.hook_resid_pre", patch)
    ctx = RepresentationContext(clean, layers=0, positions=4, hooks=("resid_post",))
    res = Experiment(
        model,
        [
            Phase("clean", ctx),
            Phase(
                "patched",
                ctx.clone(prompts=corrupt, layers=2, hooks=("resid_pre",)),
                StateConfig(load=LoadRule(source_layers=0, source=None, hook="resid_pre")),
            ),
        ],
    )
    # resid_pre at layer 2 is read from resid_pre saved at layer 0, which was not saved: clear error
    with pytest.raises(
        ValueError, match=r"No saved state 'blocks\.0\.hook_resid_pre'.*blocks\.0\.hook_resid_post"
    ):
        res.run()
    sm = StateManager()
    w = ModelWrapper(model)
    w.run(ctx, sm)
    sm.put(
        "blocks.0.hook_resid_pre",
        sm.get("blocks.0.hook_resid_post"),
        positions=sm.entry("blocks.0.hook_resid_post").positions,
        pos_axis=1,
    )
    sm.configure("p", StateConfig(load=LoadRule("resid_pre", layers=2, source_layers=0)))
    out = w.run(ctx.clone(prompts=corrupt), sm, phase="p")
    assert torch.equal(out.logits, expected)
    sm.configure("q", StateConfig(load=LoadRule("resid_post", layers=0, positions=4, source_positions=3)))
    with pytest.raises(
        ValueError, match=r"source position\(s\) \[3\] of prompt 0 were not saved \(saved positions: \[4\]\)"
    ):
        w.run(ctx.clone(prompts=corrupt), sm, phase="q")


def test_steering_vector_add_with_scale(toys) -> None:
    model, tokens = toys["gqa"], _tokens(9)
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    sm = StateManager(
        {"steer": StateConfig(load=LoadRule(source="honesty", mode="add", transform=Scale(3.0)))}
    )
    sm.put("honesty", v)
    ctx = RepresentationContext(tokens, layers="first_half", positions="2:", hooks=("resid_post",))
    out = ModelWrapper(model).run(ctx, sm, phase="steer")

    def steer(act, hook):
        act = act.clone()
        act[:, 2:] += 3.0 * v
        return act

    with torch.no_grad():
        expected = model.run_with_hooks(
            tokens, fwd_hooks=[(f"blocks.{l}.hook_resid_post", steer) for l in (0, 1)]
        )
    assert torch.equal(out.logits, expected)
    assert "honesty" in sm  # put states stay unless popped


def test_mean_ablation_from_a_reference_batch(toys) -> None:
    model, ref, tokens = toys["ln"], _tokens(10, batch=6), _tokens(11)
    mean = _cache(model, ref, "blocks.1.attn.hook_z").mean(0, keepdim=True)

    def ablate(act):
        act[:, :, 2] = mean[:, :, 2]
        return act

    expected = _patched(model, tokens, "blocks.1.attn.hook_z", ablate)
    ctx = RepresentationContext(ref, layers=1, hooks=("z",), name="ref")
    res = Experiment(
        model,
        [
            Phase("ref", ctx),
            Phase(
                "ablate",
                ctx.clone(prompts=tokens),
                StateConfig(load=LoadRule(heads=2, transform=MeanOverBatch(), pop=True)),
            ),
        ],
    ).run()
    assert torch.allclose(res["ablate"].logits, expected, atol=1e-6, rtol=0)
    assert len(res.manager) == 0  # popped after use


def test_concat_collects_over_runs_and_drop_forgets(toys) -> None:
    model, a, b = toys["ln"], _tokens(12, batch=2), _tokens(13, batch=4)
    sm = StateManager(
        {
            "collect": StateConfig(save=SaveRule(concat=True)),
            "forget": StateConfig(drop=("blocks.1.hook_resid_post",)),
        }
    )
    w = ModelWrapper(model)
    ctx = RepresentationContext(a, layers=[1, 3], positions="last")
    w.run(ctx, sm, phase="collect")
    w.run(ctx.clone(prompts=b), sm, phase="collect")
    for layer in (1, 3):
        name = f"blocks.{layer}.hook_resid_post"
        expected = torch.cat([_cache(model, a, name)[:, -1:], _cache(model, b, name)[:, -1:]])
        assert torch.equal(sm.get(name), expected)
    w.run(ctx, sm, phase="forget")
    assert sm.names() == ["blocks.3.hook_resid_post"]


def test_saves_see_the_loaded_values_and_only_needed_hooks_run(toys) -> None:
    model, tokens = toys["ln"], _tokens(14)
    sm = StateManager({"x": StateConfig(save="resid_pre", load=LoadRule("resid_pre", source="zeros"))})
    sm.put("zeros", torch.zeros(32))
    calls: list[str] = []
    orig = model.run_with_cache
    model.run_with_cache = lambda *a, **k: calls.append("cache") or orig(*a, **k)
    try:
        out = ModelWrapper(model).run(RepresentationContext(tokens, layers=2, positions=3), sm, phase="x")
    finally:
        del model.run_with_cache
    assert calls == []
    assert torch.equal(out["blocks.2.hook_resid_pre"], torch.zeros(3, 1, 32))
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())  # hooks removed afterwards


def test_hooks_are_removed_when_a_run_fails(toys) -> None:
    model, tokens = toys["ln"], _tokens(15)
    sm = StateManager({"bad": StateConfig(load=LoadRule("resid_pre", source="v"))})
    sm.put("v", torch.zeros(5))  # fails inside the forward pass: 5 does not broadcast to d_model=32
    with pytest.raises(
        ValueError, match=r"Cannot load v into blocks\.1\.hook_resid_pre: value of shape \(5,\)"
    ):
        ModelWrapper(model).run(RepresentationContext(tokens, layers=1), sm, phase="bad")
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())


def test_clear_errors_for_bad_loads(toys) -> None:
    model = toys["ln"]
    w = ModelWrapper(model)
    sm = StateManager(
        {
            "save": StateConfig(save=True),
            "load": StateConfig(load=True),
            "heads": StateConfig(load=LoadRule(heads=1)),
        }
    )
    w.run(RepresentationContext(_tokens(0, batch=3), layers=1), sm, phase="save")
    with pytest.raises(ValueError, match=r"value of shape \(3, 9, 32\).*region of shape \(2, 9, 32\)"):
        w.run(RepresentationContext(_tokens(1, batch=2), layers=1), sm, phase="load")
    with pytest.raises(ValueError, match="has no head axis"):
        w.run(RepresentationContext(_tokens(1), layers=1), sm, phase="heads")
    with pytest.raises(ValueError, match=r"No StateConfig for phase 'laod' \(did you mean 'load'\?\)"):
        w.run(RepresentationContext(_tokens(1), layers=1), sm, phase="laod")
    with pytest.raises(ValueError, match=r"hook_result.*set_use_attn_result\(True\)"):
        w.run(RepresentationContext(_tokens(1), layers=1, hooks=("result",)))
    with pytest.raises(ValueError, match="same state"):
        w.run(
            RepresentationContext(_tokens(1), layers=1),
            StateManager({"d": StateConfig(save=["resid_pre", "resid_pre"])}),
            phase="d",
        )


# ---- SmolLM2 ------------------------------------------------------------------------------------


def test_declared_patch_equals_hand_written_patch_on_smollm2(smollm2) -> None:
    clean, corrupt = "The capital of France is", "The capital of Italy is"
    ctx = RepresentationContext(
        clean, layers=[6, 20], positions=Token(" France"), hooks=("resid_pre", "attn_out")
    )
    res = Experiment(
        smollm2,
        [
            Phase("clean", ctx),
            Phase("patched", ctx.clone(prompts=corrupt, positions=Token(" Italy")), StateConfig(load=True)),
        ],
    ).run()
    assert res["clean"].batch.str_tokens[0][4] == " France"
    clean_t, corrupt_t = smollm2.to_tokens(clean), smollm2.to_tokens(corrupt)
    names = [f"blocks.{l}.{h}" for l in (6, 20) for h in ("hook_resid_pre", "hook_attn_out")]
    _, cache = smollm2.run_with_cache(clean_t, names_filter=names)

    def make(name):
        def fn(act, hook):
            act = act.clone()
            act[:, 4] = cache[name][:, 4]
            return act

        return fn

    with torch.no_grad():
        expected = smollm2.run_with_hooks(corrupt_t, fwd_hooks=[(n, make(n)) for n in names])
    assert torch.equal(res["patched"].logits, expected)
    paris = smollm2.to_single_token(" Paris")
    p_clean = res["clean"].last_logits().softmax(-1)[0, paris]
    p_patched = res["patched"].last_logits().softmax(-1)[0, paris]
    p_corrupt = smollm2(corrupt_t)[0, -1].softmax(-1)[paris]
    assert p_patched > 5 * p_corrupt and p_clean > 0.5  # the patch brings Paris back


def test_patching_every_position_at_layer_0_restores_clean_logits(smollm2) -> None:
    clean, corrupt = "The capital of France is", "The capital of Italy is"
    ctx = RepresentationContext(clean, layers=0, hooks=("resid_pre",))
    res = Experiment(
        smollm2, [Phase("clean", ctx), Phase("patched", ctx.clone(prompts=corrupt), StateConfig(load=True))]
    ).run()
    assert torch.equal(res["patched"].logits, res["clean"].logits)


def test_ragged_batch_last_position_and_logit_lens(smollm2) -> None:
    prompts = ["The capital of France is", "Hello", "One, two, three, four,"]
    ctx = RepresentationContext(prompts, positions="last", hooks=("resid_post",))
    out = ModelWrapper(smollm2).run(ctx)
    assert out.batch.lengths == tuple(len(smollm2.to_str_tokens(p)) for p in prompts)
    lens = out.stack("resid_post")  # [layer, batch, 1, d_model]
    assert lens.shape == (30, 3, 1, 576)
    _, batched = smollm2.run_with_cache(
        out.batch.tokens, names_filter=lambda n: n.endswith("hook_resid_post")
    )
    for i, p in enumerate(prompts):
        last = out.batch.lengths[i] - 1
        for layer in (0, 10, 29):  # each prompt's own last token, read out of the padded batch
            assert torch.equal(lens[layer, i, 0], batched[f"blocks.{layer}.hook_resid_post"][i, last])
        alone = smollm2(p)[0, -1]  # right padding changes nothing (up to batched-matmul rounding)
        assert torch.allclose(out.last_logits()[i], alone, atol=1e-3, rtol=1e-4)
    final = smollm2.unembed(smollm2.ln_final(lens[-1, :, 0]))
    assert torch.allclose(final, out.last_logits(), atol=5e-4, rtol=0)
    assert final.argmax(-1)[0] == smollm2.to_single_token(" Paris")


def test_state_manager_activation_cache_interop_with_transformer_lens(smollm2) -> None:
    text = "The capital of France is"
    ctx = RepresentationContext(text, hooks=("resid_pre", "blocks.29.hook_resid_post"))
    sm = StateManager()
    ModelWrapper(smollm2).run(ctx, sm)
    assert len(sm) == 31
    _, ref = smollm2.run_with_cache(text)
    cache = sm.to_activation_cache(smollm2)
    assert torch.equal(cache.accumulated_resid(), ref.accumulated_resid())
    back = StateManager.from_activation_cache(cache)
    assert back.keys() == sm.keys() and all(torch.equal(back.get(n), sm.get(n)) for n in sm.names())
