"""Edits: the same logits as hand-written hooks, the documented order, toggling and scoping, saving and
loading (functions by import path), and a known circuit (ablating the induction head)."""

from __future__ import annotations

import json

import pytest
import torch

from minterp_tl.edits import Edits, function_path
from minterp_tl.models import induction_report
from minterp_tl.specs import Token
from minterp_tl.store import StateStore

CALLS: list[tuple[str, str]] = []


def scale_by(x: torch.Tensor, hook, factor: float = 1.0) -> torch.Tensor:
    """An importable edit function (test_edits:scale_by)."""
    return x * factor


def record(x: torch.Tensor, hook, tag: str) -> None:
    """An importable edit function that only records when it runs."""
    CALLS.append((hook.name, tag))


def _tokens(model, batch: int = 2, pos: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=g)


def _no_edit_hooks(model) -> bool:
    return all(not hp.fwd_hooks for hp in model.hook_dict.values())


@torch.no_grad()
def test_edits_give_exactly_the_logits_of_hand_written_hooks(toy):
    model = toy
    tokens, other = _tokens(model), _tokens(model, batch=1, seed=1)
    reference = _tokens(model, batch=4, seed=2)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(model.cfg.d_model, generator=g)
    has_mlp = "blocks.1.mlp.hook_post" in model.hook_dict
    neuron_hook = "blocks.1.mlp.hook_post" if has_mlp else "blocks.1.hook_attn_out"
    _, ref_cache = model.run_with_cache(reference, names_filter=lambda n: n == neuron_hook)
    ref_mean = ref_cache[neuron_hook].mean(dim=(0, 1))
    _, other_cache = model.run_with_cache(other, names_filter=lambda n: n == "blocks.3.hook_resid_pre")
    stored = other_cache["blocks.3.hook_resid_pre"][:, -1:]
    base = model(tokens)

    edits = Edits(model)
    edits.ablate("heads", "z", layers=[0, 2], heads=[1, 3])
    edits.steer("steer", "resid_post", v, layers="first_half", positions=[0, -1], alpha=2.5)
    edits.ablate("neurons", neuron_hook, neurons=[5, 17], positions=-1, how="mean", reference=reference)
    edits.set("patch", "resid_pre", stored, layers=3, positions=-1)
    edits.add_function("fn", "blocks.3.hook_attn_out", scale_by, kwargs={"factor": 0.5})
    edited = model(tokens)

    def zero_heads(x, hook):
        x = x.clone()
        x[:, :, [1, 3]] = 0.0
        return x

    def add_v(x, hook):
        x = x.clone()
        x[:, [0, x.shape[1] - 1]] += 2.5 * v
        return x

    def mean_neurons(x, hook):
        x = x.clone()
        x[:, -1, [5, 17]] = ref_mean[[5, 17]]
        return x

    def patch(x, hook):
        x = x.clone()
        x[:, -1:] = stored
        return x

    hand = [
        ("blocks.0.attn.hook_z", zero_heads),
        ("blocks.2.attn.hook_z", zero_heads),
        ("blocks.0.hook_resid_post", add_v),
        ("blocks.1.hook_resid_post", add_v),
        (neuron_hook, mean_neurons),
        ("blocks.3.hook_resid_pre", patch),
        ("blocks.3.hook_attn_out", lambda x, hook: x * 0.5),
    ]
    with edits.paused():
        assert torch.equal(model(tokens), base)
        expected = model.run_with_hooks(tokens, fwd_hooks=hand)
    assert torch.equal(edited, expected)
    assert (edited - base).abs().max() > 1e-2  # the edits do something
    # each edit alone, too (a missing or wrong edit cannot hide behind the others)
    for name, hooks in (
        ("heads", hand[:2]),
        ("steer", hand[2:4]),
        ("neurons", hand[4:5]),
        ("patch", hand[5:6]),
    ):
        with edits:
            edits.disable()
            edits.enable(name)
            alone = model(tokens)
            with edits.paused():
                assert torch.equal(alone, model.run_with_hooks(tokens, fwd_hooks=hooks)), name
            assert not torch.equal(alone, base), name
    edits.clear()
    assert _no_edit_hooks(model) and torch.equal(model(tokens), base)


