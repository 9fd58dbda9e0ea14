"""Files someone sent you: loading saved edits runs no code named in them, and a tampered file is a clear
ValueError (never a KeyError / TypeError, never a silently different edit)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from minterp_tl.edits import Edits
from minterp_tl.store import StateStore


def double(x, hook):
    return 2 * x


def _saved(tmp_path, model):
    edits = Edits(model)
    edits.add_function("fn", "resid_pre", double, layers=1)
    edits.steer("v", "resid_post", torch.ones(model.cfg.d_model), layers=0)
    edits.write(tmp_path / "received")
    edits.clear()
    return tmp_path / "received"


def _rewrite(folder, change):
    store = StateStore(folder)
    meta = store.metadata
    manifest = json.loads(meta["minterp_tl.edits"])
    change(manifest)
    store.save(store.load(), {**meta, "minterp_tl.edits": json.dumps(manifest)})


def _no_edit_hooks(model) -> bool:
    return all(not hp.fwd_hooks for hp in model.hook_dict.values())


def test_a_payload_shipped_in_the_folder_never_runs(tmp_path, toys, monkeypatch):
    """The folder carries payload.py and names it; the user loads from the folder's parent (the working
    directory on sys.path, as in a notebook). Nothing is imported: the payload's top-level code does not
    run, the load is refused, and no hook is installed."""
    model = toys["ln"]
    folder = _saved(tmp_path, model)
    marker = tmp_path / "pwned"
    (folder / "payload.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\ndef run(x, hook):\n    return x\n"
    )
    (tmp_path / "payload_top.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\ndef run(x, hook):\n    return x\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("received.payload:run", "payload_top:run", "os:system", "subprocess:run"):
        _rewrite(folder, lambda m: m["edits"][0].__setitem__("function", name))
        with pytest.raises(ValueError, match="which was not given"):
            Edits.read(model, folder, functions=[double])
        with pytest.raises(ValueError, match="which was not given"):
            Edits.read(model, folder)
    assert not marker.exists()
    assert "payload_top" not in sys.modules and "received.payload" not in sys.modules
    assert _no_edit_hooks(model)
    # the function a caller gives is what runs, under the name the file uses for it
    _rewrite(folder, lambda m: m["edits"][0].__setitem__("function", "payload_top:run"))
    loaded = Edits.read(model, folder, functions={"payload_top:run": double})
    assert loaded.get("fn").fn is double and not marker.exists()
    loaded.clear()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["edits"][1].__setitem__("enabled", "false"), "field 'enabled' has the wrong type"),
        (lambda m: m.__setitem__("model", {}), "'model' must give the integers"),
        (lambda m: m["model"].__setitem__("d_model", "32"), "'model' must give the integers"),
        (lambda m: m.__setitem__("edits", {"a": 1}), "'edits' must be a list"),
        (lambda m: m["edits"][1].pop("alpha"), "must have exactly the fields"),
        (
            lambda m: m["edits"][1].__setitem__("alpha", float("nan")),
            "field 'alpha' has the wrong type or value",
        ),
        (lambda m: m["edits"][1].__setitem__("hooks", []), "'hooks' must be a non-empty list"),
        (lambda m: m["edits"][1].__setitem__("kind", "exec"), "unknown kind"),
        (
            lambda m: m["edits"][1].__setitem__("values", {"blocks.0.hook_resid_post": "elsewhere"}),
            "does not hold",
        ),
        (
            lambda m: m["edits"][1].__setitem__("hooks", ["blocks.9.hook_resid_post"]),
            "does not fit this model",
        ),
        (lambda m: m.__setitem__("version", 99), "unknown format or version"),
    ],
)
def test_a_tampered_edits_file_is_a_clear_error(tmp_path, toys, change, message):
    model = toys["ln"]
    folder = _saved(tmp_path, model)
    _rewrite(folder, change)
    with pytest.raises(ValueError, match=message):
        Edits.read(model, folder, functions=[double])
    assert _no_edit_hooks(model)


def test_malformed_json_is_a_clear_error(tmp_path, toys):
    model = toys["ln"]
    folder = _saved(tmp_path, model)
    store = StateStore(folder)
    for text in ("{not json", "[" * 100_000 + "]" * 100_000, "null"):
        store.save(store.load(), {**store.metadata, "minterp_tl.edits": text})
        with pytest.raises(ValueError, match="not valid JSON|unknown format"):
            Edits.read(model, folder, functions=[double])
    assert _no_edit_hooks(model)


def test_tampered_circuit_masks_are_a_clear_error(tmp_path, toys):
    from minterp_tl.circuits import CircuitConfig, CircuitModel

    model = toys["ln"]
    cfg = CircuitConfig(
        mask_hparams=dict(ablation="none", mask_unit="head", mask_bias=False, mask_init_value=1.0),
        target_layers=("attn.W_O",),
    )
    with CircuitModel(cfg, model) as circuit:
        circuit.write_masks(tmp_path / "m")
    store = StateStore(tmp_path / "m")
    meta, tensors = store.metadata, store.load()
    for config in (
        "{",
        "[" * 50_000,
        json.dumps({"target_layers": 5}),
        json.dumps({"target_layers": [[1, 2]]}),
        json.dumps({"target_layers": ["attn.W_O"], "mask_method": "exec"}),
        json.dumps({"target_layers": ["attn.W_O"], "mask_hparams": []}),
    ):
        store.save(tensors, {**meta, "config": config})
        with pytest.raises(ValueError):
            CircuitModel.read(tmp_path / "m", model)
        assert _no_edit_hooks(model) and all(p.grad is None for p in model.parameters())


def test_cli_circuit_seed_out_of_range_is_refused(capsys):
    from minterp_tl.cli import main

    assert main(["circuit", "--seed", str(10**30), "--no-progress"]) == 2
    assert "--seed must be in" in capsys.readouterr().err
