"""Named, persistent edits: interventions that stay on a model for every forward pass until removed.

An :class:`Edits` object holds the named edits of one ``TransformerBridge``. Each edit is a name and an
:class:`~minterp_tl.interventions.Intervention`, the same record a single run
(``StateConfig(interventions=...)``) and a patching sweep use, applied by the same code: :meth:`~Edits.ablate`
(zero / mean), :meth:`~Edits.steer`, :meth:`~Edits.set`, :meth:`~Edits.scale`, :meth:`~Edits.add_function`,
or any record with :meth:`~Edits.add`.

Each edit has a unique name and is listed by :meth:`Edits.table`; :meth:`~Edits.disable`,
:meth:`~Edits.enable`, :meth:`~Edits.toggle`, :meth:`~Edits.remove` and :meth:`~Edits.clear` change
the set; ``with edits:`` restores, on exit, the edits (and their on/off states) held on entry, and
``with edits.paused():`` runs the unedited model. :meth:`Edits.write` writes the edits to a folder (a
:class:`minterp_tl.store.StateStore`: a JSON manifest and safetensors files, no pickle and no code)
and :meth:`Edits.read` puts them on a model again (see :mod:`minterp_tl._edit_files`).

Names, layers and positions: ``hook`` is any hook name :func:`minterp_tl.names.resolve_name`
accepts; a per-layer name (``"z"``, ``"resid_post"``) is taken at each of ``layers`` (``None`` =
every layer). ``positions`` are per prompt, as everywhere: ``-1`` is each prompt's last real token
(the padding of a batch is read from its tokens with TransformerLens's rule: trailing pad tokens, or
leading ones for a tokenizer that pads on the left). Token-text specs are refused (an edit applies to
every forward pass and has no prompt text). ``heads`` are checked against the hook's head count
(key/value heads for ``k`` / ``v`` under GQA) when the edit is added; ``neurons`` index the last
axis and may not be combined with ``heads``.

Order. Edits run in the order of the forward pass: an edit at a hook that fires earlier runs first;
edits at the same hook run in insertion order, each seeing the previous one's output.
:meth:`Edits.table` and iteration list edits in exactly this order. Every edit at a hook point is
applied by one persistent hook (``HookPoint.add_hook(..., is_permanent=True)``, so
``model.reset_hooks()`` leaves it alone), registered when the first edit there is added: it runs
before hooks added later (``run_with_hooks``, ``run_with_cache``), which therefore see the edited
activation. ``model.reset_hooks(including_permanent=True)`` removes edits behind this object's back;
call :meth:`Edits.clear` instead.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from minterp_tl import _deprecated, _edit_files
from minterp_tl._checks import did_you_mean
from minterp_tl._edit_files import function_path
from minterp_tl.hooks import firing_order, hook_layout
from minterp_tl.interventions import (
    MODES,
    BatchLayout,
    Intervention,
    InterventionFunction,
    Mode,
    Step,
    apply_step,
    resolve_steps,
)
from minterp_tl.names import NameSpec, expand_name
from minterp_tl.specs import SpecLike, resolve
from minterp_tl.store import SaveReport

EditKind = Mode
"""An edit's kind is its intervention's mode (``"zero"``, ``"mean"``, ``"add"``, ``"set"``, ``"scale"``,
``"patch"``, ``"function"``)."""

EditFunction = InterventionFunction
KINDS: tuple[str, ...] = MODES
_NAME = re.compile(r"[^\x00-\x1f/]{1,200}")


# --------------------------------------------------------------------------------------------------
# One edit
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Edit:
    """One named edit: an :class:`~minterp_tl.interventions.Intervention` resolved on a model.

    Attributes:
        name: Unique name within its :class:`Edits`.
        intervention: The record (its specs in JSON-able form: ints, spec strings, lists).
        steps: The record resolved at each canonical hook it applies at.
        function: ``"module:qualname"`` of a function edit's function, or ``None`` when it has no
            import path (a lambda or local function: usable, but not writable).
    """

    name: str
    intervention: Intervention
    steps: tuple[Step, ...]
    function: Optional[str] = None

    @property
    def kind(self) -> str:
        return self.intervention.mode

    @property
    def hooks(self) -> tuple[str, ...]:
        return tuple(s.hook for s in self.steps)

    @property
    def values(self) -> dict[str, Tensor]:
        """``{hook name: tensor}`` for kinds with a value, else empty."""
        return {s.hook: s.value for s in self.steps if s.value is not None}

    @property
    def alpha(self) -> float:
        return float(self.intervention.alpha)

    @property
    def kwargs(self) -> Mapping[str, Any]:
        return self.intervention.kwargs

    @property
    def fn(self) -> Optional[EditFunction]:
        return self.intervention.fn

    def row(self, enabled: bool = True) -> _edit_files.Row:
        """This edit as the folder format and the table see it."""
        return _edit_files.Row(self.name, self.intervention, self.hooks, self.values, self.function, enabled)

    def describe(self) -> str:
        """Selection and value in a few words, for :meth:`Edits.table`."""
        return _edit_files.describe(self.row())


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
        edits.write("edits/paris_off")        # later: Edits.read(model, "edits/paris_off")
    """

    def __init__(self, model: TransformerBridge) -> None:
        if not isinstance(model, TransformerBridge):
            raise ValueError(f"Edits needs a TransformerBridge, got {type(model).__name__}.")
        self.model = model
        self._edits: dict[str, Edit] = {}
        self._enabled: dict[str, bool] = {}
        self._handles: dict[str, tuple[Any, Any]] = {}  # hook name -> (hook point, handle)
        self._batch: list[Any] = []  # module hooks that read each forward pass's padding
        self._layout: Optional[BatchLayout] = None
        self._paused = 0
        self._saved: list[tuple[dict[str, Edit], dict[str, bool]]] = []

    # ---- adding -------------------------------------------------------------------------------------
    def add(self, name: Union[str, Edit], intervention: Optional[Intervention] = None) -> Edit:
        """Add ``intervention`` under ``name`` (or a built :class:`Edit`) and install its hooks.

        Raises:
            ValueError: If the name is taken or invalid, or the intervention does not fit the model
                (unknown hook, bad layers or heads, a value mapping that does not match its hooks).
        """
        if isinstance(name, Edit):
            edit = name
        else:
            if not isinstance(intervention, Intervention):
                raise ValueError(
                    f"Edits.add needs a name and an Intervention, got {type(intervention).__name__}."
                )
            edit = self._build(name, intervention)
        self._check_name(edit.name)
        self._edits[edit.name] = edit
        self._enabled[edit.name] = True
        self._sync()
        return edit

    def _build(self, name: str, intervention: Intervention, function: Optional[str] = None) -> Edit:
        self._check_name(name)
        iv = intervention
        stored = Intervention(
            iv.hook,
            iv.mode,
            iv.value,
            layers=iv.layers,
            positions=_edit_files.json_spec(iv.positions, "position"),
            heads=_edit_files.json_spec(iv.heads, "head"),
            neurons=_edit_files.json_spec(iv.neurons, "index"),
            alpha=iv.alpha,
            fn=iv.fn,
            kwargs=iv.kwargs,
        )
        steps = tuple(resolve_steps(self.model, stored, what=f"Edit {name!r}"))
        if iv.mode == "function" and function is None:
            function = _edit_files.function_path(iv.fn)  # type: ignore[arg-type]
        return Edit(name, stored, steps, function)

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(
                f"edit name must be a non-empty str of at most 200 characters without '/' or control "
                f"characters, got {name!r}."
            )
        if name in self._edits:
            raise ValueError(f"An edit named {name!r} already exists; remove it first or pick another name.")

    def ablate(
        self,
        name: str,
        hook: NameSpec,
        *,
        layers: SpecLike = None,
        heads: SpecLike = None,
        neurons: SpecLike = None,
        positions: SpecLike = None,
        how: Literal["zero", "mean"] = "zero",
        reference: Optional[Int[Tensor, "batch pos"]] = None,
        mean: Union[None, Tensor, Mapping[str, Tensor]] = None,
    ) -> Edit:
        """Zero- or mean-ablate heads, neurons or positions of an activation.

        Args:
            name: The edit's name.
            hook: The hook (``"z"`` for heads, ``"mlp_post"`` for neurons, ``"resid_pre"`` ...).
            layers: Layer spec (``None``: every layer).
            heads: Heads to ablate (hooks with a head axis); ``None``: all.
            neurons: Units of the last axis to ablate; ``None``: all. Not with ``heads``.
            positions: Positions to ablate, per prompt; ``None``: all.
            how: ``"zero"`` sets the selection to 0; ``"mean"`` to the mean activation.
            reference: For ``how="mean"``: tokens ``[batch, pos]`` whose activations (on the model
                without edits) are averaged over batch and positions.
            mean: For ``how="mean"``, instead of ``reference``: the mean itself, one tensor for every
                hook or ``{hook name: tensor}``, broadcastable to the activation with the batch and
                position axes of size 1 (e.g. ``[1, 1, n_heads, d_head]`` for ``hook_z``).
        """
        if how not in ("zero", "mean"):
            raise ValueError(f"ablate how must be 'zero' or 'mean', got {how!r}.")
        if heads is not None and neurons is not None:
            raise ValueError("ablate takes heads= or neurons=, not both (neurons index the last axis).")
        value: Any = None
        if how == "mean":
            if (reference is None) == (mean is None):
                raise ValueError(
                    "ablate(how='mean') needs exactly one of reference= (tokens) or mean= (tensor)."
                )
            value = mean if mean is not None else self._means(self._hooks(hook, layers), reference)  # type: ignore[arg-type]
        elif reference is not None or mean is not None:
            raise ValueError("reference= and mean= are for how='mean' only.")
        record = Intervention(
            hook, how, value, layers=layers, positions=positions, heads=heads, neurons=neurons
        )
        return self.add(self._build(name, record))

    def steer(
        self,
        name: str,
        hook: NameSpec,
        vector: Union[Float[Tensor, ...], Mapping[str, Tensor]],
        *,
        layers: SpecLike = None,
        positions: SpecLike = None,
        alpha: float = 1.0,
    ) -> Edit:
        """Add ``alpha * vector`` to an activation (a steering vector).

        Args:
            name: The edit's name.
            hook: The hook (usually ``"resid_pre"`` / ``"resid_post"``).
            vector: Broadcasts to the selected region (a ``[d_model]`` vector is added at every batch
                item and selected position); one tensor for every hook or ``{hook name: tensor}``.
            layers: Layer spec (``None``: every layer).
            positions: Positions to add at, per prompt (``None``: all).
            alpha: Scale.
        """
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise ValueError(f"steer alpha must be a number, got {alpha!r}.")
        record = Intervention(hook, "add", vector, layers=layers, positions=positions, alpha=float(alpha))
        return self.add(self._build(name, record))

    def set(
        self,
        name: str,
        hook: NameSpec,
        value: Union[Tensor, Mapping[str, Tensor]],
        *,
        layers: SpecLike = None,
        positions: SpecLike = None,
        heads: SpecLike = None,
    ) -> Edit:
        """Set an activation (or the selected positions / heads of it) to a stored value.

        Args:
            name: The edit's name.
            hook: The hook.
            value: Broadcasts to the selected region (e.g. ``sm.get(...)`` saved at the same
                positions, with a batch of 1 or the run's batch); one tensor or ``{hook name: tensor}``.
            layers / positions / heads: The selection (``None``: all).
        """
        record = Intervention(hook, "set", value, layers=layers, positions=positions, heads=heads)
        return self.add(self._build(name, record))

    def set_state(self, name: str, state: NameSpec, value: Any, **selection: Any) -> Edit:
        """Deprecated spelling of :meth:`set`."""
        _deprecated.warn("Edits.set_state", "Edits.set")
        return self.set(name, state, value, **selection)

    def scale(
        self,
        name: str,
        hook: NameSpec,
        alpha: float,
        *,
        layers: SpecLike = None,
        positions: SpecLike = None,
        heads: SpecLike = None,
        neurons: SpecLike = None,
    ) -> Edit:
        """Multiply the selected positions / heads / neurons of an activation by ``alpha``."""
        record = Intervention(
            hook, "scale", layers=layers, positions=positions, heads=heads, neurons=neurons, alpha=alpha
        )
        return self.add(self._build(name, record))

    def add_function(
        self,
        name: str,
        hook: NameSpec,
        fn: EditFunction,
        *,
        layers: SpecLike = None,
        kwargs: Optional[Mapping[str, Any]] = None,
    ) -> Edit:
        """Apply ``fn(activation, hook, **kwargs)`` at a hook; it returns the new activation (or
        ``None`` to keep it).

        Args:
            name: The edit's name.
            hook: The hook.
            fn: The function. One defined at the top level of a module can be written (by its
                ``"module:name"``); a lambda or local function works but cannot be written.
            layers: Layer spec (``None``: every layer).
            kwargs: Keyword arguments for ``fn``; JSON values (written with the edit).
        """
        if not callable(fn) or isinstance(fn, str):
            raise ValueError(
                f"add_function fn must be the function itself (nothing is imported by name), got {fn!r}."
            )
        kwargs = dict(kwargs or {})
        try:
            if json.loads(json.dumps(kwargs)) != kwargs:
                raise TypeError("values change in a JSON round trip")
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"add_function kwargs must be JSON values (str keys), got {kwargs!r}: {err}."
            ) from None
        return self.add(
            self._build(name, Intervention(hook, "function", layers=layers, fn=fn, kwargs=kwargs))
        )

    def _hooks(self, hook: NameSpec, layers: SpecLike) -> tuple[str, ...]:
        if not isinstance(hook, (str, tuple)):
            raise ValueError(f"hook must be a hook name (str), got {hook!r}.")
        n = int(self.model.cfg.n_layers)
        return tuple(expand_name(self.model, hook, resolve(layers, n, what="layer")))

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
            means[hook] = x.mean(dim=(0,) if pos_axis is None else (0, pos_axis), keepdim=True).detach()
        return means

    # ---- changing -----------------------------------------------------------------------------------
    def get(self, name: str) -> Edit:
        """The edit named ``name`` (``ValueError`` listing the closest names if there is none)."""
        if name not in self._edits:
            raise ValueError(
                f"No edit named {name!r}{did_you_mean(name, self._edits, cutoff=0.5)}. "
                f"Edits: {list(self._edits)}."
            )
        return self._edits[name]

    def enable(self, *names: str) -> None:
        """Switch the named edits on (every edit if no name is given)."""
        self._switch(names, True)

    def disable(self, *names: str) -> None:
        """Switch the named edits off (every edit if no name is given); they stay listed."""
        self._switch(names, False)

    def _switch(self, names: Sequence[str], on: bool) -> None:
        for n in names or list(self._edits):
            self.get(n)
            self._enabled[n] = on
        self._sync()

    def toggle(self, name: str) -> bool:
        """Flip an edit on / off; returns whether it is now on."""
        self._switch([name], not self.is_enabled(name))
        return self._enabled[name]

    def is_enabled(self, name: str) -> bool:
        """Whether the edit named ``name`` is on."""
        self.get(name)
        return self._enabled[name]

    def remove(self, *names: str) -> None:
        """Remove the named edits."""
        for n in names:
            self.get(n)
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
        self._saved.append((dict(self._edits), dict(self._enabled)))
        return self

    def __exit__(self, *exc: Any) -> None:
        """Restore the edits and on/off states held when the block was entered."""
        self._edits, self._enabled = self._saved.pop()
        self._sync()

    # ---- hooks --------------------------------------------------------------------------------------
    def _sync(self) -> None:
        """Install one dispatching hook on each hook point that has an edit, remove the others; read each
        forward pass's padding while any edit is held."""
        needed = {hook for e in self._edits.values() for hook in e.hooks}
        for hook in [h for h in self._handles if h not in needed]:
            point, handle = self._handles.pop(hook)
            handle.hook.remove()
            if handle in point.fwd_hooks:
                point.fwd_hooks.remove(handle)
        for hook in sorted(needed - set(self._handles)):
            point = self.model.hook_dict[hook]
            self._handles[hook] = (
                point,
                point.add_hook(self._dispatcher(hook), dir="fwd", is_permanent=True),
            )
        if needed and not self._batch:
            self._watch_batches()
        elif not needed:
            for handle in self._batch:
                handle.remove()
            self._batch, self._layout = [], None

    def _watch_batches(self) -> None:
        """Module hooks on the embedding (reads the tokens of each forward pass) and the unembedding
        (forgets them), so positions are per prompt; a forward that skips the embedding resolves
        positions against the activation's own length."""
        ref = weakref.ref(self)

        def read(module: Any, args: tuple) -> None:
            edits = ref()
            if edits is not None and args and isinstance(args[0], Tensor) and args[0].ndim == 2:
                edits._layout = BatchLayout.from_tokens(edits.model, args[0])

        def forget(module: Any, args: tuple, out: Any) -> None:
            edits = ref()
            if edits is not None:
                edits._layout = None

        embed, unembed = getattr(self.model, "embed", None), getattr(self.model, "unembed", None)
        if isinstance(embed, torch.nn.Module):
            self._batch.append(embed.register_forward_pre_hook(read))
        if isinstance(unembed, torch.nn.Module):
            self._batch.append(unembed.register_forward_hook(forget))

    def _dispatcher(self, hook_name: str) -> Callable[..., Optional[Tensor]]:
        ref = weakref.ref(self)

        def apply_edits(tensor: Tensor, *, hook: Any) -> Optional[Tensor]:
            edits = ref()
            if edits is None or edits._paused:
                return None
            out = tensor
            for edit in edits._edits.values():  # insertion order
                if edits._enabled[edit.name]:
                    for step in edit.steps:
                        if step.hook == hook_name:
                            out = apply_step(out, step, edits._layout, hook)
            return None if out is tensor else out

        apply_edits.__qualname__ = f"Edits.apply_edits[{hook_name}]"
        return apply_edits

    # ---- listing ------------------------------------------------------------------------------------
    def ordered(self) -> list[tuple[str, Edit]]:
        """``(hook name, edit)`` pairs in the order they apply on a forward pass (see the module
        docstring), disabled edits included."""
        with self.paused():
            order = firing_order(self.model)
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
        ordered = [(hook, e.row(self._enabled[e.name])) for hook, e in self.ordered()]
        rows = [e.row(self._enabled[e.name]) for e in self._edits.values()]
        return _edit_files.table(ordered, rows, bool(self._paused))

    def __repr__(self) -> str:
        return f"Edits({len(self)} edits: {', '.join(self._edits) or 'none'})"

    def __str__(self) -> str:
        return self.table()

    # ---- on disk ------------------------------------------------------------------------------------
    def write(self, path: Any) -> SaveReport:
        """Write every edit (with its on/off state) to the folder ``path`` (see
        :func:`minterp_tl._edit_files.write_edits`: no pickle, no code, functions by name)."""
        rows = [e.row(self._enabled[e.name]) for e in self._edits.values()]
        return _edit_files.write_edits(self.model, rows, path)

    @classmethod
    def read(
        cls,
        model: TransformerBridge,
        path: Any,
        functions: Union[Mapping[str, EditFunction], Sequence[EditFunction]] = (),
        **removed: Any,
    ) -> Edits:
        """Edits written by :meth:`write`, installed on ``model``; all or nothing. Reading imports and runs
        nothing named in the folder: function edits call only the functions passed in ``functions`` (a
        list, each known by its ``"module:qualname"``, or ``{name: function}``). See
        :func:`minterp_tl._edit_files.read_edits` for every check made before an edit is installed."""
        if "allowed_modules" in removed:
            raise ValueError(
                "Edits.read imports no function named in a file (allowed_modules is gone): "
                "pass the functions themselves, e.g. Edits.read(model, path, functions=[clip])."
            )
        if removed:
            raise TypeError(f"Edits.read got unexpected keyword arguments {sorted(removed)}")
        edits = cls(model)
        built = []
        for row in _edit_files.read_edits(model, path, functions):  # all resolved before any is installed
            try:
                built.append((edits._build(row.name, row.intervention, row.function), row.enabled))
            except ValueError as err:
                raise ValueError(f"Saved edit {row.name!r}: {err}") from None
        for edit, enabled in built:
            edits._check_name(edit.name)  # two edits of one name in a file
            edits._edits[edit.name] = edit
            edits._enabled[edit.name] = enabled
        edits._sync()
        return edits

    def save(self, path: Any) -> SaveReport:
        """Deprecated spelling of :meth:`write`."""
        _deprecated.warn("Edits.save(path)", "Edits.write(path)")
        return self.write(path)

    @classmethod
    def load(cls, model: TransformerBridge, path: Any, functions: Any = (), **removed: Any) -> Edits:
        """Deprecated spelling of :meth:`read`."""
        _deprecated.warn("Edits.load(model, path)", "Edits.read(model, path)")
        return cls.read(model, path, functions, **removed)


__all__ = ["Edit", "EditFunction", "EditKind", "Edits", "KINDS", "function_path"]