@torch.no_grad()
def test_order_is_forward_order_then_insertion_order(toys):
    model = toys["ln"]
    tokens = _tokens(model)
    edits = Edits(model)
    # inserted out of forward order on purpose
    edits.add_function("late", "resid_post", record, layers=3, kwargs={"tag": "late"})
    edits.add_function("mlp", "mlp_post", record, layers=[2, 0], kwargs={"tag": "mlp"})
    edits.add_function("z", "z", record, layers=[0, 2], kwargs={"tag": "z"})
    edits.add_function("pre", "resid_pre", record, layers=[0, 2], kwargs={"tag": "pre"})
    edits.add_function("pre_again", "blocks.2.hook_resid_pre", record, kwargs={"tag": "pre_again"})
    CALLS.clear()
    model(tokens)
    fired = list(CALLS)
    listed = [(hook, e.name) for hook, e in edits.ordered()]
    # hook.name is the bridge's own name; map the listing to it
    listed_bridge = [(model.hook_dict[h].name, n) for h, n in listed]
    assert fired == listed_bridge
    assert [n for _, n in listed] == ["pre", "z", "mlp", "pre", "pre_again", "z", "mlp", "late"]
    table = edits.table().splitlines()
    assert [line.split()[2] for line in table[2:]] == [n for _, n in listed]
    assert [e.name for e in edits] == ["pre", "z", "mlp", "pre_again", "late"]
    edits.clear()

    # two edits at one hook: insertion order decides, as with hand-written hooks in that order
    v = torch.ones(model.cfg.d_model)
    stored = torch.zeros(model.cfg.d_model)
    edits.set("set", "blocks.1.hook_resid_post", stored, positions=-1)
    edits.steer("add", "blocks.1.hook_resid_post", v, positions=-1)
    set_then_add = model(tokens)
    edits.clear()
    edits.steer("add", "blocks.1.hook_resid_post", v, positions=-1)
    edits.set("set", "blocks.1.hook_resid_post", stored, positions=-1)
    add_then_set = model(tokens)
    edits.clear()

    def set_last(x, hook):
        x = x.clone()
        x[:, -1] = stored
        return x

    def add_last(x, hook):
        x = x.clone()
        x[:, -1] += v
        return x

    name = "blocks.1.hook_resid_post"
    assert torch.equal(
        set_then_add, model.run_with_hooks(tokens, fwd_hooks=[(name, set_last), (name, add_last)])
    )
    assert torch.equal(
        add_then_set, model.run_with_hooks(tokens, fwd_hooks=[(name, add_last), (name, set_last)])
    )
    assert not torch.equal(set_then_add, add_then_set)


@torch.no_grad()
def test_toggle_remove_scope_and_persistence(toys):
    model = toys["gqa"]
    tokens = _tokens(model)
    base = model(tokens)
    edits = Edits(model)
    edits.ablate("a", "z", layers=1, heads=0)
    only_a = model(tokens)
    edits.steer("b", "resid_pre", torch.randn(model.cfg.d_model), layers=2)
    both = model(tokens)
    assert not torch.equal(only_a, base) and not torch.equal(both, only_a)
    model.reset_hooks()  # other code resetting hooks leaves edits alone
    assert torch.equal(model(tokens), both)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == "blocks.1.attn.hook_z")
    assert torch.equal(
        cache["blocks.1.attn.hook_z"][:, :, 0], torch.zeros_like(cache["blocks.1.attn.hook_z"][:, :, 0])
    )
    assert edits.toggle("b") is False and torch.equal(model(tokens), only_a)
    assert [row.split()[4] for row in edits.table().splitlines()[2:] if row.split()[2] == "b"] == ["off"]
    edits.enable("b")
    assert torch.equal(model(tokens), both)
    with edits:
        edits.remove("a")
        edits.ablate("c", "resid_post", layers=0, neurons=[1, 2])
        assert edits.names == ["b", "c"]
        inside = model(tokens)
        assert not torch.equal(inside, both)
    assert edits.names == ["a", "b"] and torch.equal(model(tokens), both)
    edits.disable()
    assert torch.equal(model(tokens), base)
    edits.remove("a", "b")
    assert len(edits) == 0 and _no_edit_hooks(model)


