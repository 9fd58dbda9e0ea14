"""StateConfig / StateManager / selection helpers, checked against hand-written indexing."""

from __future__ import annotations

import pytest
import torch

from minterp_tl.state import (
    Add,
    Compose,
    LoadRule,
    MeanOverBatch,
    SavedState,
    SaveRule,
    Scale,
    StateConfig,
    StateManager,
)

# ---- transforms --------------------------------------------------------------------------------


def test_transforms_compute_what_they_say() -> None:
    x = torch.arange(12.0).reshape(3, 2, 2)
    assert torch.equal(Scale(2.5)(x), x * 2.5)
    v = torch.tensor([1.0, -1.0])
    assert torch.equal(Add(v, alpha=3.0)(x), x + 3 * v)
    mean = MeanOverBatch()(x)
    assert mean.shape == (1, 2, 2) and torch.equal(mean[0], (x[0] + x[1] + x[2]) / 3)
    assert torch.equal(Compose((MeanOverBatch(), Scale(-1.0)))(x), -mean)


# ---- configs -----------------------------------------------------------------------------------


def test_state_config_shorthands_become_rules() -> None:
    c = StateConfig(save="resid_pre", load=["z", LoadRule("pattern", heads=1)], drop="clean")
    assert c.save == (SaveRule("resid_pre"),)
    assert c.load[0] == LoadRule("z") and c.load[1].heads == 1
    assert c.drop == ("clean",)
    assert StateConfig(save=True).save == (SaveRule(),)
    assert StateConfig(load=True).load == (LoadRule(),)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: StateConfig(save=[3]), "save entries must be hook names or SaveRule"),
        (lambda: StateConfig(load=[SaveRule("x")]), "load entries must be hook names or LoadRule"),
        (lambda: LoadRule("x", mode="mix"), "mode must be 'set' or 'add'"),
        (lambda: LoadRule("x", transform=3), "transform must be callable"),
        (lambda: LoadRule("x", source="v", source_layers=2), "either source="),
        (lambda: SaveRule("x", layers="n**2"), "layer spec"),
        (lambda: SaveRule(3), "hook must be a hook name"),
        (lambda: StateConfig(drop=[1]), "drop must be keys or tags"),
    ],
)
def test_bad_configs_fail_clearly(build, match) -> None:
    with pytest.raises(ValueError, match=match):
        build()


# ---- the manager -------------------------------------------------------------------------------


def test_manager_put_get_pop_drop_and_bytes() -> None:
    sm = StateManager()
    a, b, c = torch.randn(2, 3, 4), torch.randn(5), torch.randn(2, 3, 4, dtype=torch.float64)
    sm.put("blocks.0.hook_resid_pre", a)
    sm.put("steer", b)
    sm.put("blocks.0.hook_resid_pre", c, tag="clean")
    assert len(sm) == 3 and "steer" in sm and ("clean", "blocks.0.hook_resid_pre") in sm
    assert sm.nbytes == a.numel() * 4 + b.numel() * 4 + c.numel() * 8
    assert torch.equal(sm.get("blocks.0.hook_resid_pre", tag="clean"), c)
    assert sm.names("clean") == ["blocks.0.hook_resid_pre"]
    assert torch.equal(sm.pop("steer"), b) and "steer" not in sm
    assert sm.drop("clean") == 1 and len(sm) == 1
    sm.clear()
    assert len(sm) == 0 and sm.nbytes == 0


def test_manager_missing_key_lists_the_closest() -> None:
    sm = StateManager()
    sm.put("blocks.3.hook_resid_pre", torch.zeros(1))
    with pytest.raises(
        ValueError, match=r"No saved state 'blocks\.3\.hook_resid_post'.*blocks\.3\.hook_resid_pre"
    ):
        sm.get("blocks.3.hook_resid_post")
    with pytest.raises(ValueError, match=r"No StateConfig for phase 'corupt' \(did you mean 'corrupt'\?\)"):
        StateManager({"corrupt": StateConfig()}).config("corupt")


def test_concat_appends_along_the_batch_and_checks_shapes() -> None:
    sm = StateManager()
    x, y = torch.randn(2, 1, 3), torch.randn(4, 1, 3)
    pos = torch.tensor([[1], [2]])
    sm.set(SavedState(x, "h", positions=pos, pos_axis=1))
    sm.set(SavedState(y, "h", positions=torch.tensor([[0]] * 4), pos_axis=1), concat=True)
    assert torch.equal(sm.get("h"), torch.cat([x, y]))
    assert sm.entry("h").positions.tolist() == [[1], [2], [0], [0], [0], [0]]
    with pytest.raises(ValueError, match="all axes but the batch must agree"):
        sm.set(
            SavedState(torch.randn(1, 2, 3), "h", positions=torch.tensor([[0, 1]]), pos_axis=1), concat=True
        )


def test_activation_cache_round_trip_loses_nothing() -> None:
    sm = StateManager()
    z = torch.randn(2, 1, 2, 8)
    sm.set(
        SavedState(
            z, "blocks.1.attn.hook_z", "", torch.tensor([[3], [4]]), (0, 2), 1, 2, (("a",) * 5, ("b",) * 5)
        )
    )
    sm.put("blocks.0.hook_resid_pre", torch.randn(2, 5, 16), pos_axis=1)
    sm.put("other", torch.randn(3), tag="t")
    cache = sm.to_activation_cache(model=None)
    assert sorted(cache.keys()) == ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z"]
    back = StateManager.from_activation_cache(cache)
    assert back.keys() == sm.keys(tag="")
    for name in back.names():
        a, b = sm.entry(name), back.entry(name)
        assert torch.equal(a.tensor, b.tensor)
        assert (a.positions is None and b.positions is None) or torch.equal(a.positions, b.positions)
        assert (a.heads, a.pos_axis, a.head_axis, a.str_tokens) == (
            b.heads,
            b.pos_axis,
            b.head_axis,
            b.str_tokens,
        )
    # a plain dict of full activations takes the standard layout of each hook
    plain = StateManager.from_activation_cache(
        {"blocks.0.attn.hook_pattern": torch.randn(1, 4, 5, 5)}, tag="x"
    )
    e = plain.entry("blocks.0.attn.hook_pattern", tag="x")
    assert (e.pos_axis, e.head_axis, e.positions, e.heads) == (2, 1, None, None)
