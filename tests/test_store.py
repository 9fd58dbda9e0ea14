"""StateStore: round trips of every dtype, lazy comparison by hash, incremental saves, integrity checks,
killed writers, concurrent writers; StateManager.save / load through the store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from minterp_tl.state import StateManager
from minterp_tl.store import LazyTensor, StateStore, tensor_hash

ROOT = Path(__file__).resolve().parents[1]


def _dtypes_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 7, generator=g)
    return {
        "f32": x,
        "bf16": x.to(torch.bfloat16),
        "f16": x.to(torch.float16),
        "i64": torch.randint(-(2**40), 2**40, (4, 6), generator=g),
        "bool": torch.rand(5, 3, generator=g) > 0.5,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _object_path(store: StateStore, name: str) -> Path:
    return store.root / "objects" / f"{store.lazy()[name].hash}.safetensors"


# ---- hashing ----------------------------------------------------------------------------------------


def test_tensor_hash_is_over_dtype_shape_and_bytes():
    x = torch.arange(12, dtype=torch.float32)
    assert tensor_hash(x) == tensor_hash(x.clone())
    assert tensor_hash(x.view(3, 4)) != tensor_hash(x)  # shape counts
    assert tensor_hash(x.to(torch.int32)) != tensor_hash(x.view(torch.int32))  # dtype and bytes count
    assert tensor_hash(x.view(torch.int32)) != tensor_hash(x)  # same bytes, other dtype
    y = x.clone()
    y[5] = torch.nextafter(y[5], torch.tensor(100.0))  # one ulp
    assert tensor_hash(y) != tensor_hash(x)
    assert tensor_hash(torch.tensor([0.0])) != tensor_hash(torch.tensor([-0.0]))  # bytes, not values
    t = torch.randn(4, 6)
    assert tensor_hash(t.t()) == tensor_hash(t.t().contiguous())  # strides do not
    b = torch.tensor([True, False, True])
    assert tensor_hash(b) != tensor_hash(torch.tensor([True, True, True]))
    with pytest.raises(ValueError, match="complex64"):
        tensor_hash(torch.zeros(2, dtype=torch.complex64))


# ---- round trips and lazy tensors -----------------------------------------------------------------


def test_round_trip_every_dtype_and_metadata(tmp_path):
    tensors = _dtypes_dict()
    store = StateStore(tmp_path / "s")
    assert not store.exists()
    report = store.save(tensors, metadata={"model": "toy", "note": "x"})
    assert report.written == list(tensors) and report.unchanged == [] and report.removed == []
    loaded = StateStore(tmp_path / "s").load()
    assert _same(loaded, tensors)
    assert store.metadata == {"model": "toy", "note": "x"}
    assert store.load(["bf16", "bool"]).keys() == {"bf16", "bool"}
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["tensors"]["bf16"]["dtype"] == "bfloat16"
    assert manifest["tensors"]["i64"]["hash"] == tensor_hash(tensors["i64"])


def test_lazy_equality_reads_no_file(tmp_path):
    tensors = _dtypes_dict()
    store = StateStore(tmp_path)
    store.save(tensors)
    fresh = StateStore(tmp_path)
    lazy = fresh.lazy()
    assert all(isinstance(v, LazyTensor) for v in lazy.values())
    for name, t in tensors.items():
        assert lazy[name] == t.clone()
        assert lazy[name].shape == t.shape and lazy[name].dtype == t.dtype
        other = t.clone()
        if other.numel():
            flat = other.view(-1)
            flat[0] = ~flat[0] if other.dtype == torch.bool else flat[0] + 1
            assert lazy[name] != other
        assert lazy[name] != t.reshape(-1, *([1] * t.ndim))  # other shape
    assert lazy["f32"] != tensors["f32"].double()  # other dtype, same values
    assert lazy["f32"] == lazy["f32"] and lazy["f32"] != lazy["f16"]
    assert fresh.files_read == 0  # nothing but the manifest was read
    assert _same({"bf16": lazy["bf16"].load()}, {"bf16": tensors["bf16"]})
    assert fresh.files_read == 1


def test_lazy_allclose(tmp_path):
    x = torch.randn(10, 10)
    store = StateStore(tmp_path)
    store.save({"x": x})
    lazy = store.lazy()["x"]
    noisy = x + 1e-7 * torch.randn(10, 10)
    assert lazy != noisy
    assert lazy.allclose(noisy, rtol=1e-5, atol=1e-5)
    assert not lazy.allclose(x + 1e-2, rtol=1e-5, atol=1e-5)
    assert not lazy.allclose(x[:5])
    before = store.files_read
    assert lazy.allclose(x.clone())  # equal hash: no read
    assert store.files_read == before


def test_save_again_rewrites_only_what_changed(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(64, 64, generator=g) for i in range(10)}
    store = StateStore(tmp_path)
    first = store.save(tensors)
    assert first.bytes_written > 10 * 64 * 64 * 4
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "objects").iterdir()}

    changed = dict(tensors)
    changed["t3"] = changed["t3"] + 1
    del changed["t7"]
    changed["new"] = torch.ones(3)
    report = store.save(changed)
    assert report.written == ["t3", "new"]
    assert report.unchanged == [f"t{i}" for i in range(10) if i not in (3, 7)]
    assert report.removed == ["t7"]
    manifest_bytes = (tmp_path / "manifest.json").stat().st_size
    new_objects = sum(p.stat().st_size for p in (tmp_path / "objects").iterdir() if p.name not in mtimes)
    assert report.bytes_written == new_objects + manifest_bytes
    assert new_objects < 64 * 64 * 4 + 1000
    for p in (tmp_path / "objects").iterdir():  # unchanged files were not touched
        if p.name in mtimes:
            assert p.stat().st_mtime_ns == mtimes[p.name]
    # the old t3 and t7 files are collected; exactly the referenced files remain
    referenced = {f"{e.hash}.safetensors" for e in store.lazy().values()}
    assert {p.name for p in (tmp_path / "objects").iterdir()} == referenced
    assert _same(store.load(), changed)
    # same content under a new name costs no object bytes
    dup = store.save({**changed, "copy_of_t0": tensors["t0"].clone()})
    assert dup.written == ["copy_of_t0"]
    assert dup.bytes_written == (tmp_path / "manifest.json").stat().st_size  # the manifest only
    assert torch.equal(store.load(["copy_of_t0"])["copy_of_t0"], tensors["t0"])


def test_save_with_lazy_tensors_hashes_and_reads_only_the_new_ones(tmp_path):
    tensors = _make(3, 6, 5000)
    store = StateStore(tmp_path / "a")
    store.save(tensors)
    d = store.lazy()
    d["t2"] = tensors["t2"] * 2
    report = store.save(d)
    assert report.written == ["t2"] and len(report.unchanged) == 5 and store.files_read == 0
    assert _same(store.load(), {**tensors, "t2": tensors["t2"] * 2})
    # a lazy tensor of another store is copied over, verified
    other = StateStore(tmp_path / "b")
    other.save({"x": store.lazy()["t0"], "y": torch.arange(3)})
    assert _same(other.load(), {"x": tensors["t0"], "y": torch.arange(3)})
    # a lazy tensor whose content the store no longer holds is refused
    stale = store.lazy()["t5"]
    store.save({"only": torch.ones(2)})
    with pytest.raises(ValueError, match="no longer"):
        store.save({"only": torch.ones(2), "t5": stale})
    assert _same(store.load(), {"only": torch.ones(2)})


def test_save_again_with_fresh_tensors_blake2b_hashes_only_the_changed_ones(tmp_path, monkeypatch):
    """Unchanged tensors are recognised by their fast fingerprint and keep their stored blake2b hash;
    only new content is blake2b-hashed, and a one-element change is still seen."""
    import minterp_tl.store as store_module

    tensors = _make(4, 6, 5000)
    store = StateStore(tmp_path / "s")
    store.save(tensors)
    hashed = []
    real = store_module.tensor_hash
    monkeypatch.setattr(store_module, "tensor_hash", lambda t: hashed.append(t) or real(t))
    fresh = {k: v.clone() for k, v in tensors.items()}
    fresh["t1"][0] += 1.0
    report = store.save(fresh)
    assert report.written == ["t1"] and len(report.unchanged) == 5
    assert len(hashed) == 1 and torch.equal(hashed[0], fresh["t1"])
    monkeypatch.setattr(store_module, "tensor_hash", real)
    assert _same(store.load(), fresh)  # load verifies every blake2b hash
    assert all(lazy.hash == tensor_hash(fresh[k]) for k, lazy in store.lazy().items())
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert all(len(e["xxh3"]) == 32 for e in manifest["tensors"].values())
    # a lazy round trip keeps the fingerprints, so the next fresh save still skips the hashing
    store.save(store.lazy())
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["tensors"] == manifest["tensors"]


def test_bad_input_is_refused(tmp_path):
    store = StateStore(tmp_path)
    with pytest.raises(ValueError, match="No state store"):
        store.load()
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        store.save({"a": [1, 2]})
    with pytest.raises(ValueError, match="non-empty strings"):
        store.save({"": torch.ones(1)})
    with pytest.raises(ValueError, match="metadata"):
        store.save({"a": torch.ones(1)}, metadata={"a": 1})
    with pytest.raises(ValueError, match="complex64"):
        store.save({"c": torch.zeros(1, dtype=torch.complex64)})
    store.save({"alpha": torch.ones(1)})
    with pytest.raises(ValueError, match="No tensor 'alpah' \\(did you mean 'alpha'\\?\\)"):
        store.load(["alpah"])
    with pytest.raises(ValueError, match="path"):
        StateStore(3)  # type: ignore[arg-type]


# ---- integrity ----------------------------------------------------------------------------------------


def test_flipped_byte_is_detected_and_nothing_is_returned(tmp_path):
    tensors = _dtypes_dict()
    store = StateStore(tmp_path)
    store.save(tensors)
    path = _object_path(store, "bf16")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # a bit in the tensor data, the header intact
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"tensor 'bf16'.*integrity check"):
        store.load()
    with pytest.raises(ValueError, match="tensor 'bf16'"):
        store.lazy()["bf16"].load()
    assert torch.equal(store.load(["f32"])["f32"], tensors["f32"])  # the others still load
    # a lazy compare trusts the manifest: it still says equal to the original (no read)
    assert store.lazy()["bf16"] == tensors["bf16"]


def test_truncated_and_missing_files_are_detected(tmp_path):
    store = StateStore(tmp_path)
    store.save(_dtypes_dict())
    path = _object_path(store, "i64")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"tensor 'i64'.*truncated"):
        store.load()
    path.unlink()
    with pytest.raises(ValueError, match=r"tensor 'i64'.*missing"):
        store.load(["i64"])
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        store.load()


# ---- killed writers and concurrency -----------------------------------------------------------------

_CHILD_PRELUDE = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, {root!r})
    import minterp_tl.store as store_mod
    from minterp_tl.store import StateStore
    def make(seed, n, size):
        g = torch.Generator().manual_seed(seed)
        return {{f"t{{i}}": torch.randn(size, generator=g) for i in range(n)}}
    """
)


