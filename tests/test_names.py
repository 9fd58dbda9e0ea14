"""Tests for minterp_tl.names: every spelling resolves to the exact canonical hook name, on each toy
model and on SmolLM2; aliases agree; the cache values behind the names are the right activations;
errors say what went wrong and what would work."""

from __future__ import annotations

import re

import pytest
import torch

from minterp_tl.names import (
    KINDS,
    canonical_names,
    resolve_name,
    resolve_names,
    short_name,
)

BRIDGE_SUFFIXES = (".hook_in", ".hook_out")


def _has_mlp(model) -> bool:
    """Whether the model has MLP blocks (all toys except attn_only), from its config."""
    return not model.cfg.attn_only


def _expected_forms(n_layers: int, has_mlp: bool) -> list[tuple[tuple, str]]:
    """(resolve_name args, expected canonical name) for every accepted form, on an n-layer model."""
    last = n_layers - 1
    forms: list[tuple[tuple, str]] = [
        # (a) full names, legacy and bridge aliases
        (("blocks.1.hook_resid_pre",), "blocks.1.hook_resid_pre"),
        (("blocks.0.hook_in",), "blocks.0.hook_resid_pre"),
        (("blocks.2.hook_out",), "blocks.2.hook_resid_post"),
        (("blocks.1.attn.hook_out",), "blocks.1.hook_attn_out"),
        (("blocks.2.attn.o.hook_in",), "blocks.2.attn.hook_z"),
        (("blocks.1.attn.q.hook_out",), "blocks.1.attn.hook_q"),
        (("blocks.0.attn.hook_attn_in",), "blocks.0.hook_attn_in"),
        (("blocks.0.attn.hook_q_input",), "blocks.0.hook_q_input"),
        (("blocks.1.attn.q.hook_in",), "blocks.1.attn.q.hook_in"),
        (("embed.hook_out",), "hook_embed"),
        (("unembed.hook_out",), "hook_unembed"),
        (("ln_final.hook_out",), "ln_final.hook_out"),
        ((f"blocks.{last}.hook_resid_post",), f"blocks.{last}.hook_resid_post"),
        (("blocks.-1.hook_resid_post",), f"blocks.{last}.hook_resid_post"),
        # (b) get_act_name short forms, layer from the argument, a tuple, or inside the name
        (("resid_pre", 3), "blocks.3.hook_resid_pre"),
        ((("resid_pre", 3),), "blocks.3.hook_resid_pre"),
        ((("z", 2, "attn"),), "blocks.2.attn.hook_z"),
        (("z", 2, "attn"), "blocks.2.attn.hook_z"),
        (("pattern", 3), "blocks.3.attn.hook_pattern"),
        (("pattern", -1), f"blocks.{last}.attn.hook_pattern"),
        (("attn", 1), "blocks.1.attn.hook_pattern"),  # get_act_name's own alias
        (("k2",), "blocks.2.attn.hook_k"),
        (("q0",), "blocks.0.attn.hook_q"),
        (("attn_out", 1), "blocks.1.hook_attn_out"),
        (("resid_post", 0), "blocks.0.hook_resid_post"),
        (("q_input", 2), "blocks.2.hook_q_input"),
        (("attn_in", 2), "blocks.2.hook_attn_in"),
        (("mlp_in", 1), "blocks.1.hook_mlp_in"),
        (("scale", 1, "ln1"), "blocks.1.ln1.hook_scale"),
        (("normalized1ln1",), "blocks.1.ln1.hook_normalized"),
        (("scale",), "ln_final.hook_scale"),
        (("embed",), "hook_embed"),
        (("unembed",), "hook_unembed"),
        # block-relative names with a layer
        (("attn.hook_pattern", 1), "blocks.1.attn.hook_pattern"),
        (("hook_resid_pre", 2), "blocks.2.hook_resid_pre"),
        (("hook_in", 2), "blocks.2.hook_resid_pre"),
        (("attn.hook_in", 0), "blocks.0.attn.hook_in"),
        # (c) minterp style
        (("layer_3",), "blocks.3.hook_resid_post"),
        (("layer_0",), "blocks.0.hook_resid_post"),
        (("layer_-1",), f"blocks.{last}.hook_resid_post"),
        (("layer", 2), "blocks.2.hook_resid_post"),
        (("lm_head",), "hook_unembed"),
        (("logits",), "hook_unembed"),
        # (d) nnterp style
        (("layers.3",), "blocks.3.hook_resid_post"),
        (("layers.3.output",), "blocks.3.hook_resid_post"),
        (("layers.-1",), f"blocks.{last}.hook_resid_post"),
        (("layers.3.input",), "blocks.3.hook_resid_pre"),
        (("layers.3.self_attn",), "blocks.3.hook_attn_out"),
        (("layers.3.self_attn.output",), "blocks.3.hook_attn_out"),
        (("layers.3.attn",), "blocks.3.hook_attn_out"),
        (("layers.2.attn.output",), "blocks.2.hook_attn_out"),
        (("layers.3.self_attn.input",), "blocks.3.attn.hook_in"),
        (("model.layers.1.self_attn",), "blocks.1.hook_attn_out"),
        (("embed_tokens",), "hook_embed"),
        (("ln_final",), "ln_final.hook_normalized"),
        (("norm",), "ln_final.hook_normalized"),
        (("model.norm",), "ln_final.hook_normalized"),
    ]
    if has_mlp:
        forms += [
            (("blocks.1.ln2.hook_in",), "blocks.1.hook_resid_mid"),
            (("blocks.1.mlp.out.hook_in",), "blocks.1.mlp.hook_post"),
            (("blocks.3.mlp.hook_out",), "blocks.3.hook_mlp_out"),
            (("resid_mid", 1), "blocks.1.hook_resid_mid"),
            (("mlp_out", 1), "blocks.1.hook_mlp_out"),
            (("mlp_post", 1), "blocks.1.mlp.hook_post"),
            (("post", 2), "blocks.2.mlp.hook_post"),
            (("pre3",), "blocks.3.mlp.hook_pre"),
            (("layers.3.mlp",), "blocks.3.hook_mlp_out"),
            (("layers.3.mlp.output",), "blocks.3.hook_mlp_out"),
            (("layers.3.mlp.input",), "blocks.3.mlp.hook_in"),
            (("layers.-1.mlp",), f"blocks.{last}.hook_mlp_out"),
        ]
    return forms


