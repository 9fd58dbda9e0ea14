"""Named, persistent edits: interventions that stay on a model for every forward pass until removed.

Researchers keep a model "edited" across many experiments -- a head ablated, a steering vector added,
a state patched in -- and want to see which edits are active, switch them off and on, and save and
share them. An :class:`Edits` object holds such edits for one ``TransformerBridge``:

- :meth:`Edits.ablate` -- zero or mean ablation of heads, neurons (last-axis units) or positions;
- :meth:`Edits.steer` -- add ``alpha * vector`` at layers / positions (steering vectors);
- :meth:`Edits.set_state` -- set a state (or part of it) to a stored value (a patched-in state);
- :meth:`Edits.add_function` -- any function ``fn(activation, hook, **kwargs)`` on a canonical hook,
  referenced by import path (``"package.module:function"``).

Each edit has a unique name and is listed by :meth:`Edits.table`; :meth:`~Edits.disable`,
:meth:`~Edits.enable`, :meth:`~Edits.toggle`, :meth:`~Edits.remove` and :meth:`~Edits.clear` change
the set; ``with edits:`` restores, on exit, the edits (and their on/off states) held on entry, and
``with edits.paused():`` runs the unedited model. :meth:`Edits.save` writes the edits to a directory
(a :class:`minterp_tl.store.StateStore`: a JSON manifest and safetensors files, no pickle and no
code) and :meth:`Edits.load` puts them on a model again.

Names, layers and positions: ``state`` is any hook name :func:`minterp_tl.names.resolve_name`
accepts; a per-layer name (``"z"``, ``"resid_post"``, ``"attn.hook_z"``) is taken at each of
``layers`` (a :mod:`minterp_tl.specs` layer spec; ``None`` = every layer). ``positions`` and ``heads``
are specs resolved on each forward against the activation's number of positions / heads (``-1`` is
the last position of every run); token-text specs are not accepted (an edit sees no tokens).
``neurons`` index the activation's last axis (``mlp.hook_post`` units, residual dimensions) and may
not be combined with ``heads``. Axes come from :func:`minterp_tl.state.hook_layout`
(``[batch, pos, ...]``, ``[batch, pos, head, d_head]`` for q/k/v/z, ``[batch, head, query, key]`` for
patterns, where ``positions`` selects query positions).

Order. Edits run in the order of the forward pass: an edit at a hook that fires earlier runs first --
lower layers before higher ones, and inside a block each hook in the order the model reaches it
(``blocks.1.attn.hook_z`` before ``blocks.1.hook_attn_out`` before ``blocks.1.hook_resid_post``);
edits at the same hook run in insertion order, each seeing the previous one's output.
:meth:`Edits.table` and iteration list edits in exactly this order. Every edit at a hook point is
applied by one persistent hook (``HookPoint.add_hook(..., is_permanent=True)``, so
``model.reset_hooks()`` leaves it alone), registered when the first edit there is added: it runs
before hooks added later (``run_with_hooks``, ``run_with_cache``), which therefore see the edited
activation. ``model.reset_hooks(including_permanent=True)`` removes edits behind this object's back;
call :meth:`Edits.clear` instead.

Security of saved edits: loading a folder runs no code named in it. A saved function edit records the
function's ``"module:qualname"``; :meth:`Edits.load` imports nothing and calls only functions its caller
passes in ``functions=``: a folder naming any other function is refused before anything is installed.
Every field of the file is type-checked, and every tensor is checked against its hash.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import re
import sys
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from minterp_tl.names import NameSpec, expand_name, resolve_name
from minterp_tl.specs import SpecLike, Token, check_spec, resolve
from minterp_tl.state import hook_layout, scatter
from minterp_tl.store import SaveReport, StateStore

EditKind = Literal["zero", "mean", "add", "set", "function"]
"""``"zero"`` / ``"mean"``: ablation; ``"add"``: steering; ``"set"``: a stored value; ``"function"``:
a user function."""

EditFunction = Callable[..., Optional[Tensor]]
"""``fn(activation, hook, **kwargs) -> new activation`` (or ``None`` to keep it unchanged)."""

SpecJSON = Union[None, int, str, list]
"""A spec in the JSON-able form edits keep: ``None``, an int, a spec string or a list of these."""

KINDS: tuple[str, ...] = ("zero", "mean", "add", "set", "function")
_FORMAT = "minterp_tl.edits"
_VERSION = 1
_FUNCTION_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")  # module:name, no attribute walk
_NAME = re.compile(r"[^\x00-\x1f/]{1,200}")


# --------------------------------------------------------------------------------------------------
# One edit
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Edit:
    """One named edit (built by the :class:`Edits` methods; read it, don't build it by hand).

    Attributes:
        name: Unique name within its :class:`Edits`.
        kind: What it does (:data:`EditKind`).
        hooks: The canonical hook names it applies at.
        positions: Position spec (JSON-able form; ``None`` = every position).
        heads: Head spec (``None`` = every head / no head selection).
        neurons: Last-axis spec (``None`` = every unit).
        values: ``{hook name: tensor}``: the mean (``"mean"``, the hook's activation averaged over
            batch and positions, ``keepdim``), the vector (``"add"``) or the value (``"set"``) each hook
            uses; empty for ``"zero"`` and ``"function"``.
        alpha: Multiplier of the steering vector (``"add"``).
        function: ``"module:qualname"`` of the function (``"function"``), or ``None`` when it has no
            import path (a lambda or local function: usable, but not saveable).
        kwargs: Keyword arguments passed to the function (JSON values).
        fn: The function itself (``"function"``).
    """

    name: str
    kind: EditKind
    hooks: tuple[str, ...]
    positions: SpecJSON = None
    heads: SpecJSON = None
    neurons: SpecJSON = None
    values: Mapping[str, Tensor] = field(default_factory=dict)
    alpha: float = 1.0
    function: Optional[str] = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    fn: Optional[EditFunction] = field(default=None, repr=False)

    def apply(self, x: Tensor, hook: Any, hook_name: str) -> Tensor:
        """The activation ``x`` at ``hook_name`` after this edit (a new tensor; ``x`` is not changed)."""
        if self.kind == "function":
            out = self.fn(x, hook, **self.kwargs)
            return x if out is None else out
        pos_axis, head_axis = hook_layout(hook_name, x.ndim)
        positions = None
        if self.positions is not None:
            if pos_axis is None:
                raise ValueError(f"Edit {self.name!r}: {hook_name} has no position axis to select.")
            index = _resolve_cached(self.positions, x.shape[pos_axis], "position", self.name)
            positions = torch.as_tensor(index, device=x.device).repeat(x.shape[0], 1)
        axis, units = None, None
        if self.heads is not None:
            if head_axis is None:
                raise ValueError(f"Edit {self.name!r}: {hook_name} has no head axis to select heads on.")
            axis, units = head_axis, _resolve_cached(self.heads, x.shape[head_axis], "head", self.name)
        elif self.neurons is not None:
            axis = x.ndim - 1
            units = _resolve_cached(self.neurons, x.shape[axis], "index", self.name)
        if self.kind == "zero":
            value = torch.zeros((), dtype=x.dtype, device=x.device)
        elif self.kind == "mean":
            value = self.values[hook_name].to(device=x.device, dtype=x.dtype)
            if units is not None:
                value = value.index_select(axis, torch.as_tensor(units, device=x.device))
        elif self.kind == "add":
            value = self.alpha * self.values[hook_name].to(device=x.device, dtype=x.dtype)
        else:
            value = self.values[hook_name]
        # scatter's "head" axis is any one axis besides positions: heads, or the neurons' last axis
        return scatter(
            x, value, pos_axis, axis, positions, units,
            mode="add" if self.kind == "add" else "replace", what=f"edit {self.name!r} at {hook_name}",
        )

    def describe(self) -> str:
        """Selection and value in a few words, for :meth:`Edits.table`."""
        parts = []
        for label, spec in (("heads", self.heads), ("neurons", self.neurons), ("pos", self.positions)):
            if spec is not None:
                parts.append(f"{label}={_spec_text(spec)}")
        if self.kind == "mean":
            first = next(iter(self.values.values()))
            parts.append(f"mean {tuple(first.shape)}")
        elif self.kind == "add":
            first = next(iter(self.values.values()))
            parts.append(f"{self.alpha:g} x vector {tuple(first.shape)} |v|={float(first.float().norm()):.3g}")
        elif self.kind == "set":
            first = next(iter(self.values.values()))
            parts.append(f"value {tuple(first.shape)}")
        elif self.kind == "function":
            path = self.function or f"{getattr(self.fn, '__qualname__', self.fn)!s} (not importable)"
            parts.append(path + (f" {json.dumps(dict(self.kwargs))}" if self.kwargs else ""))
        return ", ".join(parts)


_RESOLVED: dict[tuple[str, str, int], list[int]] = {}


def _resolve_cached(spec: SpecJSON, n: int, what: str, edit: str) -> list[int]:
    key = (json.dumps(spec), what, n)
    hit = _RESOLVED.get(key)
    if hit is None:
        try:
            hit = resolve(spec, n, what=what)
        except ValueError as err:
            raise ValueError(f"Edit {edit!r}: {err}") from None
        if len(_RESOLVED) > 4096:
            _RESOLVED.clear()
        _RESOLVED[key] = hit
    return hit


def _spec_text(spec: SpecJSON) -> str:
    return ",".join(str(s) for s in spec) if isinstance(spec, list) else str(spec)


def _json_spec(spec: SpecLike, what: str) -> SpecJSON:
    """A spec in JSON-able form: slices become ``"start:stop:step"`` strings, ranges lists, tuples
    lists; token specs are refused (an edit sees no tokens)."""
    if spec is None:
        return None
    check_spec(spec, what)
    if isinstance(spec, Token):
        raise ValueError(
            f"{what} spec {spec!r}: edits apply to every forward pass and see no tokens, so a token "
            "position cannot be resolved; give an index (-1), a slice string (':3') or a list."
        )
    if isinstance(spec, bool):
        raise ValueError(f"{what} spec must be an int, a spec string or a list, got {spec!r}.")
    if isinstance(spec, (int, str)):
        return int(spec) if isinstance(spec, int) else spec
    if isinstance(spec, slice):
        parts = ["" if v is None else str(int(v)) for v in (spec.start, spec.stop, spec.step)]
        return ":".join(parts)
    if isinstance(spec, range):
        return list(spec)
    return [_json_spec(s, what) for s in spec]


# --------------------------------------------------------------------------------------------------
# Functions by import path
# --------------------------------------------------------------------------------------------------


def function_path(fn: Callable) -> Optional[str]:
    """``"module:name"`` of ``fn`` if it is a plain function at the top level of an imported module (the
    name a saved edit records), else ``None`` (lambdas, nested functions, methods, builtins). Nothing is
    imported: the module must already be loaded, as the module of a function you hold is."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not inspect.isfunction(fn) or not module or not qualname or not _FUNCTION_PATH.fullmatch(f"{module}:{qualname}"):
        return None
    return f"{module}:{qualname}" if getattr(sys.modules.get(module), qualname, None) is fn else None


# --------------------------------------------------------------------------------------------------
# The order hooks fire in
# --------------------------------------------------------------------------------------------------

_FIRING_ORDER: "weakref.WeakKeyDictionary[TransformerBridge, dict[int, int]]" = weakref.WeakKeyDictionary()


def _firing_order(model: TransformerBridge) -> dict[int, int]:
    """``{id(hook point): rank}`` in the order one forward pass reaches them (measured once per model
    on a two-token input; hook points that did not fire rank after, in registration order)."""
    order = _FIRING_ORDER.get(model)
    if order is not None:
        return order
    fired: list[int] = []
    handles = []
    points = {id(hp): hp for hp in model.hook_dict.values()}

    def record(x: Tensor, hook: Any) -> None:
        fired.append(id(hook))

    for hp in points.values():
        handles.append((hp, hp.add_hook(record, dir="fwd")))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device), return_type=None)
    finally:
        for hp, handle in handles:
            handle.hook.remove()
            if handle in hp.fwd_hooks:
                hp.fwd_hooks.remove(handle)
    order = {}
    for key in fired + list(points):
        order.setdefault(key, len(order))
    _FIRING_ORDER[model] = order
    return order


