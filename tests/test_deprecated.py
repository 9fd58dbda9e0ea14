"""Every renamed public spelling still works for one release, warns, and means exactly the new one."""

from __future__ import annotations

import pytest
import torch

from minterp_tl import hooks
from minterp_tl.context import RepresentationContext
from minterp_tl.edits import Edits
from minterp_tl.state import LoadRule, SaveRule, StateConfig, StateManager
from minterp_tl.wrapper import ModelWrapper


def test_moved_and_renamed_fields_warn_and_keep_their_meaning() -> None:
    import minterp_tl.state as state

    for old, new in (
        ("hook_layout", hooks.hook_layout),
        ("gather", hooks.gather),
        ("scatter", hooks.scatter),
    ):
        with pytest.warns(
            DeprecationWarning, match=f"minterp_tl.state.{old} is deprecated; use minterp_tl.hooks"
        ):
            assert getattr(state, old) is new
    with pytest.warns(DeprecationWarning, match=r"SaveRule\(state=...\)"):
        assert SaveRule(state="resid_pre", layers=1) == SaveRule("resid_pre", layers=1)
    with pytest.warns(DeprecationWarning, match=r"LoadRule\(state=...\)"):
        rule = LoadRule(state="z", tag="clean")
    with pytest.warns(DeprecationWarning, match=r"LoadRule.state is deprecated"):
        assert rule.state == rule.hook == "z"
    with pytest.warns(DeprecationWarning, match=r"mode='replace'"):
        assert LoadRule("z", mode="replace").mode == "set"
    with pytest.raises(TypeError, match="not both"):
        SaveRule(hook="z", state="z")
    with pytest.warns(DeprecationWarning, match=r"RepresentationContext\(states=...\)"):
        ctx = RepresentationContext("a", states=("z",))
    assert ctx.hooks == ("z",)
    with pytest.warns(DeprecationWarning, match=r"clone\(states=...\)"):
        assert ctx.clone(states="q").hooks == ("q",)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        state.nothing  # noqa: B018


def test_state_manager_disk_verbs_and_positional_tags(tmp_path, toys) -> None:
    model = toys["ln"]
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 5), generator=torch.Generator().manual_seed(0))
    sm = StateManager({"clean": StateConfig(save=SaveRule("resid_pre", layers=0, tag="clean"))})
    ModelWrapper(model).run(RepresentationContext(tokens), sm, phase="clean")
    name = "blocks.0.hook_resid_pre"
    with pytest.warns(DeprecationWarning, match=r"StateManager.get\(name, tag\)"):
        assert torch.equal(sm.get(name, "clean"), sm.get(name, tag="clean"))
    with pytest.warns(DeprecationWarning, match=r"StateManager.save\(path\)"):
        sm.save(tmp_path / "s")
    with pytest.warns(DeprecationWarning, match=r"StateManager.load\(path\)"):
        back = StateManager.load(tmp_path / "s")
    assert torch.equal(back.get(name, tag="clean"), StateManager.read(tmp_path / "s").get(name, tag="clean"))
    with pytest.warns(DeprecationWarning, match=r"StateManager.pop\(name, tag\)"):
        back.pop(name, "clean")
    assert len(back) == 0


@torch.no_grad()
def test_edits_old_spellings(tmp_path, toys) -> None:
    model = toys["ln"]
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 5), generator=torch.Generator().manual_seed(1))
    value = torch.randn(1, 1, model.cfg.d_model)
    edits = Edits(model)
    with pytest.warns(DeprecationWarning, match="Edits.set_state is deprecated; use Edits.set"):
        edits.set_state("old", "resid_pre", value, layers=1, positions=-1)
    old = model(tokens)
    edits.remove("old")
    edits.set("new", "resid_pre", value, layers=1, positions=-1)
    assert torch.equal(model(tokens), old)
    with pytest.warns(DeprecationWarning, match=r"Edits.save\(path\)"):
        edits.save(tmp_path / "e")
    edits.clear()
    with pytest.warns(DeprecationWarning, match=r"Edits.load\(model, path\)"):
        loaded = Edits.load(model, tmp_path / "e")
    assert torch.equal(model(tokens), old)
    loaded.clear()


def test_circuit_mask_disk_verbs(tmp_path, toys) -> None:
    from minterp_tl.circuits import CircuitConfig, CircuitModel

    model = toys["ln"]
    hc = dict(ablation="none", mask_unit="weight", mask_bias=False, mask_init_percentage=0.7)
    with CircuitModel(CircuitConfig("hard_concrete", hc, ("attn[::2]",)), model) as circuit:
        with pytest.warns(
            DeprecationWarning, match="CircuitModel.save_masks is deprecated; use CircuitModel.write_masks"
        ):
            circuit.save_masks(tmp_path / "m")
        with pytest.warns(DeprecationWarning, match="CircuitModel.load_masks"):
            circuit.load_masks(tmp_path / "m")
        state = circuit.mask_state()
    with pytest.warns(DeprecationWarning, match="CircuitModel.load is deprecated; use CircuitModel.read"):
        again = CircuitModel.load(tmp_path / "m", model)
    with again:
        assert all(torch.equal(state[k], v) for k, v in again.mask_state().items())