# --------------------------------------------------------------------------------------------
# Resolution on the toys
# --------------------------------------------------------------------------------------------


def test_every_form_resolves_exactly(toy):
    forms = _expected_forms(toy.cfg.n_layers, _has_mlp(toy))
    got = {args: resolve_name(toy, *args) for args, _ in forms}
    assert got == {args: expected for args, expected in forms}
    for expected in got.values():
        assert expected in toy.hook_dict


def test_resolve_name_is_idempotent_and_names_are_canonical(toy):
    for names in canonical_names(toy).values():
        for name in names:
            assert resolve_name(toy, name) == name


def test_aliases_share_one_canonical_name(toy):
    hook_dict = toy.hook_dict
    aliases: dict[int, list[str]] = {}
    for name, hook_point in hook_dict.items():
        aliases.setdefault(id(hook_point), []).append(name)
    assert any(len(names) > 1 for names in aliases.values())
    for names in aliases.values():
        canonical = {resolve_name(toy, name) for name in names}
        assert len(canonical) == 1, names
        (chosen,) = canonical
        assert chosen in names
        for name in names:
            assert hook_dict[chosen] is hook_dict[name]
        legacy = [n for n in names if not n.endswith(BRIDGE_SUFFIXES)]
        if legacy:
            assert not chosen.endswith(BRIDGE_SUFFIXES), names


def test_ln_final_without_hook_normalized_falls_back_to_hook_out():
    from transformer_lens.model_bridge import TransformerBridge

    from minterp_tl.models import toy_config

    cfg = toy_config("ln", n_layers=2)
    cfg.normalization_type = None
    model = TransformerBridge.boot_native(cfg)
    assert "ln_final.hook_normalized" not in model.hook_dict
    assert resolve_name(model, "ln_final") == "ln_final.hook_out"
    assert resolve_name(model, "norm") == "ln_final.hook_out"
    assert resolve_name(model, "layers.-1") == "blocks.1.hook_resid_post"
    with pytest.raises(ValueError, match="does not exist on this model"):
        resolve_name(model, "ln_final.hook_normalized")