@torch.no_grad()
def test_save_load_round_trip(tmp_path, toys):
    model = toys["ln"]
    tokens = _tokens(model)
    base = model(tokens)
    edits = Edits(model)
    edits.ablate("heads", "z", layers=[1, 3], heads="1:3")
    edits.ablate(
        "mean", "mlp_post", layers=2, neurons=[0, 4, 9], how="mean", reference=_tokens(model, 3, 5, 9)
    )
    edits.steer(
        "steer",
        "resid_pre",
        torch.randn(model.cfg.d_model).to(torch.bfloat16),
        layers="last",
        positions=slice(1, None),
    )
    edits.add_function("fn", "hook_embed", scale_by, kwargs={"factor": 1.5})
    edits.set("set", "blocks.0.hook_attn_out", torch.randn(1, 1, model.cfg.d_model), positions=0)
    edits.disable("mean")
    edited = model(tokens)
    table = edits.table()
    report = edits.write(tmp_path / "e")
    assert "mean/blocks.2.mlp.hook_post" in report.written
    edits.clear()
    assert torch.equal(model(tokens), base)

    loaded = Edits.read(model, tmp_path / "e", functions=[scale_by])
    assert loaded.table() == table and not loaded.is_enabled("mean")
    assert torch.equal(model(tokens), edited)
    loaded.enable("mean")
    with_mean = model(tokens)
    assert not torch.equal(with_mean, edited)
    again = loaded.write(tmp_path / "e")  # only the on/off state changed: no tensor rewritten
    assert again.written == [] and len(again.unchanged) == len(report.written)
    loaded.clear()

    # loading imports nothing: a function edit needs its function given, by name or in a list
    store = StateStore(tmp_path / "e")
    meta = store.metadata
    manifest = json.loads(meta["minterp_tl.edits"])
    with pytest.raises(ValueError, match="calls function 'test_edits:scale_by', which was not given"):
        Edits.read(model, tmp_path / "e")
    assert _no_edit_hooks(model)
    Edits.read(model, tmp_path / "e", functions={"test_edits:scale_by": scale_by}).clear()
    for bad in ("no_such_module_xyz:fn", "os:system", "test_edits:no_such_function", "os; import x:y"):
        manifest["edits"][3]["function"] = bad
        store.save(store.load(), {**meta, "minterp_tl.edits": json.dumps(manifest)})
        with pytest.raises(ValueError, match="which was not given"):
            Edits.read(model, tmp_path / "e", functions=[scale_by])
        assert _no_edit_hooks(model)
    with pytest.raises(ValueError, match="allowed_modules is gone"):
        Edits.read(model, tmp_path / "e", allowed_modules=["minterp_tl"])
    manifest["edits"][3]["function"] = "test_edits:scale_by"
    assert torch.equal(model(tokens), base)
    # edits made for another model shape are refused
    manifest["model"]["d_model"] *= 2
    store.save(store.load(), {**meta, "minterp_tl.edits": json.dumps(manifest)})
    with pytest.raises(ValueError, match="were made for a model"):
        Edits.read(model, tmp_path / "e", functions=[scale_by])
    assert _no_edit_hooks(model)