# --------------------------------------------------------------------------------------------------
# The set of edits on a model
# --------------------------------------------------------------------------------------------------


class Edits:
    """The named edits on one model; each applies on every forward pass until removed.

    Args:
        model: The ``TransformerBridge`` to edit.

    Example::

        edits = Edits(model)
        edits.ablate("no_induction", "z", layers=1, heads=[6])            # zero-ablate L1H6
        edits.steer("paris", "resid_post", v, layers=6, positions=-1, alpha=4.0)
        print(edits.table())
        model(tokens)                         # both edits apply
        edits.disable("paris")
        with edits.paused():
            model(tokens)                     # no edit applies
        edits.save("edits/paris_off")         # later: Edits.load(model, "edits/paris_off")
    """

    def __init__(self, model: TransformerBridge) -> None:
        if not isinstance(model, TransformerBridge):
            raise ValueError(f"Edits needs a TransformerBridge, got {type(model).__name__}.")
        self.model = model
        self._edits: dict[str, Edit] = {}
        self._enabled: dict[str, bool] = {}
        self._handles: dict[str, tuple[Any, Any]] = {}  # hook name -> (hook point, handle)
        self._paused = 0

    # ---- adding -------------------------------------------------------------------------------------
    def _hooks(self, state: NameSpec, layers: SpecLike) -> tuple[str, ...]:
        if not isinstance(state, (str, tuple)):
            raise ValueError(f"state must be a hook name (str), got {state!r}.")
        n = int(self.model.cfg.n_layers)
        return tuple(expand_name(self.model, state, resolve(layers, n, what="layer")))

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(
                f"edit name must be a non-empty str of at most 200 characters without '/' or control "
                f"characters, got {name!r}."
            )
        if name in self._edits:
            raise ValueError(f"An edit named {name!r} already exists; remove it first or pick another name.")

    def add(self, edit: Edit) -> Edit:
        """Add a built :class:`Edit` (the other methods build one and call this) and install its hooks.

        Raises:
            ValueError: If the name is taken or invalid, or a hook does not exist on the model.
        """
        if not isinstance(edit, Edit):
            raise ValueError(f"add needs an Edit, got {type(edit).__name__}.")
        self._check_name(edit.name)
        if edit.kind not in KINDS:
            raise ValueError(f"edit kind must be one of {KINDS}, got {edit.kind!r}.")
        if not edit.hooks:
            raise ValueError(f"Edit {edit.name!r} applies at no hook (an empty layer selection?).")
        for hook in edit.hooks:
            if resolve_name(self.model, hook) != hook:
                raise ValueError(f"Edit {edit.name!r}: {hook!r} is not a canonical hook name of this model.")
        self._edits[edit.name] = edit
        self._enabled[edit.name] = True
        self._sync()
        return edit

    def ablate(
        self,
        name: str,
        state: NameSpec,
        *,
        layers: SpecLike = None,
        heads: SpecLike = None,
        neurons: SpecLike = None,
        positions: SpecLike = None,
        how: Literal["zero", "mean"] = "zero",
        reference: Optional[Int[Tensor, "batch pos"]] = None,
        mean: Union[None, Tensor, Mapping[str, Tensor]] = None,
    ) -> Edit:
        """Zero- or mean-ablate heads, neurons or positions of a state.

        Args:
            name: The edit's name.
            state: The hook (``"z"`` / ``"attn.hook_z"`` for heads, ``"mlp_post"`` for neurons,
                ``"resid_pre"`` ...), per-layer names taken at ``layers``.
            layers: Layer spec (``None``: every layer).
            heads: Heads to ablate (hooks with a head axis); ``None``: all.
            neurons: Units of the last axis to ablate; ``None``: all. Not with ``heads``.
            positions: Positions to ablate; ``None``: all.
            how: ``"zero"`` sets the selection to 0; ``"mean"`` to the mean activation.
            reference: For ``how="mean"``: tokens ``[batch, pos]`` whose activations (on the model
                without edits) are averaged over batch and positions.
            mean: For ``how="mean"``, instead of ``reference``: the mean itself, one tensor for every
                hook or ``{hook name: tensor}``, broadcastable to the activation with the batch and
                position axes of size 1 (e.g. ``[1, 1, n_heads, d_head]`` for ``hook_z``).

        Returns:
            The :class:`Edit`.
        """
        if how not in ("zero", "mean"):
            raise ValueError(f"ablate how must be 'zero' or 'mean', got {how!r}.")
        if heads is not None and neurons is not None:
            raise ValueError("ablate takes heads= or neurons=, not both (neurons index the last axis).")
        hooks = self._hooks(state, layers)
        values: dict[str, Tensor] = {}
        if how == "mean":
            if (reference is None) == (mean is None):
                raise ValueError("ablate(how='mean') needs exactly one of reference= (tokens) or mean= (tensor).")
            values = self._means(hooks, reference) if reference is not None else self._per_hook(mean, hooks, "mean")
        elif reference is not None or mean is not None:
            raise ValueError("reference= and mean= are for how='mean' only.")
        return self.add(
            Edit(
                name, how, hooks,
                positions=_json_spec(positions, "position"),
                heads=_json_spec(heads, "head"),
                neurons=_json_spec(neurons, "index"),
                values=values,
            )
        )

    def steer(
        self,
        name: str,
        state: NameSpec,
        vector: Union[Float[Tensor, "..."], Mapping[str, Tensor]],
        *,
        layers: SpecLike = None,
        positions: SpecLike = None,
        alpha: float = 1.0,
    ) -> Edit:
        """Add ``alpha * vector`` to a state (a steering vector).

        Args:
            name: The edit's name.
            state: The hook (usually ``"resid_pre"`` / ``"resid_post"``).
            vector: Broadcasts to the selected region (a ``[d_model]`` vector is added at every batch
                item and selected position); one tensor for every hook or ``{hook name: tensor}``.
            layers: Layer spec (``None``: every layer).
            positions: Positions to add at (``None``: all).
            alpha: Scale.
        """
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise ValueError(f"steer alpha must be a number, got {alpha!r}.")
        hooks = self._hooks(state, layers)
        return self.add(
            Edit(
                name, "add", hooks,
                positions=_json_spec(positions, "position"),
                values=self._per_hook(vector, hooks, "vector"),
                alpha=float(alpha),
            )
        )

    def set_state(
        self,
        name: str,
        state: NameSpec,
        value: Union[Tensor, Mapping[str, Tensor]],
        *,
        layers: SpecLike = None,
        positions: SpecLike = None,
        heads: SpecLike = None,
    ) -> Edit:
        """Set a state (or the selected positions / heads of it) to a stored value.

        Args:
            name: The edit's name.
            state: The hook.
            value: Broadcasts to the selected region (e.g. ``sm.get(...)`` saved at the same
                positions, with a batch of 1 or the run's batch); one tensor or ``{hook name: tensor}``.
            layers / positions / heads: The selection (``None``: all).
        """
        hooks = self._hooks(state, layers)
        return self.add(
            Edit(
                name, "set", hooks,
                positions=_json_spec(positions, "position"),
                heads=_json_spec(heads, "head"),
                values=self._per_hook(value, hooks, "value"),
            )
        )

    def add_function(
        self,
        name: str,
        state: NameSpec,
        fn: Union[str, EditFunction],
        *,
        layers: SpecLike = None,
        kwargs: Optional[Mapping[str, Any]] = None,
    ) -> Edit:
        """Apply ``fn(activation, hook, **kwargs)`` at a hook; it returns the new activation (or
        ``None`` to keep it).

        Args:
            name: The edit's name.
            state: The hook.
            fn: The function. One defined at the top level of a module can be saved (by its
                ``"module:name"``); a lambda or local function works but cannot be saved.
            layers: Layer spec (``None``: every layer).
            kwargs: Keyword arguments for ``fn``; JSON values (saved with the edit).
        """
        if not callable(fn) or isinstance(fn, str):
            raise ValueError(f"add_function fn must be the function itself (nothing is imported by name), got {fn!r}.")
        path = function_path(fn)
        kwargs = dict(kwargs or {})
        try:
            if json.loads(json.dumps(kwargs)) != kwargs:
                raise TypeError("values change in a JSON round trip")
        except (TypeError, ValueError) as err:
            raise ValueError(f"add_function kwargs must be JSON values (str keys), got {kwargs!r}: {err}.") from None
        return self.add(Edit(name, "function", self._hooks(state, layers), function=path, kwargs=kwargs, fn=fn))

    def _per_hook(self, value: Any, hooks: tuple[str, ...], what: str) -> dict[str, Tensor]:
        if isinstance(value, Tensor):
            return {hook: value.detach() for hook in hooks}
        if isinstance(value, Mapping):
            out = {}
            for key, v in value.items():
                if not isinstance(v, Tensor):
                    raise ValueError(f"{what}[{key!r}] must be a tensor, got {type(v).__name__}.")
                out[resolve_name(self.model, key)] = v.detach()
            missing = [h for h in hooks if h not in out]
            extra = [h for h in out if h not in hooks]
            if missing or extra:
                raise ValueError(
                    f"{what} mapping must have one tensor per hook {list(hooks)}; missing {missing}, "
                    f"not edited {extra}."
                )
            return {h: out[h] for h in hooks}
        raise ValueError(f"{what} must be a tensor or {{hook name: tensor}}, got {type(value).__name__}.")

    @torch.no_grad()
    def _means(self, hooks: tuple[str, ...], reference: Tensor) -> dict[str, Tensor]:
        if not isinstance(reference, Tensor) or reference.ndim != 2 or reference.dtype != torch.long:
            raise ValueError("reference must be a token tensor [batch, pos] of dtype long.")
        wanted = set(hooks)
        with self.paused():
            _, cache = self.model.run_with_cache(reference, names_filter=lambda n: n in wanted)
        means = {}
        for hook in hooks:
            x = cache[hook]
            pos_axis, _ = hook_layout(hook, x.ndim)
            dims = (0,) if pos_axis is None else (0, pos_axis)
            means[hook] = x.mean(dim=dims, keepdim=True).detach()
        return means

    # ---- changing -----------------------------------------------------------------------------------
    def _get(self, name: str) -> Edit:
        if name not in self._edits:
            close = difflib.get_close_matches(str(name), list(self._edits), n=3, cutoff=0.5)
            raise ValueError(
                f"No edit named {name!r}. "
                + (f"Did you mean {close}? " if close else "")
                + f"Edits: {list(self._edits)}."
            )
        return self._edits[name]

    def get(self, name: str) -> Edit:
        """The edit named ``name`` (``ValueError`` listing the closest names if there is none)."""
        return self._get(name)

    def enable(self, *names: str) -> None:
        """Switch the named edits on (every edit if no name is given)."""
        for n in names or list(self._edits):
            self._get(n)
            self._enabled[n] = True
        self._sync()

    def disable(self, *names: str) -> None:
        """Switch the named edits off (every edit if no name is given); they stay listed."""
        for n in names or list(self._edits):
            self._get(n)
            self._enabled[n] = False
        self._sync()

    def toggle(self, name: str) -> bool:
        """Flip an edit on / off; returns whether it is now on."""
        self._get(name)
        self._enabled[name] = not self._enabled[name]
        self._sync()
        return self._enabled[name]

    def is_enabled(self, name: str) -> bool:
        """Whether the edit named ``name`` is on."""
        self._get(name)
        return self._enabled[name]

    def remove(self, *names: str) -> None:
        """Remove the named edits."""
        for n in names:
            self._get(n)
        for n in names:
            del self._edits[n], self._enabled[n]
        self._sync()

    def clear(self) -> None:
        """Remove every edit and every hook this object installed."""
        self._edits.clear()
        self._enabled.clear()
        self._sync()

    @contextmanager
    def paused(self) -> Iterator[Edits]:
        """Within the block no edit applies (the hooks stay, doing nothing)."""
        self._paused += 1
        try:
            yield self
        finally:
            self._paused -= 1

    def __enter__(self) -> Edits:
        if not hasattr(self, "_saved"):
            self._saved: list[tuple[dict[str, Edit], dict[str, bool]]] = []
        self._saved.append((dict(self._edits), dict(self._enabled)))
        return self

    def __exit__(self, *exc: Any) -> None:
        """Restore the edits and on/off states held when the block was entered."""
        self._edits, self._enabled = self._saved.pop()
        self._sync()

    # ---- hooks --------------------------------------------------------------------------------------
    def _sync(self) -> None:
        """Install one dispatching hook on each hook point that has an edit, remove the others."""
        needed = {hook for e in self._edits.values() for hook in e.hooks}
        for hook in [h for h in self._handles if h not in needed]:
            point, handle = self._handles.pop(hook)
            handle.hook.remove()
            if handle in point.fwd_hooks:
                point.fwd_hooks.remove(handle)
        for hook in sorted(needed - set(self._handles)):
            point = self.model.hook_dict[hook]
            self._handles[hook] = (point, point.add_hook(self._dispatcher(hook), dir="fwd", is_permanent=True))

    def _dispatcher(self, hook_name: str) -> Callable[[Tensor, Any], Optional[Tensor]]:
        ref = weakref.ref(self)

        def apply_edits(x: Tensor, hook: Any) -> Optional[Tensor]:
            edits = ref()
            if edits is None or edits._paused:
                return None
            out = x
            for edit in edits._edits.values():  # insertion order
                if edits._enabled[edit.name] and hook_name in edit.hooks:
                    out = edit.apply(out, hook, hook_name)
            return None if out is x else out

        apply_edits.__qualname__ = f"Edits.apply_edits[{hook_name}]"
        return apply_edits

    # ---- listing ------------------------------------------------------------------------------------
    def ordered(self) -> list[tuple[str, Edit]]:
        """``(hook name, edit)`` pairs in the order they apply on a forward pass (see the module
        docstring), disabled edits included."""
        with self.paused():
            order = _firing_order(self.model)
        position = {name: i for i, name in enumerate(self._edits)}
        pairs = [(hook, e) for e in self._edits.values() for hook in e.hooks]
        return sorted(pairs, key=lambda p: (order[id(self.model.hook_dict[p[0]])], position[p[1].name]))

    def __iter__(self) -> Iterator[Edit]:
        """The edits, ordered by the first hook each applies at (then insertion order)."""
        seen: dict[str, Edit] = {}
        for _, e in self.ordered():
            seen.setdefault(e.name, e)
        return iter(list(seen.values()))

    def __len__(self) -> int:
        return len(self._edits)

    def __contains__(self, name: object) -> bool:
        return name in self._edits

    @property
    def names(self) -> list[str]:
        """Edit names in insertion order."""
        return list(self._edits)

    def table(self) -> str:
        """One line per (hook, edit) in application order: step, hook, edit name, kind, on/off, and
        what it selects and writes."""
        if not self._edits:
            return "no edits"
        rows = [("#", "hook", "edit", "kind", "on", "what")]
        for i, (hook, e) in enumerate(self.ordered()):
            rows.append((str(i), hook, e.name, e.kind, "on" if self._enabled[e.name] else "off", e.describe()))
        widths = [max(len(r[c]) for r in rows) for c in range(5)]
        lines = ["  ".join(r[c].ljust(widths[c]) for c in range(5)) + "  " + r[5] for r in rows]
        paused = " (paused)" if self._paused else ""
        head = f"{len(self._edits)} edit(s), {sum(self._enabled.values())} on{paused}"
        return "\n".join([head] + [line.rstrip() for line in lines])

    def __repr__(self) -> str:
        return f"Edits({len(self)} edits: {', '.join(self._edits) or 'none'})"

    def __str__(self) -> str:
        return self.table()

    # ---- saving -------------------------------------------------------------------------------------
    def save(self, path: Any) -> SaveReport:
        """Write every edit (with its on/off state) to a directory: a :class:`minterp_tl.store.StateStore`
        whose metadata holds the JSON description and whose tensors are the edits' values (no
        pickle, no code: functions by import path). Saving again rewrites only changed tensors.

        Raises:
            ValueError: If a function edit has no import path (lambda, local function).
        """
        tensors: dict[str, Tensor] = {}
        entries = []
        for e in self._edits.values():
            if e.kind == "function" and e.function is None:
                raise ValueError(
                    f"Edit {e.name!r} cannot be saved: its function {getattr(e.fn, '__qualname__', e.fn)!s} "
                    "has no import path (a lambda or a function defined inside a function); define it at "
                    "the top level of a module."
                )
            value_keys = {}
            for hook, v in e.values.items():
                key = f"{e.name}/{hook}"
                tensors[key] = v
                value_keys[hook] = key
            entries.append(
                {
                    "name": e.name, "kind": e.kind, "hooks": list(e.hooks), "positions": e.positions,
                    "heads": e.heads, "neurons": e.neurons, "alpha": e.alpha, "function": e.function,
                    "kwargs": dict(e.kwargs), "values": value_keys, "enabled": self._enabled[e.name],
                }
            )
        cfg = self.model.cfg
        manifest = {
            "format": _FORMAT, "version": _VERSION,
            "model": {k: int(getattr(cfg, k)) for k in ("n_layers", "n_heads", "d_model", "d_vocab")},
            "edits": entries,
        }
        return StateStore(path).save(tensors, {"minterp_tl.kind": "Edits", "minterp_tl.edits": json.dumps(manifest)})

    @classmethod
    def load(
        cls,
        model: TransformerBridge,
        path: Any,
        functions: Union[Mapping[str, EditFunction], Sequence[EditFunction]] = (),
        **removed: Any,
    ) -> Edits:
        """Edits saved by :meth:`save`, installed on ``model``; all or nothing.

        Loading runs no code named in the folder: it imports nothing. A saved function edit names its
        function (``"module:qualname"``, as :func:`function_path` gives it); the caller hands the function
        itself in ``functions``, and a file that names any other function is refused. The whole file is
        checked (every field's type, the model's shape, every hook, every tensor's hash) before an edit is
        installed.

        Args:
            model: The model (same ``n_layers``, ``n_heads``, ``d_model`` and ``d_vocab`` as the one saved).
            path: The directory.
            functions: The functions function edits may call: a list of functions (each known by its
                ``"module:qualname"``) or a mapping from that name to the function.

        Raises:
            ValueError: If the directory holds no saved edits or a malformed file, the model's shape
                differs, a hook does not exist on ``model``, a tensor fails its integrity check, or a
                function edit names a function not in ``functions``; then no edit is installed.
        """
        if "allowed_modules" in removed:
            raise ValueError("Edits.load no longer imports functions named in a file (allowed_modules is gone): "
                             "pass the functions themselves, e.g. Edits.load(model, path, functions=[clip]).")
        if removed:
            raise TypeError(f"Edits.load got unexpected keyword arguments {sorted(removed)}")
        given = _given_functions(functions)
        store = StateStore(path)
        meta = store.metadata
        if meta.get("minterp_tl.kind") != "Edits":
            raise ValueError(f"The store at {str(path)!r} holds no saved edits (written by Edits.save).")
        where = f"Saved edits at {str(path)!r}"
        manifest = _read_manifest(meta.get("minterp_tl.edits"), where)
        cfg = model.cfg
        mine = {k: int(getattr(cfg, k)) for k in _MODEL_KEYS}
        if mine != manifest["model"]:
            raise ValueError(f"{where} were made for a model with {manifest['model']}; this model has {mine}.")
        for e in manifest["edits"]:  # every name is checked before any tensor is read
            if e["kind"] == "function" and e["function"] not in given:
                raise ValueError(
                    f"{where}: edit {e['name']!r} calls function {e['function']!r}, which was not given; loading "
                    f"imports nothing, so pass it: Edits.load(model, path, functions=[...]) (given: "
                    f"{sorted(given) or 'none'})."
                )
        tensors = store.load()
        edits = cls(model)
        built = []
        for e in manifest["edits"]:
            try:
                specs = {what: _json_spec(e[key], what) for key, what in
                         (("positions", "position"), ("heads", "head"), ("neurons", "index"))}
            except ValueError as err:
                raise ValueError(f"Saved edit {e['name']!r}: {err}") from None
            hooks = tuple(e["hooks"])
            for hook in hooks:
                try:
                    if resolve_name(model, hook) != hook:
                        raise ValueError(f"{hook!r} is an alias, not the canonical name")
                except ValueError as err:
                    raise ValueError(f"Saved edit {e['name']!r}: hook {hook!r} does not fit this model: {err}") from None
            missing = [k for k in e["values"].values() if k not in tensors]
            if missing or set(e["values"]) - set(hooks):
                raise ValueError(f"{where}: edit {e['name']!r} refers to values {missing} that the store does not "
                                 f"hold, or to hooks it does not edit.")
            built.append(
                (
                    Edit(
                        e["name"], e["kind"], hooks, positions=specs["position"], heads=specs["head"],
                        neurons=specs["index"], values={h: tensors[k] for h, k in e["values"].items()},
                        alpha=float(e["alpha"]), function=e["function"], kwargs=e["kwargs"],
                        fn=given.get(e["function"]) if e["kind"] == "function" else None,
                    ),
                    e["enabled"],
                )
            )
        for edit, enabled in built:
            edits._check_name(edit.name)
            edits._edits[edit.name] = edit
            edits._enabled[edit.name] = enabled
        edits._sync()
        return edits


