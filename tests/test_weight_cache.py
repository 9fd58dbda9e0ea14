"""The SmolLM2 weight cache: the second load skips the GGUF file and gives the same model bit for bit; a
damaged, partial or mismatched entry is reported with a warning and rebuilt; a cache that cannot be
written still loads. Every test uses its own ``MINTERP_TL_CACHE``, never the user's cache."""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from minterp_tl import _smollm2_cache as cache_entry
from minterp_tl import induction, models

PROMPTS = ("The capital of France is", "  Hello,\nworld! 1234 éà <|im_start|>")


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(model.to_tokens(PROMPTS[0]))


def _entry(cache: Path) -> Path:
    (entry,) = [p for p in cache.iterdir() if p.name.startswith("smollm2-135m-")]
    return entry


def _load(monkeypatch: pytest.MonkeyPatch, cache: Path) -> Any:
    """``load_model("smollm2-135m")`` as a new process would: this cache, no model loaded yet."""
    monkeypatch.setenv("MINTERP_TL_CACHE", str(cache))
    monkeypatch.setattr(models, "_MODEL_CACHE", {})
    return models.load_model(progress=False)


def _fake_gguf(monkeypatch: pytest.MonkeyPatch, first: SimpleNamespace) -> list[int]:
    """Replace the GGUF de-quantisation (20-40 s) by a copy of the first load's result; count the calls."""
    calls: list[int] = []

    def loader(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        calls.append(1)
        return copy.deepcopy(first.from_gguf)

    monkeypatch.setattr(models, "_hf_from_gguf", loader)
    return calls


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One real load from the GGUF file into an empty cache (the uncached path), kept for the tests."""
    cache = tmp_path_factory.mktemp("weights")
    stash: list[tuple[Any, Any]] = []
    real = models._hf_from_gguf

    def keep(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        loaded = real(*args, **kwargs)
        stash.append(copy.deepcopy(loaded))  # before the bridge switches its attention to eager
        return loaded

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.filterwarnings("error", message="load_model")
        mp.setattr(models, "_hf_from_gguf", keep)
        model = _load(mp, cache)
    assert len(stash) == 1
    return SimpleNamespace(cache=cache, model=model, logits=_logits(model), from_gguf=stash[0])


def test_second_load_skips_the_gguf_file_and_is_bit_identical(first, monkeypatch):
    entry = _entry(first.cache)
    manifest = json.loads((entry / "manifest.json").read_text())
    assert sorted(os.listdir(entry)) == sorted([*manifest["files"], "manifest.json"])
    assert "model.safetensors" in manifest["files"] and "config.json" in manifest["files"]
    assert [p.name for p in first.cache.iterdir()] == [entry.name]  # no temporary folder left

    def no_gguf(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cached model should have been loaded, not the GGUF file")

    monkeypatch.setattr(models, "_hf_from_gguf", no_gguf)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="load_model")
        second = _load(monkeypatch, first.cache)
    assert second is not first.model
    assert torch.equal(_logits(second), first.logits)  # bit for bit
    assert second.tokenizer.decode([int(first.logits[0, -1].argmax())]) == " Paris"
    for (name, a), b in zip(first.model.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert second.cfg.to_dict() == first.model.cfg.to_dict()
    assert models.model_info(second) == models.model_info(first.model)
    for text in PROMPTS:
        assert torch.equal(second.to_tokens(text), first.model.to_tokens(text))
        assert second.tokenizer.encode(text) == first.model.tokenizer.encode(text)
    ours, theirs = second.tokenizer, first.model.tokenizer
    assert type(ours) is type(theirs) and ours.init_kwargs == theirs.init_kwargs
    assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()
    assert {k: repr(v) for k, v in vars(ours).items() if k != "_tokenizer"} == {
        k: repr(v) for k, v in vars(theirs).items() if k != "_tokenizer"
    }


def test_an_error_after_an_intact_cache_is_raised_not_taken_for_damage(first, monkeypatch):
    calls = _fake_gguf(monkeypatch, first)

    def failing_boot(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("no such device")

    monkeypatch.setattr(models, "_boot", failing_boot)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="load_model")
        with pytest.raises(RuntimeError, match="no such device"):
            _load(monkeypatch, first.cache)
    assert calls == []  # not rebuilt from the GGUF file


def test_damaged_entries_are_refused_without_following_links(first, tmp_path):
    key = cache_entry.smollm2_key(models.smollm2_gguf_path(), torch.float32)
    good = _entry(first.cache)
    files, tied = cache_entry.entry_files(good, key)
    assert "model.safetensors" in files and tied == {"lm_head.weight": "model.embed_tokens.weight"}
    outside = tmp_path / "outside.json"
    outside.write_text((good / "tokenizer.json").read_text())
    entry = tmp_path / "entry"

    def damaged(change: Any) -> str:
        if entry.exists() or entry.is_symlink():
            shutil.rmtree(entry) if not entry.is_symlink() else entry.unlink()
        entry.mkdir()
        for name in os.listdir(good):
            if name == "model.safetensors":  # a hard link: present, not copied, never changed here
                os.link(good / name, entry / name)
            else:
                shutil.copy(good / name, entry / name)
        change()
        with pytest.raises(cache_entry.Unusable) as err:
            for name, sha256 in cache_entry.entry_files(entry, key)[0].items():
                if name != "model.safetensors":
                    cache_entry.check_file(entry / name, sha256)
        return str(err.value)

    def link_tokenizer() -> None:
        (entry / "tokenizer.json").unlink()
        (entry / "tokenizer.json").symlink_to(outside)

    assert "manifest cannot be read" in damaged(lambda: (entry / "manifest.json").unlink())  # a partial entry
    assert "links are not followed" in damaged(link_tokenizer)
    assert "does not match its hash" in damaged(lambda: (entry / "config.json").write_text("{}"))
    assert "other files" in damaged(lambda: (entry / "extra.json").write_text("{}"))

    def other_key() -> None:
        manifest = json.loads((entry / "manifest.json").read_text())
        manifest["key"]["dtype"] = "bfloat16"
        (entry / "manifest.json").write_text(json.dumps(manifest))

    assert "another GGUF file" in damaged(other_key)
    shutil.rmtree(entry)
    entry.symlink_to(good, target_is_directory=True)
    with pytest.raises(cache_entry.Unusable, match="symbolic link"):
        cache_entry.entry_files(entry, key)
    assert cache_entry.entry_path(key) != cache_entry.entry_path({**key, "dtype": "bfloat16"})


def test_corrupted_weights_are_detected_warned_and_rebuilt(first, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(first.cache, cache)
    weights = _entry(cache) / "model.safetensors"
    with open(weights, "r+b") as fh:  # flip one byte inside the tensor data: same size, valid header
        fh.seek(weights.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))
    calls = _fake_gguf(monkeypatch, first)
    with pytest.warns(RuntimeWarning, match="model.safetensors does not match its hash") as said:
        rebuilt = _load(monkeypatch, cache)
    assert str(_entry(cache)) in str(said[0].message) and "GGUF file again" in str(said[0].message)
    assert calls == [1]
    assert torch.equal(_logits(rebuilt), first.logits)
    assert [p.name for p in cache.iterdir()] == [_entry(cache).name]  # the damaged entry is gone
    entry = _entry(cache)  # rewritten, intact (the second test loads such an entry)
    key = cache_entry.smollm2_key(models.smollm2_gguf_path(), torch.float32)
    for name, sha256 in cache_entry.entry_files(entry, key)[0].items():
        cache_entry.check_file(entry / name, sha256)


def test_a_cache_that_cannot_be_written_still_loads(first, monkeypatch, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    calls = _fake_gguf(monkeypatch, first)
    with pytest.warns(RuntimeWarning, match="could not be cached"):
        model = _load(monkeypatch, blocked / "sub")
    assert calls == [1]
    assert torch.equal(_logits(model), first.logits)
    if os.geteuid() != 0:  # root writes to read-only folders
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o555)
        with pytest.warns(RuntimeWarning, match="could not be cached"):
            _load(monkeypatch, read_only)
        assert not list(read_only.iterdir())


def test_the_cached_induction_model_is_loaded_not_trained(tmp_path, monkeypatch):
    """The induction model lives in minterp_tl.induction: patching its ``_train`` proves the cache is read."""
    tiny = dict(
        n_layers=1,
        steps=3,
        batch_size=4,
        d_model=16,
        n_heads=2,
        d_vocab=8,
        train_lengths=(3, 4),
        progress=False,
        cache_dir=tmp_path,
    )
    trained = models.train_induction_model(**tiny)

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cached model should have been loaded, not trained")

    monkeypatch.setattr(induction, "_train", no_training)
    cached = models.train_induction_model(**tiny)
    for a, b in zip(trained.parameters(), cached.parameters()):
        assert torch.equal(a, b)