def test_unsaveable_and_bad_edits_are_refused(tmp_path, toys):
    model = toys["ln"]
    edits = Edits(model)
    edits.add_function("lam", "resid_pre", lambda x, hook: x, layers=0)
    with pytest.raises(ValueError, match="no import path"):
        edits.write(tmp_path / "x")
    assert function_path(scale_by) == "test_edits:scale_by" and function_path(print) is None
    with pytest.raises(ValueError, match="nothing is imported by name"):
        edits.add_function("by_name", "resid_pre", "test_edits:scale_by", layers=0)
    with pytest.raises(ValueError, match="already exists"):
        edits.ablate("lam", "z", layers=0)
    with pytest.raises(ValueError, match="resid_pre"):  # closest names suggested
        edits.ablate("typo", "resid_pree", layers=0)
    with pytest.raises(ValueError, match="layer spec"):
        edits.ablate("bad_layer", "z", layers=9)
    with pytest.raises(ValueError, match="token position"):
        edits.steer("tok", "resid_pre", torch.ones(model.cfg.d_model), layers=0, positions=Token(" Paris"))
    with pytest.raises(ValueError, match="exactly one of reference"):
        edits.ablate("m", "z", layers=0, how="mean")
    with pytest.raises(ValueError, match="heads= or neurons="):
        edits.ablate("hn", "z", layers=0, heads=0, neurons=0)
    with pytest.raises(ValueError, match="No edit named 'lamb' \\(did you mean 'lam'\\?\\)"):
        edits.remove("lamb")
    with pytest.raises(ValueError, match="no head axis"):  # refused when added, before any forward pass
        edits.ablate("no_head_axis", "resid_pre", layers=1, heads=0)
    with pytest.raises(ValueError, match="Edit 'far'.*head spec 7"):
        edits.ablate("far", "z", layers=1, heads=7)
    assert edits.names == ["lam"]
    edits.clear()
    assert _no_edit_hooks(model)


@torch.no_grad()
def test_ablating_the_induction_circuit_breaks_induction(induction_model):
    """The trained model's circuit: a previous-token head in layer 0 feeding induction heads in layer 1.
    Zero-ablating the previous-token head, or the layer-1 induction heads, puts the loss on the repeated
    half back near chance (the first half's loss); ablating any other layer-0 head barely matters."""
    model = induction_model
    base = induction_report(model, length=11, batch=32)
    prev_layer, prev_head = base.best_prev_token_head()
    assert prev_layer == 0 and base.prev_token_scores[0, prev_head] > 0.9
    induction_heads = [h for h in range(model.cfg.n_heads) if base.induction_scores[1, h] > 0.3]
    assert induction_heads
    edits = Edits(model)
    edits.ablate("prev_token", "z", layers=0, heads=prev_head)
    no_prev = induction_report(model, length=11, batch=32).second_half_loss
    edits.toggle("prev_token")
    edits.ablate("induction", "z", layers=1, heads=induction_heads)
    no_induction = induction_report(model, length=11, batch=32).second_half_loss
    edits.clear()
    others = {}
    for h in range(model.cfg.n_heads):
        if h != prev_head:
            with edits:
                edits.ablate("other", "z", layers=0, heads=h)
                others[h] = induction_report(model, length=11, batch=32).second_half_loss
    print(
        f"second-half loss: base {base.second_half_loss:.3f} (chance {base.first_half_loss:.3f}); "
        f"prev-token head L0H{prev_head} ablated {no_prev:.3f}; induction heads L1{induction_heads} "
        f"ablated {no_induction:.3f}; other L0 heads ablated {others}"
    )
    assert base.second_half_loss < 0.5
    assert no_prev > base.first_half_loss - 0.5
    assert no_induction > base.first_half_loss - 0.5
    assert all(loss < base.second_half_loss + 1.0 for loss in others.values())
    assert induction_report(model, length=11, batch=32).second_half_loss == base.second_half_loss


@torch.no_grad()
def test_smollm2_edits_equal_hand_written_hooks(smollm2):
    model = smollm2
    tokens = model.to_tokens("The capital of France is")
    base = model(tokens)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(model.cfg.d_model, generator=g)
    edits = Edits(model)
    edits.ablate("heads", "z", layers=[3, 20], heads=[0, 4, 8])
    edits.steer("steer", "resid_post", v, layers=10, positions=-1, alpha=8.0)
    edited = model(tokens)
    edits.clear()

    def zero_heads(x, hook):
        x = x.clone()
        x[:, :, [0, 4, 8]] = 0.0
        return x

    def add_v(x, hook):
        x = x.clone()
        x[:, -1] += 8.0 * v
        return x

    expected = model.run_with_hooks(
        tokens,
        fwd_hooks=[
            ("blocks.3.attn.hook_z", zero_heads),
            ("blocks.20.attn.hook_z", zero_heads),
            ("blocks.10.hook_resid_post", add_v),
        ],
    )
    assert torch.equal(edited, expected)
    assert not torch.equal(edited, base)
    assert torch.equal(model(tokens), base)