def test_resolve_names(toy):
    assert resolve_names(toy, "pattern", [0, 2, -1]) == [
        "blocks.0.attn.hook_pattern",
        "blocks.2.attn.hook_pattern",
        "blocks.3.attn.hook_pattern",
    ]
    assert resolve_names(toy, "layer", [1, 3]) == ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
    assert resolve_names(toy, "attn.hook_z", []) == []
    with pytest.raises(ValueError, match="out of range"):
        resolve_names(toy, "resid_pre", [0, 4])


def test_short_name():
    assert short_name("blocks.3.attn.hook_pattern") == ("pattern", 3)
    assert short_name("blocks.12.hook_resid_pre") == ("resid_pre", 12)
    assert short_name("blocks.0.mlp.hook_post") == ("post", 0)
    assert short_name("blocks.1.hook_attn_out") == ("attn_out", 1)
    assert short_name("hook_embed") == ("embed", None)
    assert short_name("hook_unembed") == ("unembed", None)
    assert short_name("ln_final.hook_normalized") == ("normalized", None)
    assert short_name("blocks.2.ln1.hook_scale") == ("ln1.hook_scale", 2)
    assert short_name("blocks.1.attn.q.hook_in") == ("attn.q.hook_in", 1)
    assert short_name("ln_final.hook_out") == ("ln_final.hook_out", None)


def test_short_name_round_trips(toy):
    for names in canonical_names(toy).values():
        for name in names:
            assert resolve_name(toy, *short_name(name)) == name


# --------------------------------------------------------------------------------------------
# canonical_names
# --------------------------------------------------------------------------------------------


def test_canonical_names_cover_each_hook_point_once(toy):
    groups = canonical_names(toy)
    flat = [name for names in groups.values() for name in names]
    assert len(flat) == len(set(flat))
    hook_dict = toy.hook_dict
    assert sorted(id(hook_dict[name]) for name in flat) == sorted({id(h) for h in hook_dict.values()})

    assert list(groups) == [kind for kind in KINDS if kind in groups]
    assert all(groups.values())
    for kind, names in groups.items():
        for name in names:
            if kind == "bridge":
                aliases = [n for n, h in hook_dict.items() if h is hook_dict[name]]
                assert all(a.endswith(BRIDGE_SUFFIXES) for a in aliases), aliases
            else:
                assert not name.endswith(BRIDGE_SUFFIXES), (kind, name)

    n = toy.cfg.n_layers
    kinds = ["pre", "mid", "post"] if _has_mlp(toy) else ["pre", "post"]
    assert groups["resid"] == [f"blocks.{l}.hook_resid_{k}" for l in range(n) for k in sorted(kinds)]
    has_pos_embed = toy.cfg.positional_embedding_type == "standard"
    assert groups["embed"] == (["hook_embed", "hook_pos_embed"] if has_pos_embed else ["hook_embed"])
    assert groups["unembed"] == ["hook_unembed"]
    assert groups["norm"][-2:] == ["ln_final.hook_normalized", "ln_final.hook_scale"]
    assert "blocks.0.attn.hook_pattern" in groups["attn"]
    assert "blocks.0.hook_attn_out" in groups["attn"]
    assert "blocks.0.hook_q_input" in groups["attn"]
    assert "ln_final.hook_out" in groups["bridge"]
    assert "blocks.0.attn.q.hook_in" in groups["bridge"]
    if _has_mlp(toy):
        assert {"blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out"} <= set(groups["mlp"])
    else:
        assert groups["mlp"] == [f"blocks.{l}.hook_mlp_in" for l in range(n)]


def test_canonical_names_returns_a_copy(toy):
    first = canonical_names(toy)
    first["resid"].clear()
    first.pop("attn")
    again = canonical_names(toy)
    assert again["resid"] and "attn" in again


# --------------------------------------------------------------------------------------------
# The names point at the right activations
# --------------------------------------------------------------------------------------------


