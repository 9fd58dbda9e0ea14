"""Nothing is lost: the model cache is hashed, rebuilt (with a warning naming the file) when it is
damaged, and a cache that cannot be written is a warning, never a lost model; saved states whose names
look like the store's own keys keep their positions."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from minterp_tl.models import train_induction_model
from minterp_tl.state import SavedState, StateManager

TINY = dict(
    n_layers=1, steps=3, batch_size=4, d_model=16, n_heads=2, d_vocab=8, train_lengths=(3, 4), progress=False
)


def _cache_file(folder):
    (path,) = folder.glob("induction-*.safetensors")
    return path


def _logits(model):
    return model(torch.arange(9)[None]).detach()


def test_damaged_or_tampered_cache_is_rebuilt_with_a_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = _logits(train_induction_model(cache_dir=tmp_path, **TINY))
        again = _logits(train_induction_model(cache_dir=tmp_path, **TINY))  # from the cache, silently
    assert torch.equal(first, again)
    path = _cache_file(tmp_path)
    for damage in ("garbage", "tamper"):
        if damage == "garbage":
            path.write_bytes(b"not a safetensors file")
            expected = "cannot be read"
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
            state = load_file(str(path))
            name = next(iter(state))
            state[name] = state[name] + 1.0
            save_file(state, str(path), metadata=meta)
            expected = "does not match its hash"
        with pytest.warns(RuntimeWarning, match=expected) as said:
            rebuilt = _logits(train_induction_model(cache_dir=tmp_path, **TINY))
        assert str(path) in str(said[0].message)
        assert torch.equal(rebuilt, first)  # same seed, retrained
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(_logits(train_induction_model(cache_dir=tmp_path, **TINY)), first)  # rewritten


def test_a_cache_that_cannot_be_written_is_a_warning_not_a_lost_model(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    with pytest.warns(RuntimeWarning, match="could not be cached"):
        model = train_induction_model(cache_dir=blocked / "sub", **TINY)
    assert _logits(model).shape == (1, 9, 9)


@pytest.mark.parametrize(
    "bad", [dict(steps=0), dict(steps=2.5), dict(batch_size=True), dict(lr=float("nan")), dict(n_layers=0)]
)
def test_bad_training_arguments_are_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="train_induction_model"):
        train_induction_model(cache_dir=tmp_path, **{**TINY, **bad})


def test_a_state_named_like_positions_keeps_both(tmp_path):
    manager = StateManager()
    a = SavedState(torch.randn(2, 3, 4), "x", positions=torch.tensor([[0, 1, 2], [1, 2, 3]]), pos_axis=1)
    b = SavedState(torch.randn(5), "x#positions")
    manager.set(a)
    manager.set(b)
    manager.write(tmp_path / "s")
    loaded = StateManager.read(tmp_path / "s")
    assert torch.equal(loaded.entry("x").positions, a.positions) and torch.equal(loaded.get("x"), a.tensor)
    assert torch.equal(loaded.get("x#positions"), b.tensor)
