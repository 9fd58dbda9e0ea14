"""StateConfig and StateManager: which states a phase saves and patches in, and where they are kept.

A *state* is the activation at one hook point (a canonical hook name such as
``blocks.3.hook_resid_pre``), possibly restricted to some positions and heads. Per phase, a
:class:`StateConfig` lists

- ``save``: :class:`SaveRule` -- states to copy out of the run (only those: no full
  ``run_with_cache``), optionally concatenated along the batch with what an earlier run saved;
- ``load``: :class:`LoadRule` -- saved states to put into the run (activation patching), with
  position maps (saved at position 5, loaded at 7), layer maps, a transform (:class:`Scale`,
  :class:`Add`, :class:`MeanOverBatch`, any callable) and a mode (``"replace"`` or ``"add"``, the
  latter for steering vectors);
- ``drop``: keys or tags to forget once the phase has run (``LoadRule(pop=True)`` forgets what it
  loaded).

A :class:`StateManager` holds the saved states, keyed by ``(tag, name)``: ``name`` is the canonical
hook name (or any key given to :meth:`StateManager.put`), ``tag`` separates several saves of the same
hook (``"clean"`` / ``"corrupt"``; default ``""``). Each :class:`SavedState` remembers which positions
(per prompt) and heads it holds, so a later phase can ask for "position 5 of what was saved". The
manager reports the bytes it holds and converts to and from a TransformerLens ``ActivationCache``.

Rules leave ``state`` / ``layers`` / ``positions`` / ``heads`` at ``None`` to take the phase context's
values (:class:`minterp_tl.context.RepresentationContext`). Running the rules is the job of
:class:`minterp_tl.wrapper.ModelWrapper`; the tensor selection helpers used there live at the bottom
of this module.

Saved tensors keep the hook's own axis order, with the position axis cut to the saved positions and
the head axis to the saved heads: ``blocks.0.hook_resid_post`` saved at ``"last"`` is
``[batch, 1, d_model]``; ``blocks.0.attn.hook_pattern`` saved at heads ``[1, 3]`` and positions
``"last"`` is ``[batch, 2, 1, key_pos]`` (the position spec selects query positions).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
from jaxtyping import Int
from torch import Tensor
from transformer_lens import ActivationCache

from minterp_tl import _deprecated, _state_files
from minterp_tl import hooks as _hooks
from minterp_tl._checks import did_you_mean
from minterp_tl._state_files import format_key
from minterp_tl.interventions import Intervention
from minterp_tl.specs import SpecLike, check_spec
from minterp_tl.store import SaveReport

Transform = Callable[[Tensor], Tensor]
"""A function applied to a saved state before it is loaded: saved selection -> value to write."""

Mode = Literal["set", "add"]
"""How a :class:`LoadRule` writes: ``"set"`` the selection to the value, or ``"add"`` it (``"replace"`` is
the deprecated spelling of ``"set"``)."""


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Scale:
    """Multiply the saved state by ``alpha`` (e.g. ``LoadRule(..., mode="add", transform=Scale(4.0))``
    adds four times a steering vector)."""

    alpha: float

    def __call__(self, x: Tensor) -> Tensor:
        return x * self.alpha


@dataclass(frozen=True, eq=False)
class Add:
    """Add ``vector`` (times ``alpha``) to the saved state; ``vector`` broadcasts from the right
    (a ``[d_model]`` vector is added at every batch item and position)."""

    vector: Tensor
    alpha: float = 1.0

    def __call__(self, x: Tensor) -> Tensor:
        return x + self.alpha * self.vector.to(device=x.device, dtype=x.dtype)


@dataclass(frozen=True)
class MeanOverBatch:
    """Average the saved state over its batch (axis 0), keeping a batch axis of 1 that broadcasts to
    the run's batch (mean ablation: load the mean of a reference batch)."""

    def __call__(self, x: Tensor) -> Tensor:
        return x.mean(dim=0, keepdim=True)