def test_resolved_names_index_the_right_activations(toy):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, toy.cfg.d_vocab, (2, 7), generator=generator)
    with torch.no_grad():
        _, cache = toy.run_with_cache(tokens)

    layer_1_out = cache[resolve_name(toy, "layers.1")]
    assert torch.equal(layer_1_out, cache["blocks.2.hook_resid_pre"])
    assert torch.equal(cache[resolve_name(toy, "layer_1")], layer_1_out)

    attn_sum = cache[resolve_name(toy, "layers.1.input")] + cache[resolve_name(toy, "layers.1.self_attn")]
    after_attn = "blocks.1.hook_resid_mid" if _has_mlp(toy) else "blocks.1.hook_resid_post"
    torch.testing.assert_close(attn_sum, cache[after_attn], atol=1e-5, rtol=0)
    assert not torch.allclose(cache[resolve_name(toy, "layers.1.self_attn")], torch.zeros(()))
    if _has_mlp(toy):
        mlp_sum = cache["blocks.1.hook_resid_mid"] + cache[resolve_name(toy, "layers.1.mlp")]
        torch.testing.assert_close(mlp_sum, cache[resolve_name(toy, "layers.1.output")], atol=1e-5, rtol=0)

    logits = cache[resolve_name(toy, "logits")]
    assert logits.shape == (2, 7, toy.cfg.d_vocab)
    assert torch.equal(cache[resolve_name(toy, "embed_tokens")], toy.embed.W_E[tokens])


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, suggestion",
    [
        (("blocks.1.hook_resid_pr",), "blocks.1.hook_resid_pre"),
        (("patern", 1), "pattern (= blocks.1.attn.hook_pattern)"),
        (("patern", 1), "blocks.1.attn.hook_pattern"),
        (("resid_pst", 2), "resid_post (= blocks.2.hook_resid_post)"),
        (("layers.2.self_atn",), "layers.2.self_attn (= blocks.2.hook_attn_out)"),
        (("blocks.0.attn.hook_patern",), "blocks.0.attn.hook_pattern"),
        (("lm_haed",), "lm_head (= hook_unembed)"),
    ],
)
def test_misspellings_suggest_the_right_name(toy, args, suggestion):
    with pytest.raises(ValueError) as error:
        resolve_name(toy, *args)
    message = str(error.value)
    assert repr(args[0]) in message
    assert "Closest real names:" in message
    assert suggestion in message


@pytest.mark.parametrize("name", ["pattern", "resid_pre", "attn.hook_pattern", "hook_resid_post", "layer"])
def test_per_layer_name_without_layer(toy, name):
    expected = {
        "pattern": "blocks.0.attn.hook_pattern",
        "resid_pre": "blocks.0.hook_resid_pre",
        "attn.hook_pattern": "blocks.0.attn.hook_pattern",
        "hook_resid_post": "blocks.0.hook_resid_post",
        "layer": "blocks.0.hook_resid_post",
    }[name]
    with pytest.raises(ValueError, match="needs a layer") as error:
        resolve_name(toy, name)
    assert repr(expected) in str(error.value)


@pytest.mark.parametrize(
    "args",
    [
        ("layer_4",),
        ("layer_-5",),
        ("layers.4",),
        ("layers.-5.input",),
        ("pattern", 4),
        ("resid_pre", -5),
        ("k9",),
        ("blocks.4.hook_resid_pre",),
        ("attn.hook_z", 7),
    ],
)
def test_out_of_range_layer(toy, args):
    with pytest.raises(ValueError, match=re.escape("n_layers=4")) as error:
        resolve_name(toy, *args)
    assert "0..3" in str(error.value) and "-4..-1" in str(error.value)
    assert repr(args[0]) in str(error.value)


def test_missing_on_attn_only(toys):
    attn_only, ln = toys["attn_only"], toys["ln"]
    missing = [
        ("resid_mid", 1),
        ("mlp_out", 1),
        ("mlp_post", 0),
        ("layers.1.mlp",),
        ("layers.1.mlp.input",),
        ("blocks.1.hook_resid_mid",),
    ]
    for args in missing:
        with pytest.raises(ValueError, match="does not exist on this model") as error:
            resolve_name(attn_only, *args)
        assert repr(args[0]) in str(error.value)
        assert resolve_name(ln, *args) in ln.hook_dict
    with pytest.raises(ValueError, match="resid_post \\(= blocks.1.hook_resid_post\\)"):
        resolve_name(attn_only, "resid_mid", 1)
    with pytest.raises(ValueError, match="does not exist on this model"):
        resolve_name(ln, "rot_q", 1)  # rotary only
    assert resolve_name(toys["gqa"], "rot_q", 1) == "blocks.1.attn.hook_rot_q"


