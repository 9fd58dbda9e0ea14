"""Edits on disk and on screen: the folder format of :meth:`minterp_tl.edits.Edits.write` / ``read``, and
the table of :meth:`~minterp_tl.edits.Edits.table`.

A folder is a :class:`minterp_tl.store.StateStore`: safetensors files (each verified against its hash
when read) and a JSON manifest in the store's metadata. Reading runs no code named in the folder: it
imports nothing; a function edit names its function (``"module:qualname"``) and is installed only if
the caller passes that function in. Every field of the manifest is type-checked, the model's shape and
every hook are checked, all before any edit is installed.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Optional, Union

from torch import Tensor

from minterp_tl.interventions import MODES, Intervention, InterventionFunction
from minterp_tl.names import resolve_name
from minterp_tl.specs import SpecLike, Token, check_spec
from minterp_tl.store import SaveReport, StateStore


class Row(NamedTuple):
    """One edit as the folder format and the table see it (an :class:`~minterp_tl.edits.Edit` and its
    on/off state).

    Attributes:
        name: The edit's name.
        intervention: Its record (specs in JSON-able form; read from a folder: its hooks as a list).
        hooks: The canonical hooks it applies at.
        values: ``{hook: tensor}`` for kinds with a value.
        function: ``"module:qualname"`` of a function edit's function, or ``None``.
        enabled: Whether it is on.
    """

    name: str
    intervention: Intervention
    hooks: tuple[str, ...]
    values: dict[str, Tensor]
    function: Optional[str]
    enabled: bool


_FORMAT = "minterp_tl.edits"
_VERSION = 1
_FUNCTION_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")  # module:name, no attribute walk
_MODEL_KEYS = ("n_layers", "n_heads", "d_model", "d_vocab")
_EDIT_FIELDS: dict[str, Any] = {
    "name": str,
    "kind": str,
    "hooks": list,
    "positions": object,
    "heads": object,
    "neurons": object,
    "alpha": (int, float),
    "function": (str, type(None)),
    "kwargs": dict,
    "values": dict,
    "enabled": bool,
}


def function_path(fn: Callable) -> Optional[str]:
    """``"module:name"`` of ``fn`` if it is a plain function at the top level of an imported module, else
    ``None`` (lambdas, nested functions, methods, builtins). Nothing is imported: the module must already
    be loaded, as the module of a function you hold is."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not inspect.isfunction(fn) or not module or not qualname:
        return None
    if not _FUNCTION_PATH.fullmatch(f"{module}:{qualname}"):
        return None
    return f"{module}:{qualname}" if getattr(sys.modules.get(module), qualname, None) is fn else None


def json_spec(spec: Union[SpecLike, Tensor], what: str) -> Union[None, int, str, list]:
    """A spec in the JSON-able form edits keep: slices become ``"start:stop:step"`` strings, ranges and
    tuples lists; token specs and tensors are refused (an edit applies to every forward pass)."""
    if spec is None:
        return None
    if isinstance(spec, Tensor):
        raise ValueError(
            f"{what} positions of an edit must be a spec (an index, a slice string, a list), "
            "not a tensor: an edit applies to every forward pass, whatever its batch."
        )
    check_spec(spec, what)
    if isinstance(spec, Token):
        raise ValueError(
            f"{what} spec {spec!r}: edits apply to every forward pass and see no prompt text, so a token "
            "position cannot be resolved; give an index (-1), a slice string (':3') or a list."
        )
    if isinstance(spec, bool):
        raise ValueError(f"{what} spec must be an int, a spec string or a list, got {spec!r}.")
    if isinstance(spec, (int, str)):
        return spec
    if isinstance(spec, slice):
        return ":".join("" if v is None else str(int(v)) for v in (spec.start, spec.stop, spec.step))
    if isinstance(spec, range):
        return list(spec)
    return [json_spec(s, what) for s in spec]


def describe(edit: Row) -> str:
    """An edit's selection and value in a few words, for :meth:`~minterp_tl.edits.Edits.table`."""
    iv = edit.intervention
    kind, alpha = iv.mode, float(iv.alpha)
    parts = [
        f"{label}={_spec_text(spec)}"
        for label, spec in (("heads", iv.heads), ("neurons", iv.neurons), ("pos", iv.positions))
        if spec is not None
    ]
    first = next(iter(edit.values.values()), None)
    if kind in ("mean", "set", "patch") and first is not None:
        parts.append(f"{kind if kind != 'set' else 'value'} {tuple(first.shape)}")
    elif kind == "add" and first is not None:
        parts.append(f"{alpha:g} x vector {tuple(first.shape)} |v|={float(first.float().norm()):.3g}")
    elif kind == "scale":
        parts.append(f"x {alpha:g}")
    elif kind == "function":
        path = edit.function or f"{getattr(iv.fn, '__qualname__', iv.fn)!s} (not importable)"
        parts.append(path + (f" {json.dumps(dict(iv.kwargs))}" if iv.kwargs else ""))
    return ", ".join(parts)


