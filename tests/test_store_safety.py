"""The store stays inside its folder and loses nothing: symbolic links inside a store are refused, a
manifest can only name objects of the store, saving deletes only files the store made, and saving again
repairs a damaged store."""

from __future__ import annotations

import json
import os

import pytest
import torch

from minterp_tl.store import StateStore


def _t(seed: int, n: int = 64) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _manifest(root):
    return json.loads((root / "manifest.json").read_text())


def _write_manifest(root, manifest):
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("link", ["objects", ".lock", "manifest.json"])
def test_links_inside_a_store_are_refused_and_never_followed(tmp_path, link):
    other = StateStore(tmp_path / "other")
    other.save({"keep": _t(1)})
    other_objects = sorted(p.name for p in (tmp_path / "other" / "objects").iterdir())
    root = tmp_path / "s"
    StateStore(root).save({"a": _t(0)})
    target = tmp_path / "other" / link if link != ".lock" else tmp_path / "outside-lock"
    path = root / link
    if path.is_dir():
        for p in path.iterdir():
            p.unlink()
        path.rmdir()
    elif path.exists():
        path.unlink()
    os.symlink(target, path)
    for action in (lambda: StateStore(root).save({"b": _t(2)}), lambda: StateStore(root).load()):
        with pytest.raises(ValueError, match="symbolic link"):
            action()
    assert (
        sorted(p.name for p in (tmp_path / "other" / "objects").iterdir()) == other_objects
    )  # nothing collected
    assert not (tmp_path / "outside-lock").exists()  # nothing created outside
    assert torch.equal(other.load()["keep"], _t(1))


def test_a_linked_object_file_is_not_read(tmp_path):
    root = tmp_path / "s"
    StateStore(root).save({"a": _t(0)})
    (tmp_path / "secret").write_bytes(b"x" * 1000)
    obj = next((root / "objects").iterdir())
    obj.unlink()
    os.symlink(tmp_path / "secret", obj)
    with pytest.raises(ValueError, match="cannot be read") as err:
        StateStore(root).load()
    assert "1000" not in str(err.value)  # nothing about the file outside is revealed


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda e: e.__setitem__("hash", "../../../x"), "not 64 hex digits"),
        (lambda e: e.__setitem__("file", "objects/../../x.safetensors"), "names a file other than"),
        (lambda e: e.__setitem__("shape", "big"), "shape that is not a list"),
        (lambda e: e.__setitem__("shape", [-1]), "shape that is not a list"),
        (lambda e: e.__setitem__("dtype", "complex64"), "unknown dtype"),
        (lambda e: e.pop("file_bytes"), "file_bytes / nbytes"),
        (lambda e: e.__setitem__("xxh3", 5), "malformed xxh3"),
    ],
)
def test_a_malformed_manifest_is_a_clear_error(tmp_path, change, message):
    root = tmp_path / "s"
    StateStore(root).save({"a": _t(0)})
    manifest = _manifest(root)
    change(manifest["tensors"]["a"])
    _write_manifest(root, manifest)
    for action in (
        lambda: StateStore(root).load(),
        lambda: StateStore(root).lazy(),
        lambda: StateStore(root).save({"a": _t(0)}),
    ):
        with pytest.raises(ValueError, match=message):
            action()


def test_other_manifest_damage_is_a_clear_error(tmp_path):
    root = tmp_path / "s"
    StateStore(root).save({"a": _t(0)})
    good = _manifest(root)
    for text, message in (
        (json.dumps({**good, "tensors": []}), "'tensors' must be a mapping"),
        (json.dumps({**good, "metadata": {"a": 1}}), "'metadata' must map"),
        ("[" * 100_000, "unreadable"),
        ("{", "unreadable"),
    ):
        (root / "manifest.json").write_text(text)
        with pytest.raises(ValueError, match=message):
            StateStore(root).load()


def test_saving_deletes_only_what_the_store_made(tmp_path):
    """A folder with the user's own files: a save keeps every one of them, also ones that look like the
    store's (a '.tmp-' name, a 64-hex object name no manifest of this store named)."""
    root = tmp_path / "s"
    (root / "objects").mkdir(parents=True)
    mine = {
        root / ".tmp-notes.txt": b"notes",
        root / "objects" / ("ab" * 32 + ".safetensors"): b"user data",
        root / "objects" / ".tmp-draft": b"draft",
        root / "readme.md": b"hello",
    }
    for path, data in mine.items():
        path.write_bytes(data)
    store = StateStore(root)
    store.save({"a": _t(0), "b": _t(1)})
    store.save({"a": _t(2)})  # b's object is the store's own: collected
    for path, data in mine.items():
        assert path.read_bytes() == data
    named = {e["hash"] for e in _manifest(root)["tensors"].values()}
    objects = {p.name[:64] for p in (root / "objects").iterdir() if p.name.endswith(".safetensors")}
    assert objects == named | {"ab" * 32}


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_saving_again_repairs_a_damaged_object(tmp_path, damage):
    root = tmp_path / "s"
    tensors = {"a": _t(0), "b": _t(1)}
    StateStore(root).save(tensors)
    obj = root / "objects" / f"{_manifest(root)['tensors']['a']['hash']}.safetensors"
    if damage == "delete":
        obj.unlink()
    elif damage == "truncate":
        obj.write_bytes(obj.read_bytes()[:-10])
    else:
        data = bytearray(obj.read_bytes())
        data[-3] ^= 0xFF
        obj.write_bytes(bytes(data))  # same size, newer than the manifest
    with pytest.raises(ValueError):
        StateStore(root).load()
    report = StateStore(root).save(tensors)
    assert report.written == ["a"] and report.unchanged == ["b"]
    loaded = StateStore(root).load()
    assert torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["b"], tensors["b"])