def _run_child(body: str, **kwargs) -> subprocess.Popen:
    code = _CHILD_PRELUDE.format(root=str(ROOT)) + textwrap.dedent(body)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, **kwargs)


def _make(seed: int, n: int, size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(size, generator=g) for i in range(n)}


def test_writer_dying_before_the_commit_leaves_previous_version(tmp_path):
    root = tmp_path / "s"
    StateStore(root).save(_make(0, 6, 1000), metadata={"v": "1"})
    # the child writes every new object file, then dies at the manifest rename (the commit point)
    child = _run_child(
        f"""
        real_replace = os.replace
        def dying_replace(src, dst):
            if str(dst).endswith("manifest.json"):
                os._exit(17)
            real_replace(src, dst)
        store_mod.os.replace = dying_replace
        StateStore({str(root)!r}).save(make(1, 6, 1000), metadata={{"v": "2"}})
        """
    )
    assert child.wait(timeout=120) == 17
    store = StateStore(root)
    assert store.metadata == {"v": "1"}
    assert _same(store.load(), _make(0, 6, 1000))
    leftovers = [p.name for p in root.rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers  # the dead writer's temporary manifest
    # the next save commits and collects the dead writer's files
    store.save(_make(2, 3, 10))
    assert _same(store.load(), _make(2, 3, 10))
    assert not [p for p in root.rglob("*") if p.name.startswith(".tmp-")]
    assert len(list((root / "objects").iterdir())) == 3


def test_sigkilled_writer_mid_write_leaves_previous_version(tmp_path):
    root = tmp_path / "s"
    old = _make(0, 4, 100)
    StateStore(root).save(old)
    # a large save (24 x 4 MB); killed as soon as its first object file has been renamed into place
    child = _run_child(
        f"""
        print("ready", flush=True)
        StateStore({str(root)!r}).save(make(5, 24, 1_000_000))
        print("done", flush=True)
        """,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "ready"
    before = set((root / "objects").iterdir())
    deadline = time.monotonic() + 60
    while set((root / "objects").iterdir()) == before and time.monotonic() < deadline:
        time.sleep(0.001)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert len(set((root / "objects").iterdir()) - before) < 24  # it really was mid-write
    assert _same(StateStore(root).load(), old)


def test_two_processes_writing_concurrently_leave_a_consistent_store(tmp_path):
    root = tmp_path / "s"
    body = """
        store = StateStore({root!r})
        mine = make({seed}, {n}, 20_000)
        versions = [make(11, 5, 20_000), make(22, 8, 20_000)]
        def same(a, b):
            return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
        import time
        open({root!r} + ".ready-{seed}", "w").close()  # start together: wait for the other writer
        while len([p for p in os.listdir(os.path.dirname({root!r})) if ".ready-" in p]) < 2:
            time.sleep(0.005)
        t0 = time.time()
        for i in range(25):
            store.save(mine, metadata={{"writer": "{seed}"}})
            got = store.load()  # whatever is committed is one writer's whole dict
            assert any(same(got, v) for v in versions), list(got)
        print("ok", t0, time.time(), flush=True)
        """
    children = [
        _run_child(body.format(root=str(root), seed=seed, n=n), stdout=subprocess.PIPE, text=True)
        for seed, n in ((11, 5), (22, 8))
    ]
    spans = []
    for child in children:
        out, _ = child.communicate(timeout=300)
        word, t0, t1 = out.split()
        assert child.returncode == 0 and word == "ok"
        spans.append((float(t0), float(t1)))
    (a0, a1), (b0, b1) = spans
    overlap = min(a1, b1) - max(a0, b0)
    assert overlap > 0.5 * min(a1 - a0, b1 - b0), spans  # they really wrote at the same time
    store = StateStore(root)
    final = store.load()
    writer = store.metadata["writer"]
    assert writer in ("11", "22")
    expected = _make(11, 5, 20_000) if writer == "11" else _make(22, 8, 20_000)
    assert _same(final, expected)
    referenced = {f"{e.hash}.safetensors" for e in store.lazy().values()}
    assert {p.name for p in (root / "objects").iterdir()} == referenced


# ---- StateManager through the store ----------------------------------------------------------------


def test_state_manager_write_read_round_trip(tmp_path, toys):
    from minterp_tl.context import RepresentationContext
    from minterp_tl.state import SaveRule, StateConfig
    from minterp_tl.wrapper import ModelWrapper

    model = toys["ln"]
    sm = StateManager(
        {
            "clean": StateConfig(
                save=[
                    SaveRule("resid_pre", layers=[0, 2], positions="last", tag="clean"),
                    SaveRule("z", layers=1, heads=[1, 3], tag="clean"),
                ]
            )
        }
    )
    ctx = RepresentationContext(prompts=torch.randint(0, model.cfg.d_vocab, (2, 6)))
    ModelWrapper(model).run(ctx, sm, phase="clean")
    sm.put("steer", torch.randn(model.cfg.d_model).to(torch.bfloat16))
    sm.put("mask", torch.rand(4, 4) > 0.5, tag="masks")
    report = sm.write(tmp_path / "sm")
    assert len(report.written) == 5 + 2  # two saves with positions add a "#positions" tensor each
    loaded = StateManager.read(tmp_path / "sm")
    assert loaded.keys() == sm.keys()
    for a, b in zip(sm, loaded):
        assert a.tensor.dtype == b.tensor.dtype and torch.equal(a.tensor, b.tensor)
        assert (a.positions is None) == (b.positions is None)
        if a.positions is not None:
            assert torch.equal(a.positions, b.positions)
        assert (a.heads, a.pos_axis, a.head_axis, a.str_tokens) == (
            b.heads,
            b.pos_axis,
            b.head_axis,
            b.str_tokens,
        )
    # saving again after one change rewrites only that state
    sm.put("steer", torch.zeros(model.cfg.d_model))
    again = sm.write(tmp_path / "sm")
    assert again.written == ["steer"] and len(again.unchanged) == 6
    with pytest.raises(ValueError, match="not written by StateManager.write"):
        StateStore(tmp_path / "other").save({"a": torch.ones(1)})
        StateManager.read(tmp_path / "other")
