"""Interventions: one record, one applier, the same numbers in a single run, as a persistent edit and as a
hand-written ``run_with_hooks`` hook; positions per prompt on padded batches; bad records refused early."""

from __future__ import annotations

import pytest
import torch

from minterp_tl.context import RepresentationContext
from minterp_tl.edits import Edits
from minterp_tl.interventions import BatchLayout, Intervention, resolve_steps
from minterp_tl.state import LoadRule, MeanOverBatch, SaveRule, Scale, StateConfig, StateManager
from minterp_tl.wrapper import ModelWrapper


def _tokens(model, batch: int = 2, pos: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=g)


def _one_run(model, tokens, *records) -> torch.Tensor:
    sm = StateManager({"x": StateConfig(interventions=records)})
    return ModelWrapper(model).run(RepresentationContext(tokens), sm, phase="x").logits


def _edited(model, tokens, *records) -> torch.Tensor:
    edits = Edits(model)
    for i, r in enumerate(records):
        edits.add(f"e{i}", r)
    try:
        return model(tokens)
    finally:
        edits.clear()


@torch.no_grad()
@pytest.mark.parametrize("kind", ["ln", "gqa"])
def test_every_mode_equals_a_hand_written_hook_in_one_run_and_as_an_edit(toys, kind) -> None:
    model = toys[kind]
    tokens = _tokens(model)
    g = torch.Generator().manual_seed(4)
    d, n_kv = model.cfg.d_model, model.cfg.n_key_value_heads or model.cfg.n_heads
    v = torch.randn(d, generator=g)
    value = torch.randn(2, 1, d, generator=g)
    other = torch.randn(2, 7, n_kv, model.cfg.d_head, generator=g)
    mean = torch.randn(1, 1, model.cfg.n_heads, model.cfg.d_head, generator=g)
    cases = [
        (
            Intervention("resid_post", "add", v, layers=0, positions=[0, -1], alpha=2.5),
            "blocks.0.hook_resid_post",
            lambda x: _at(x, [0, 6], lambda r: r + 2.5 * v),
        ),
        (
            Intervention("resid_pre", "set", value, layers=1, positions=-1),
            "blocks.1.hook_resid_pre",
            lambda x: _at(x, [6], lambda r: value),
        ),
        (
            Intervention("z", "zero", layers=1, heads=[1, 3]),
            "blocks.1.attn.hook_z",
            lambda x: _heads(x, [1, 3], lambda r: 0 * r),
        ),
        (
            Intervention("z", "scale", layers=0, heads=2, positions="2:4", alpha=-0.5),
            "blocks.0.attn.hook_z",
            lambda x: _pos_heads(x, [2, 3], [2], lambda r: -0.5 * r),
        ),
        (
            Intervention("z", "mean", mean, layers=0, heads=[0]),
            "blocks.0.attn.hook_z",
            lambda x: _heads(x, [0], lambda r: mean[:, :, [0]].expand_as(r)),
        ),
        (
            Intervention(
                "k", "patch", other, layers=1, heads=[n_kv - 1], positions=[1]
            ),  # GQA: key/value heads
            "blocks.1.attn.hook_k",
            lambda x: _pos_heads(x, [1], [n_kv - 1], lambda r: other[:, [1]][:, :, [n_kv - 1]]),
        ),
        (
            Intervention("mlp_out", "function", layers=1, fn=lambda x, hook, k: x * k, kwargs={"k": 0.25}),
            "blocks.1.hook_mlp_out",
            lambda x: x * 0.25,
        ),
    ]
    for record, name, write in cases:
        expected = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda x, hook: write(x.clone()))])
        assert not torch.equal(expected, model(tokens)), record.mode  # the change is visible
        assert torch.equal(_one_run(model, tokens, record), expected), record.mode
        assert torch.equal(_edited(model, tokens, record), expected), record.mode


def _at(x, positions, fn):
    x[:, positions] = fn(x[:, positions])
    return x


def _heads(x, heads, fn):
    x[:, :, heads] = fn(x[:, :, heads])
    return x


def _pos_heads(x, positions, heads, fn):
    region = x[:, positions][:, :, heads]
    out = fn(region)
    for j, p in enumerate(positions):
        for hj, h in enumerate(heads):
            x[:, p, h] = out[:, j, hj]
    return x


