"""RepresentationContext: construction, clone, and the errors it raises before and when it runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from minterp_tl.context import RepresentationContext
from minterp_tl.wrapper import ModelWrapper


def test_prompt_forms_are_normalized() -> None:
    assert RepresentationContext("hi").prompts == ("hi",)
    assert RepresentationContext(["a", "b"]).batch_size == 2
    t = RepresentationContext([[1, 2, 3], [4, 5, 6]]).prompts
    assert isinstance(t, torch.Tensor) and t.tolist() == [[1, 2, 3], [4, 5, 6]]
    ragged = RepresentationContext([[1, 2, 3], [4]]).prompts
    assert ragged == ((1, 2, 3), (4,))
    assert RepresentationContext(torch.tensor([7, 8])).prompts.shape == (1, 2)


def test_context_is_frozen_and_clone_overrides() -> None:
    ctx = RepresentationContext(
        ["a"], layers="n//2:", positions="last", hooks="z", metadata={"k": 1}, name="clean"
    )
    assert ctx.hooks == ("z",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.layers = 3
    with pytest.raises(TypeError):
        ctx.metadata["k"] = 2
    nxt = ctx.clone(prompts=["b"], name="corrupt", metadata={"j": 2})
    assert (nxt.prompts, nxt.name, nxt.layers, nxt.positions) == (("b",), "corrupt", "n//2:", "last")
    assert dict(nxt.metadata) == {"k": 1, "j": 2}
    assert ctx.prompts == ("a",)  # the original is untouched
    assert dict(ctx.clone(metadata=None).metadata) == {}
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['layer'\].*'layers'"):
        ctx.clone(layer=3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"prompts": []}, "prompts must be"),
        ({"prompts": 3}, "prompts must be"),
        ({"prompts": torch.randn(2, 3)}, "integer token ids"),
        ({"prompts": ["a"], "hooks": [1]}, "hooks must be hook names"),
        ({"prompts": ["a"], "layers": "n**2"}, "layer spec"),
        ({"prompts": ["a"], "heads": "__import__('os')"}, "head spec"),
    ],
)
def test_bad_contexts_fail_when_built(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        RepresentationContext(**kwargs)


def test_specs_and_names_are_checked_against_the_model_when_run(toys) -> None:
    w = ModelWrapper(toys["ln"])
    tokens = torch.randint(0, 50, (2, 6))
    with pytest.raises(ValueError, match=r"n_layers=4"):
        w.run(RepresentationContext(tokens, layers=7))
    with pytest.raises(ValueError, match=r"resid_post"):
        w.run(RepresentationContext(tokens, hooks=("resid_pst",)))
    with pytest.raises(ValueError, match=r"n_positions=6"):
        w.run(RepresentationContext(tokens, positions=9))
    with pytest.raises(ValueError, match=r"n_heads=4"):
        w.run(RepresentationContext(tokens, hooks=("z",), heads=[0, 4]))
    with pytest.raises(ValueError, match="no tokenizer"):
        w.run(RepresentationContext("text prompt"))
    with pytest.raises(ValueError, match="resid_mid.*not exist|does not exist"):
        ModelWrapper(toys["attn_only"]).run(RepresentationContext(tokens, hooks=("resid_mid",)))