def _spec_text(spec: Any) -> str:
    return ",".join(str(s) for s in spec) if isinstance(spec, list) else str(spec)


def table(ordered: Sequence[tuple[str, Row]], edits: Sequence[Row], paused: bool) -> str:
    """One line per ``(hook, edit)`` of ``ordered`` (application order): step, hook, edit name, kind,
    on/off, and what it selects and writes; a head line counts ``edits`` (each edit once)."""
    if not edits:
        return "no edits"
    rows = [("#", "hook", "edit", "kind", "on", "what")]
    for i, (hook, e) in enumerate(ordered):
        rows.append((str(i), hook, e.name, e.intervention.mode, "on" if e.enabled else "off", describe(e)))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    lines = ["  ".join(r[c].ljust(widths[c]) for c in range(5)) + "  " + r[5] for r in rows]
    on = sum(e.enabled for e in edits)
    head = f"{len(edits)} edit(s), {on} on{' (paused)' if paused else ''}"
    return "\n".join([head] + [line.rstrip() for line in lines])


def write_edits(model: Any, edits: Sequence[Row], path: Any) -> SaveReport:
    """Write ``edits`` (with their on/off states), made for ``model``, to the folder ``path``; writing
    again rewrites only changed tensors.

    Raises:
        ValueError: If a function edit has no import path (a lambda, a local function).
    """
    tensors: dict[str, Tensor] = {}
    entries = []
    for e in edits:
        iv = e.intervention
        if iv.mode == "function" and e.function is None:
            raise ValueError(
                f"Edit {e.name!r} cannot be written: its function {getattr(iv.fn, '__qualname__', iv.fn)!s} "
                "has no import path (a lambda or a function defined inside a function); define it at "
                "the top level of a module."
            )
        value_keys = {}
        for hook, v in e.values.items():
            tensors[f"{e.name}/{hook}"] = v
            value_keys[hook] = f"{e.name}/{hook}"
        entries.append(
            {
                "name": e.name,
                "kind": iv.mode,
                "hooks": list(e.hooks),
                "positions": iv.positions,
                "heads": iv.heads,
                "neurons": iv.neurons,
                "alpha": float(iv.alpha),
                "function": e.function,
                "kwargs": dict(iv.kwargs),
                "values": value_keys,
                "enabled": e.enabled,
            }
        )
    cfg = model.cfg
    manifest = {
        "format": _FORMAT,
        "version": _VERSION,
        "model": {k: int(getattr(cfg, k)) for k in _MODEL_KEYS},
        "edits": entries,
    }
    return StateStore(path).save(
        tensors, {"minterp_tl.kind": "Edits", "minterp_tl.edits": json.dumps(manifest)}
    )