@torch.no_grad()
def test_steering_and_mean_ablation_have_one_meaning_across_the_three_spellings(toys) -> None:
    """LoadRule(mode='add', transform=Scale) == Intervention(mode='add') == Edits.steer; LoadRule with
    MeanOverBatch == Edits.ablate(how='mean') == Intervention(mode='mean')."""
    model, w = toys["gqa"], ModelWrapper(toys["gqa"])
    tokens, reference = _tokens(model), _tokens(model, batch=5, seed=3)
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    sm = StateManager(
        {
            "steer": StateConfig(
                load=LoadRule(
                    "resid_post", layers=0, positions=-1, source="v", mode="add", transform=Scale(3.0)
                )
            )
        }
    )
    sm.put("v", v)
    by_rule = w.run(RepresentationContext(tokens), sm, phase="steer").logits
    record = Intervention("resid_post", "add", v, layers=0, positions=-1, alpha=3.0)
    edits = Edits(model)
    edits.steer("v", "resid_post", v, layers=0, positions=-1, alpha=3.0)
    by_edit = model(tokens)
    edits.clear()
    assert torch.equal(by_rule, _one_run(model, tokens, record)) and torch.equal(by_rule, by_edit)

    ref = w.run(RepresentationContext(reference, hooks=("z",), layers=1), StateManager(), phase=None)
    means = ref["blocks.1.attn.hook_z"].mean(dim=(0, 1), keepdim=True)
    sm = StateManager(
        {
            "mean": StateConfig(
                load=LoadRule(
                    "z", layers=1, heads=[2], positions="all", source="m", transform=MeanOverBatch()
                )
            )
        }
    )
    sm.put("m", means[:, :, [2]].expand(1, tokens.shape[1], 1, -1))
    by_rule = w.run(RepresentationContext(tokens), sm, phase="mean").logits
    edits.ablate("mean", "z", layers=1, heads=[2], how="mean", reference=reference)
    by_edit = model(tokens)
    edits.clear()
    by_record = _one_run(model, tokens, Intervention("z", "mean", means, layers=1, heads=[2]))
    assert torch.allclose(by_rule, by_edit, atol=1e-6) and torch.equal(by_edit, by_record)


@torch.no_grad()
def test_positions_are_per_prompt_on_a_padded_batch_in_a_run_and_as_an_edit(hf_model) -> None:
    """-1 is each prompt's last real token: the same in a one-run intervention (the wrapper pads on the
    right itself) and in a persistent edit (which reads the padding of each forward pass's tokens)."""
    model = hf_model("llama")
    prompts = ["the cat sat", "a much longer prompt than the first one"]
    rows = [model.to_tokens(p)[0] for p in prompts]
    lengths = [len(r) for r in rows]
    assert lengths[0] < lengths[1]
    pad = model.tokenizer.pad_token_id
    tokens = torch.full((2, max(lengths)), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))

    def hand(x, hook):
        x = x.clone()
        for i, n in enumerate(lengths):
            x[i, n - 1] += v
        return x

    expected = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", hand)])
    record = Intervention("resid_pre", "add", v, layers=1, positions=-1)
    edited = _edited(model, tokens, record)
    assert torch.equal(edited, expected)
    layout = BatchLayout.from_tokens(model, tokens)
    assert layout.lengths == tuple(lengths)
    one_run = ModelWrapper(model).run(
        RepresentationContext(prompts),
        StateManager(
            {
                "x": StateConfig(
                    interventions=[record], save=[SaveRule("resid_pre", layers=1, positions="all")]
                )
            }
        ),
        phase="x",
    )
    for i, n in enumerate(lengths):  # the same rows changed, prompt by prompt
        assert torch.allclose(one_run.logits[i, :n], expected[i, :n], atol=1e-5)


def test_bad_records_are_refused_before_any_forward_pass(toys) -> None:
    model = toys["gqa"]
    with pytest.raises(ValueError, match="mode must be one of"):
        Intervention("z", "ablate")
    with pytest.raises(ValueError, match="'set' needs value="):
        Intervention("resid_pre", "set")
    with pytest.raises(ValueError, match="'zero' takes no value="):
        Intervention("resid_pre", "zero", torch.zeros(3))
    with pytest.raises(ValueError, match="heads= or neurons="):
        Intervention("z", "zero", heads=0, neurons=0)
    with pytest.raises(ValueError, match="fn="):
        Intervention("z", "function")
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        Intervention("z", "scale", alpha=float("nan"))
    with pytest.raises(ValueError, match="no head axis"):
        resolve_steps(model, Intervention("resid_pre", "zero", heads=0))
    kv = model.cfg.n_key_value_heads
    with pytest.raises(ValueError, match=f"head spec {kv}"):  # k has the key/value head count
        resolve_steps(model, Intervention("k", "zero", layers=0, heads=kv))
    assert resolve_steps(model, Intervention("q", "zero", layers=0, heads=kv))[0].heads == (kv,)
    with pytest.raises(ValueError, match="resid_pre"):  # closest names
        resolve_steps(model, Intervention("resid_pree", "zero"))
    with pytest.raises(ValueError, match="one tensor per hook"):
        resolve_steps(model, Intervention("resid_pre", "set", {"blocks.0.hook_resid_pre": torch.zeros(1)}))