_MODEL_KEYS = ("n_layers", "n_heads", "d_model", "d_vocab")
_EDIT_FIELDS: dict[str, Any] = {
    "name": str, "kind": str, "hooks": list, "positions": object, "heads": object, "neurons": object,
    "alpha": (int, float), "function": (str, type(None)), "kwargs": dict, "values": dict, "enabled": bool,
}


def _given_functions(functions: Union[Mapping[str, EditFunction], Sequence[EditFunction]]) -> dict[str, EditFunction]:
    """``{"module:qualname": function}`` from what :meth:`Edits.load` was given (nothing is imported)."""
    if isinstance(functions, Mapping):
        items = list(functions.items())
    else:
        items = []
        for fn in functions:
            module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
            if not callable(fn) or not module or not qualname:
                raise ValueError(f"Edits.load functions must be functions, got {fn!r}.")
            items.append((f"{module}:{qualname}", fn))
    for name, fn in items:
        if not isinstance(name, str) or not callable(fn):
            raise ValueError(f"Edits.load functions must map 'module:qualname' strings to functions, got {name!r}: {fn!r}.")
    return dict(items)


def _read_manifest(text: Any, where: str) -> dict[str, Any]:
    """The JSON description of saved edits, every field checked (a malformed file is a ValueError that
    says what is wrong, never a KeyError or TypeError)."""
    if not isinstance(text, str):
        raise ValueError(f"{where}: the store's metadata has no edits description.")
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{where}: the edits description is not valid JSON ({type(err).__name__}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT or manifest.get("version") != _VERSION:
        raise ValueError(f"{where} have an unknown format or version.")
    model = manifest.get("model")
    if (not isinstance(model, dict) or sorted(model) != sorted(_MODEL_KEYS)
            or not all(type(v) is int for v in model.values())):
        raise ValueError(f"{where}: 'model' must give the integers {list(_MODEL_KEYS)}, got {model!r}.")
    entries = manifest.get("edits")
    if not isinstance(entries, list):
        raise ValueError(f"{where}: 'edits' must be a list.")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or sorted(e) != sorted(_EDIT_FIELDS):
            raise ValueError(f"{where}: edit #{i} must have exactly the fields {sorted(_EDIT_FIELDS)}.")
        for key, kind in _EDIT_FIELDS.items():
            value = e[key]
            if not isinstance(value, kind) or (key == "alpha" and (isinstance(value, bool) or not math.isfinite(value))):
                raise ValueError(f"{where}: edit #{i} field {key!r} has the wrong type or value: {value!r}.")
        if e["kind"] not in KINDS:
            raise ValueError(f"{where}: edit {e['name']!r} has an unknown kind {e['kind']!r}; kinds: {KINDS}.")
        if (e["kind"] == "function") != isinstance(e["function"], str):
            raise ValueError(f"{where}: edit {e['name']!r}: 'function' must be a name exactly for function edits.")
        if not e["hooks"] or not all(isinstance(h, str) for h in e["hooks"]):
            raise ValueError(f"{where}: edit {e['name']!r}: 'hooks' must be a non-empty list of hook names.")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in e["values"].items()):
            raise ValueError(f"{where}: edit {e['name']!r}: 'values' must map hook names to tensor keys.")
    return manifest


__all__ = ["Edit", "EditFunction", "EditKind", "Edits", "function_path"]