@pytest.mark.parametrize(
    "args, message",
    [
        ((3,), "must be a str or a tuple"),
        ((["resid_pre", 1],), "must be a str or a tuple"),
        ((None,), "must be a str or a tuple"),
        (((),), "1 to 3 items"),
        ((("resid_pre", 1), 2), "given twice"),
        (("layer_1", 2), "given twice"),
        (("layers.1.input", 2), "given twice"),
        (("k1", 2), "given twice"),
        (("blocks.1.hook_resid_pre", 2), "given twice"),
        (("resid_pre", 1.0), "must be an int"),
        (("resid_pre", "1"), "must be an int"),
        (("resid_pre", True), "must be an int"),
        (("embed", 2), "takes no layer"),
        (("lm_head", 0), "takes no layer"),
        (("hook_nonsense",), "Unknown hook name 'hook_nonsense'"),
        (("",), "Unknown hook name ''"),
    ],
)
def test_bad_arguments(toy, args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_name(toy, *args)


# --------------------------------------------------------------------------------------------
# SmolLM2-135M (30 layers, RMSNorm, rotary, gated MLP)
# --------------------------------------------------------------------------------------------


def test_smollm2_names(smollm2):
    model = smollm2
    assert model.cfg.n_layers == 30
    forms = _expected_forms(30, has_mlp=True) + [
        (("resid_pre", 29), "blocks.29.hook_resid_pre"),
        (("pattern", 29), "blocks.29.attn.hook_pattern"),
        (("k29",), "blocks.29.attn.hook_k"),
        (("layer_29",), "blocks.29.hook_resid_post"),
        (("layers.29",), "blocks.29.hook_resid_post"),
        (("layers.29.input",), "blocks.29.hook_resid_pre"),
        (("layers.29.self_attn",), "blocks.29.hook_attn_out"),
        (("layers.29.self_attn.input",), "blocks.29.attn.hook_in"),
        (("layers.29.mlp",), "blocks.29.hook_mlp_out"),
        (("layers.29.mlp.input",), "blocks.29.mlp.hook_in"),
        (("layers.-1.mlp.input",), "blocks.29.mlp.hook_in"),
        (("mlp_out", -1), "blocks.29.hook_mlp_out"),
        (("blocks.29.hook_out",), "blocks.29.hook_resid_post"),
        (("blocks.10.mlp.gate.hook_out",), "blocks.10.mlp.hook_pre"),
        (("blocks.10.mlp.in.hook_out",), "blocks.10.mlp.hook_pre_linear"),
        (("rotary_emb.hook_out",), "hook_pos_embed"),
        (("rot_q", 29), "blocks.29.attn.hook_rot_q"),
    ]
    got = {args: resolve_name(model, *args) for args, _ in forms}
    assert got == {args: expected for args, expected in forms}

    groups = canonical_names(model)
    flat = [name for names in groups.values() for name in names]
    hook_dict = model.hook_dict
    assert sorted(id(hook_dict[n]) for n in flat) == sorted({id(h) for h in hook_dict.values()})
    assert len(flat) == len(set(flat))
    resid = groups["resid"]
    assert resid[:3] == ["blocks.0.hook_resid_mid", "blocks.0.hook_resid_post", "blocks.0.hook_resid_pre"]
    assert resid.index("blocks.2.hook_resid_pre") < resid.index("blocks.10.hook_resid_pre")  # numeric
    assert resid[-1] == "blocks.29.hook_resid_pre" and len(resid) == 90
    assert groups["embed"] == ["hook_embed", "hook_pos_embed"]
    for names in groups.values():
        for name in names:
            assert resolve_name(model, *short_name(name)) == name

    with pytest.raises(ValueError, match=re.escape("n_layers=30")) as error:
        resolve_name(model, "layers.30")
    assert "0..29" in str(error.value)
    with pytest.raises(ValueError, match="blocks.7.hook_resid_pre"):
        resolve_name(model, "blocks.7.hook_resid_pr")