@dataclass(frozen=True, eq=False)
class Compose:
    """Apply ``transforms`` left to right."""

    transforms: tuple[Transform, ...]

    def __call__(self, x: Tensor) -> Tensor:
        for t in self.transforms:
            x = t(x)
        return x


# --------------------------------------------------------------------------------------------------
# Rules and config
# --------------------------------------------------------------------------------------------------


@_deprecated.renamed_field("state", "hook")
@dataclass(frozen=True)
class SaveRule:
    """Copy a state out of the run into the :class:`StateManager`.

    Args:
        hook: A hook name in any form :func:`minterp_tl.names.resolve_name` accepts; per-layer names
            are taken at each of ``layers``. ``None``: each of the context's ``hooks``. (``state=`` is
            the deprecated spelling.)
        layers: Layer spec (``None``: the context's).
        positions: Position spec (``None``: the context's). ``"all"`` saves every position.
        heads: Head spec for hooks with a head axis (``None``: the context's).
        tag: Saved under ``(tag, canonical name)``.
        concat: If a state with the same key is already held, concatenate along the batch (axis 0)
            instead of replacing it (collect activations over several runs).
    """

    hook: Optional[str] = None
    layers: SpecLike = None
    positions: SpecLike = None
    heads: SpecLike = None
    tag: str = ""
    concat: bool = False

    def __post_init__(self) -> None:
        _check_rule_specs(self)


@_deprecated.renamed_field("state", "hook")
@dataclass(frozen=True)
class LoadRule:
    """Write a saved state into the run at a hook (activation patching, steering).

    Args:
        hook: The hook to write at, as in :class:`SaveRule` (``None``: the context's ``hooks``).
        layers: Layers to write at (``None``: the context's).
        positions: Positions to write at, per prompt (``None``: the context's).
        heads: Heads to write at (``None``: the context's).
        tag: The tag the source was saved under.
        source: A fixed key to read from instead of the same hook (e.g. a vector given to
            :meth:`StateManager.put`); then ``source_layers`` / ``source_positions`` do not apply.
        source_layers: Read the state saved at these layers instead (paired with ``layers``; one
            source layer is used for every target layer).
        source_positions: Read these positions of the saved run (resolved against the saved run's
            prompts; they must have been saved). ``None``: if the saved state holds every position,
            the target positions are read (same-position patching); otherwise everything saved is
            used as it is.
        transform: Applied to the saved selection before writing (:class:`Scale`,
            :class:`MeanOverBatch`, ...).
        mode: ``"set"`` sets the selection to the value; ``"add"`` adds the value to it (steering).
        pop: Forget the saved state after this phase.

    The value written must broadcast (torch rules) to the selected region of the activation: a saved
    batch of 1 or a single saved position is repeated; anything else that does not fit raises a
    ``ValueError`` naming both shapes.
    """

    hook: Optional[str] = None
    layers: SpecLike = None
    positions: SpecLike = None
    heads: SpecLike = None
    tag: str = ""
    source: Optional[str] = None
    source_layers: SpecLike = None
    source_positions: SpecLike = None
    transform: Optional[Transform] = None
    mode: Mode = "set"
    pop: bool = False

    def __post_init__(self) -> None:
        _check_rule_specs(self)
        check_spec(self.source_layers, "layer")
        check_spec(self.source_positions, "position")
        if self.mode == "replace":
            _deprecated.warn("LoadRule(mode='replace')", "mode='set'")
            object.__setattr__(self, "mode", "set")
        if self.mode not in ("set", "add"):
            raise ValueError(f"LoadRule mode must be 'set' or 'add', got {self.mode!r}.")
        if self.transform is not None and not callable(self.transform):
            raise ValueError(f"LoadRule transform must be callable, got {self.transform!r}.")
        if self.source is not None and (self.source_layers is not None or self.source_positions is not None):
            raise ValueError(
                "LoadRule takes either source= (a fixed key) or source_layers= / source_positions= "
                f"(a map from the saved hook), not both; got source={self.source!r}."
            )