def read_edits(
    model: Any,
    path: Any,
    functions: Union[Mapping[str, InterventionFunction], Sequence[InterventionFunction]],
) -> list[Row]:
    """The edits written at ``path``, checked against ``model`` (not resolved on it, not installed).

    Raises:
        ValueError: If the folder holds no written edits or a malformed file, the model's shape differs,
            a hook does not exist on the model, a tensor fails its integrity check, or a function edit
            names a function not in ``functions``.
    """
    given = _given_functions(functions)
    store = StateStore(path)
    meta = store.metadata
    if meta.get("minterp_tl.kind") != "Edits":
        raise ValueError(f"The store at {str(path)!r} holds no written edits (written by Edits.write).")
    where = f"Saved edits at {str(path)!r}"
    manifest = _read_manifest(meta.get("minterp_tl.edits"), where)
    mine = {k: int(getattr(model.cfg, k)) for k in _MODEL_KEYS}
    if mine != manifest["model"]:
        raise ValueError(f"{where} were made for a model with {manifest['model']}; this model has {mine}.")
    for e in manifest["edits"]:  # every name is checked before any tensor is read
        if e["kind"] == "function" and e["function"] not in given:
            raise ValueError(
                f"{where}: edit {e['name']!r} calls function {e['function']!r}, which was not given; reading "
                f"imports nothing, so pass it: Edits.read(model, path, functions=[...]) (given: "
                f"{sorted(given) or 'none'})."
            )
    tensors = store.load()
    built: list[Row] = []
    for e in manifest["edits"]:
        hooks = tuple(e["hooks"])
        for hook in hooks:
            try:
                if resolve_name(model, hook) != hook:
                    raise ValueError(f"{hook!r} is an alias, not the canonical name")
            except ValueError as err:
                raise ValueError(
                    f"Saved edit {e['name']!r}: hook {hook!r} does not fit this model: {err}"
                ) from None
        missing = [k for k in e["values"].values() if k not in tensors]
        if missing or set(e["values"]) - set(hooks):
            raise ValueError(
                f"{where}: edit {e['name']!r} refers to values {missing} that the store does not "
                f"hold, or to hooks it does not edit."
            )
        values = {h: tensors[k] for h, k in e["values"].items()}
        try:
            record = Intervention(
                list(hooks),
                e["kind"],
                values or None,
                positions=e["positions"],
                heads=e["heads"],
                neurons=e["neurons"],
                alpha=float(e["alpha"]),
                fn=given.get(e["function"]) if e["kind"] == "function" else None,
                kwargs=e["kwargs"],
            )
        except ValueError as err:
            raise ValueError(f"Saved edit {e['name']!r}: {err}") from None
        built.append(Row(e["name"], record, hooks, values, e["function"], e["enabled"]))
    return built


def _given_functions(
    functions: Union[Mapping[str, InterventionFunction], Sequence[InterventionFunction]],
) -> dict[str, InterventionFunction]:
    """``{"module:qualname": function}`` from what :meth:`Edits.read` was given (nothing is imported)."""
    if isinstance(functions, Mapping):
        items = list(functions.items())
    else:
        items = []
        for fn in functions:
            module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
            if not callable(fn) or not module or not qualname:
                raise ValueError(f"Edits.read functions must be functions, got {fn!r}.")
            items.append((f"{module}:{qualname}", fn))
    for name, fn in items:
        if not isinstance(name, str) or not callable(fn):
            raise ValueError(
                f"Edits.read functions must map 'module:qualname' strings to functions, got {name!r}."
            )
    return dict(items)


def _read_manifest(text: Any, where: str) -> dict[str, Any]:
    """The JSON description of written edits, every field checked (a malformed file is a ValueError that
    says what is wrong, never a KeyError or TypeError)."""
    if not isinstance(text, str):
        raise ValueError(f"{where}: the store's metadata has no edits description.")
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ValueError(
            f"{where}: the edits description is not valid JSON ({type(err).__name__})."
        ) from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != _FORMAT
        or manifest.get("version") != _VERSION
    ):
        raise ValueError(f"{where} have an unknown format or version.")
    model = manifest.get("model")
    if (
        not isinstance(model, dict)
        or sorted(model) != sorted(_MODEL_KEYS)
        or not all(type(v) is int for v in model.values())
    ):
        raise ValueError(f"{where}: 'model' must give the integers {list(_MODEL_KEYS)}, got {model!r}.")
    entries = manifest.get("edits")
    if not isinstance(entries, list):
        raise ValueError(f"{where}: 'edits' must be a list.")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or sorted(e) != sorted(_EDIT_FIELDS):
            raise ValueError(f"{where}: edit #{i} must have exactly the fields {sorted(_EDIT_FIELDS)}.")
        for key, kind in _EDIT_FIELDS.items():
            value = e[key]
            if not isinstance(value, kind) or (
                key == "alpha" and (isinstance(value, bool) or not math.isfinite(value))
            ):
                raise ValueError(f"{where}: edit #{i} field {key!r} has the wrong type or value: {value!r}.")
        if e["kind"] not in MODES:
            raise ValueError(
                f"{where}: edit {e['name']!r} has an unknown kind {e['kind']!r}; kinds: {MODES}."
            )
        if (e["kind"] == "function") != isinstance(e["function"], str):
            raise ValueError(
                f"{where}: edit {e['name']!r}: 'function' must be a name exactly for function edits."
            )
        if not e["hooks"] or not all(isinstance(h, str) for h in e["hooks"]):
            raise ValueError(f"{where}: edit {e['name']!r}: 'hooks' must be a non-empty list of hook names.")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in e["values"].items()):
            raise ValueError(f"{where}: edit {e['name']!r}: 'values' must map hook names to tensor keys.")
    return manifest


__all__ = ["Row", "describe", "function_path", "json_spec", "read_edits", "table", "write_edits"]