def _check_rule_specs(rule: Union[SaveRule, LoadRule]) -> None:
    kind = type(rule).__name__
    if rule.hook is not None and not isinstance(rule.hook, str):
        raise ValueError(f"{kind} hook must be a hook name (str) or None, got {rule.hook!r}.")
    if not isinstance(rule.tag, str):
        raise ValueError(f"{kind} tag must be a str, got {rule.tag!r}.")
    check_spec(rule.layers, "layer")
    check_spec(rule.positions, "position")
    check_spec(rule.heads, "head")


@dataclass(frozen=True)
class StateConfig:
    """What one phase saves, loads and drops.

    Args:
        save: :class:`SaveRule` objects, or hook names as shorthand for ``SaveRule(name)``; ``True``
            saves the context's ``states`` (``SaveRule()``).
        load: :class:`LoadRule` objects, or hook names as shorthand for ``LoadRule(name)``.
        drop: Keys (``"blocks.3.hook_resid_pre"``) or tags (``"clean"``) to forget after the phase.
        interventions: :class:`~minterp_tl.interventions.Intervention` records applied in this run
            (steer, ablate, set, scale, a function), positions per prompt as everywhere.

    Within one hook, loads are applied first, then interventions, then saves, so a save sees what the
    model used.
    """

    save: Union[bool, str, SaveRule, Sequence[Union[str, SaveRule]]] = ()  # a tuple of SaveRule once built
    load: Union[bool, str, LoadRule, Sequence[Union[str, LoadRule]]] = ()  # a tuple of LoadRule once built
    drop: tuple[str, ...] = ()
    interventions: tuple[Intervention, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "save", _rules(self.save, SaveRule, "save"))
        object.__setattr__(self, "load", _rules(self.load, LoadRule, "load"))
        items = (
            (self.interventions,)
            if isinstance(self.interventions, Intervention)
            else tuple(self.interventions)
        )
        if not all(isinstance(i, Intervention) for i in items):
            raise ValueError(
                f"StateConfig interventions must be Intervention records, got {self.interventions!r}."
            )
        object.__setattr__(self, "interventions", items)
        drop = (self.drop,) if isinstance(self.drop, str) else tuple(self.drop)
        if not all(isinstance(d, str) for d in drop):
            raise ValueError(f"StateConfig drop must be keys or tags (strings), got {self.drop!r}.")
        object.__setattr__(self, "drop", drop)


def _rules(items: Any, cls: type, what: str) -> tuple:
    if items is True:
        return (cls(),)
    if items is False or items is None:
        return ()
    if isinstance(items, (str, cls)):
        items = (items,)
    out = []
    for item in items:
        if isinstance(item, str):
            item = cls(item)
        if not isinstance(item, cls):
            raise ValueError(
                f"StateConfig {what} entries must be hook names or {cls.__name__} objects, got {item!r}."
            )
        out.append(item)
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# Saved states and the manager
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SavedState:
    """One saved tensor and what it is a selection of.

    Attributes:
        tensor: The values, in the hook's axis order with the position / head axes cut to the
            selection (see the module docstring).
        name: The canonical hook name, or the key given to :meth:`StateManager.put`.
        tag: The tag it is saved under.
        positions: ``[batch, k]`` absolute positions (in the saved run's padded batch) held for each
            prompt, or ``None`` if every position is held.
        heads: The heads held, or ``None`` if all (or the hook has no head axis).
        pos_axis: The tensor's position axis, or ``None`` if it has none (e.g. a ``put`` vector).
        head_axis: The tensor's head axis, or ``None``.
        str_tokens: The saved run's token strings per prompt (to resolve ``source_positions``), or
            ``None``.
    """

    tensor: Tensor
    name: str
    tag: str = ""
    positions: Optional[Int[Tensor, "batch k"]] = None
    heads: Optional[tuple[int, ...]] = None
    pos_axis: Optional[int] = None
    head_axis: Optional[int] = None
    str_tokens: Optional[tuple[tuple[str, ...], ...]] = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.tag, self.name)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.positions is None else self.positions.numel() * self.positions.element_size()
        return self.tensor.numel() * self.tensor.element_size() + extra


_META_ATTR = "_minterp_selection"


class StateManager:
    """Holds saved states across forward passes, and each phase's :class:`StateConfig`.

    Args:
        configs: ``{phase name: StateConfig}``. :meth:`minterp_tl.wrapper.ModelWrapper.run` with
            ``phase=...`` uses the phase's config.

    Example::

        sm = StateManager({"clean": StateConfig(save="resid_pre"), "corrupt": StateConfig(load="resid_pre")})
        wrapper.run(clean_ctx, sm, phase="clean")
        out = wrapper.run(corrupt_ctx, sm, phase="corrupt")
    """

    def __init__(self, configs: Optional[Mapping[str, StateConfig]] = None) -> None:
        self.configs: dict[str, StateConfig] = {}
        for phase, config in (configs or {}).items():
            self.configure(phase, config)
        self._states: dict[tuple[str, str], SavedState] = {}

    # ---- configs ------------------------------------------------------------------------------
    def configure(self, phase: str, config: StateConfig) -> None:
        """Set the config of ``phase``."""
        if not isinstance(config, StateConfig):
            raise ValueError(f"config for phase {phase!r} must be a StateConfig, got {config!r}.")
        self.configs[phase] = config

    def config(self, phase: str) -> StateConfig:
        """The config of ``phase``; an unknown phase raises ``ValueError`` listing the known ones."""
        if phase not in self.configs:
            raise ValueError(
                f"No StateConfig for phase {phase!r}{did_you_mean(phase, self.configs)}; configured "
                f"phases: {sorted(self.configs)}."
            )
        return self.configs[phase]

    # ---- access -------------------------------------------------------------------------------
    def put(
        self,
        name: str,
        tensor: Tensor,
        *,
        tag: str = "",
        positions: Optional[Int[Tensor, "batch k"]] = None,
        heads: Optional[Sequence[int]] = None,
        pos_axis: Optional[int] = None,
        head_axis: Optional[int] = None,
        str_tokens: Optional[Sequence[Sequence[str]]] = None,
    ) -> None:
        """Store ``tensor`` under ``(tag, name)`` (e.g. a steering vector ``[d_model]`` to load with
        ``LoadRule(..., source=name, mode="add")``); the other arguments describe the selection it
        holds, as in :class:`SavedState`."""
        if not isinstance(name, str) or not isinstance(tensor, Tensor):
            raise ValueError(f"put needs a str name and a tensor, got {name!r} and {type(tensor).__name__}.")
        self.set(
            SavedState(
                tensor=tensor.detach(),
                name=name,
                tag=tag,
                positions=positions,
                heads=None if heads is None else tuple(int(h) for h in heads),
                pos_axis=pos_axis,
                head_axis=head_axis,
                str_tokens=None if str_tokens is None else tuple(tuple(s) for s in str_tokens),
            )
        )

    def set(self, state: SavedState, concat: bool = False) -> None:
        """Store a :class:`SavedState` (with ``concat``, append it along the batch to the one held)."""
        old = self._states.get(state.key)
        if concat and old is not None:
            state = _concat(old, state)
        self._states[state.key] = state

    def entry(self, name: str, *legacy: str, tag: str = "") -> SavedState:
        """The :class:`SavedState` under ``(tag, name)``; a missing key raises ``ValueError`` listing
        the closest keys held. (``tag`` is keyword-only: ``entry(name, tag="clean")``.)"""
        tag = _tag(legacy, tag, "entry")
        key = (tag, name)
        if key not in self._states:
            held, wanted = [format_key(*k) for k in self._states], format_key(tag, name)
            raise ValueError(
                f"No saved state {wanted!r}{did_you_mean(wanted, held, n=5, cutoff=0.5)}. "
                + f"{len(held)} state(s) held"
                + (f" (e.g. {held[:5]})." if held else "; save it in an earlier phase or put() it.")
            )
        return self._states[key]

    def get(self, name: str, *legacy: str, tag: str = "") -> Tensor:
        """The tensor under ``(tag, name)``."""
        return self.entry(name, tag=_tag(legacy, tag, "get")).tensor

    def pop(self, name: str, *legacy: str, tag: str = "") -> Tensor:
        """Remove and return the tensor under ``(tag, name)``."""
        tag = _tag(legacy, tag, "pop")
        tensor = self.entry(name, tag=tag).tensor
        del self._states[(tag, name)]
        return tensor

    def drop(self, key_or_tag: str) -> int:
        """Forget the state with display key ``key_or_tag`` or every state with that tag; returns how
        many were dropped."""
        doomed = [k for k in self._states if format_key(*k) == key_or_tag or k[0] == key_or_tag]
        for k in doomed:
            del self._states[k]
        return len(doomed)

    def clear(self, tag: Optional[str] = None) -> None:
        """Forget every state (or every state with ``tag``)."""
        for k in [k for k in self._states if tag is None or k[0] == tag]:
            del self._states[k]

    def keys(self, tag: Optional[str] = None) -> list[tuple[str, str]]:
        """The ``(tag, name)`` keys held (only ``tag``'s if given), in insertion order."""
        return [k for k in self._states if tag is None or k[0] == tag]

    def names(self, tag: str = "") -> list[str]:
        """The names held under ``tag``."""
        return [n for t, n in self._states if t == tag]

    def __contains__(self, key: Union[str, tuple[str, str]]) -> bool:
        return (key if isinstance(key, tuple) else ("", key)) in self._states

    def __len__(self) -> int:
        return len(self._states)

    def __iter__(self) -> Iterator[SavedState]:
        return iter(list(self._states.values()))

    @property
    def nbytes(self) -> int:
        """Bytes held by the saved tensors (and their position indices)."""
        return sum(s.nbytes for s in self._states.values())

    def __repr__(self) -> str:
        return (
            f"StateManager({len(self)} states, {self.nbytes / 2**20:.2f} MiB, phases={sorted(self.configs)})"
        )

    # ---- TransformerLens interop ---------------------------------------------------------------
    def to_activation_cache(self, model: Any, tag: str = "") -> ActivationCache:
        """The states under ``tag`` as a TransformerLens ``ActivationCache`` (keys: hook names).

        The cache holds the saved tensors themselves (no copy). Selections (positions, heads) are
        recorded on the cache so :meth:`from_activation_cache` restores them; TransformerLens
        functions that expect full activations should be given states saved at every position.
        """
        states = {n: s for (t, n), s in self._states.items() if t == tag}
        cache = ActivationCache({n: s.tensor for n, s in states.items()}, model)
        setattr(cache, _META_ATTR, {n: s for n, s in states.items()})
        return cache

    @classmethod
    def from_activation_cache(
        cls, cache: Union[ActivationCache, Mapping[str, Tensor]], tag: str = ""
    ) -> StateManager:
        """A manager holding every entry of ``cache`` under ``tag`` (see :meth:`update_from_cache`)."""
        manager = cls()
        manager.update_from_cache(cache, tag)
        return manager

    def update_from_cache(self, cache: Union[ActivationCache, Mapping[str, Tensor]], tag: str = "") -> None:
        """Store every entry of an ``ActivationCache`` (or a ``{hook name: tensor}`` dict) under
        ``tag``. Entries of a cache made by :meth:`to_activation_cache` get their selection back;
        others are taken as full activations with the standard axis layout of their hook."""
        meta: Mapping[str, SavedState] = getattr(cache, _META_ATTR, {})
        items = cache.cache_dict.items() if isinstance(cache, ActivationCache) else cache.items()
        for name, tensor in items:
            old = meta.get(name)
            if old is not None and old.tensor is tensor:
                self.set(
                    SavedState(
                        tensor,
                        name,
                        tag,
                        old.positions,
                        old.heads,
                        old.pos_axis,
                        old.head_axis,
                        old.str_tokens,
                    )
                )
            else:
                pos_axis, head_axis = _hooks.hook_layout(name, tensor.ndim)
                self.set(SavedState(tensor.detach(), name, tag, None, None, pos_axis, head_axis))

    # ---- on disk (minterp_tl.store) -------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> SaveReport:
        """Deprecated spelling of :meth:`write` (save / load name what a phase keeps and puts back)."""
        _deprecated.warn("StateManager.save(path)", "StateManager.write(path)")
        return self.write(path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> StateManager:
        """Deprecated spelling of :meth:`read`."""
        _deprecated.warn("StateManager.load(path)", "StateManager.read(path)")
        return cls.read(path)

    def write(self, path: Union[str, os.PathLike]) -> SaveReport:
        """Write every held state to a :class:`minterp_tl.store.StateStore` at ``path`` (a folder, created
        if needed): tensors under their display keys, selections, tags and token strings in the metadata
        (see :func:`minterp_tl._state_files.write_states`). Writing again rewrites only the states that
        changed; a state dropped from the manager is dropped from the store. Phase configs are not written.

        Raises:
            ValueError: If two keys have the same display form (a tag containing ``"/"``), or a tensor
                has a dtype the store cannot hold.
        """
        return _state_files.write_states(list(self._states.values()), path)

    @classmethod
    def read(cls, path: Union[str, os.PathLike]) -> StateManager:
        """A new manager holding the states written at ``path`` by :meth:`write` (every tensor verified
        against its content hash; selections, tags and token strings restored; no phase configs).

        Raises:
            ValueError: If ``path`` holds no store, a store not written by :meth:`write`, or a damaged
                file (the message names the tensor).
        """
        manager = cls()
        for fields in _state_files.read_states(path):
            manager.set(SavedState(**fields))
        return manager


def _tag(legacy: tuple[str, ...], tag: str, method: str) -> str:
    """``tag``, or the deprecated positional tag of ``StateManager.<method>(name, tag)``."""
    if not legacy:
        return tag
    if len(legacy) > 1 or tag:
        raise TypeError(f"StateManager.{method} takes the name and tag= only, got {legacy!r}.")
    _deprecated.warn(f"StateManager.{method}(name, tag)", f"StateManager.{method}(name, tag=tag)")
    return legacy[0]


def _concat(old: SavedState, new: SavedState) -> SavedState:
    key = format_key(*new.key)
    if old.tensor.shape[1:] != new.tensor.shape[1:]:
        raise ValueError(
            f"Cannot concatenate state {key!r} along the batch: held shape {tuple(old.tensor.shape)}, "
            f"new shape {tuple(new.tensor.shape)} (all axes but the batch must agree)."
        )
    if old.heads != new.heads or (old.positions is None) != (new.positions is None):
        raise ValueError(f"Cannot concatenate state {key!r}: the held and new selections differ.")
    positions = None
    if old.positions is not None and new.positions is not None:
        positions = torch.cat([old.positions, new.positions])
    tokens = None
    if old.str_tokens is not None and new.str_tokens is not None:
        tokens = old.str_tokens + new.str_tokens
    return SavedState(
        torch.cat([old.tensor, new.tensor]),
        new.name,
        new.tag,
        positions,
        new.heads,
        new.pos_axis,
        new.head_axis,
        tokens,
    )


__all__ = [
    "Add",
    "Compose",
    "LoadRule",
    "MeanOverBatch",
    "Mode",
    "SaveRule",
    "SavedState",
    "Scale",
    "StateConfig",
    "StateManager",
    "Transform",
    "format_key",
]

__getattr__ = _deprecated.module_getattr(
    "minterp_tl.state",
    {
        "hook_layout": ("minterp_tl.hooks.hook_layout", lambda: _hooks.hook_layout),
        "gather": ("minterp_tl.hooks.gather", lambda: _hooks.gather),
        "scatter": ("minterp_tl.hooks.scatter", lambda: _hooks.scatter),
    },
)
