"""Interventions: one record for every change to an activation, and one applier.

An :class:`Intervention` says *where* (a hook, at some layers; positions; heads or neurons) and *what*
(a mode and its value). The same record is used by all three ways to intervene:

- one run: ``StateConfig(interventions=...)`` for :meth:`minterp_tl.wrapper.ModelWrapper.run` (a
  phase's :class:`~minterp_tl.state.LoadRule` becomes records too);
- persistent: :class:`minterp_tl.edits.Edits` installs records on a model for every forward pass;
- sweeps: :func:`minterp_tl.patching.activation_patch` builds one record per patched copy.

Modes (``value`` broadcasts from the right, torch rules):

=============  ==============================================================================
``"set"``      the selected region becomes ``value`` (it must fit the region).
``"add"``      ``alpha * value`` is added to the region (a steering vector).
``"scale"``    the region is multiplied by ``alpha``.
``"zero"``     the region becomes 0 (zero ablation).
``"mean"``     the region becomes the same region of ``value``, a mean activation with batch and
               position axes of size 1 (mean ablation).
``"patch"``    the region becomes the same region of ``value``, a whole activation of another run
               (activation patching: clean into corrupted).
``"function"`` ``fn(activation, hook, **kwargs)`` returns the new activation (``None``: unchanged).
=============  ==============================================================================

A position means the same everywhere: positions are per prompt, so ``-1`` is each prompt's last real
token (right or left padding), ``"last"`` the same, and token-text specs are resolved on each prompt's
tokens where the tokens are known (one run). A ``[batch, k]`` tensor gives absolute positions of the
padded batch as they are. When an activation's position axis does not match the batch (a generation
step with a key/value cache), specs are resolved against the activation's own positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
from jaxtyping import Int
from torch import Tensor

from minterp_tl.hooks import gather, has_heads, hook_layout, n_heads, scatter
from minterp_tl.names import NameSpec, expand_name, resolve_name
from minterp_tl.specs import SpecLike, Token, check_spec, resolve, resolve_positions

Mode = Literal["set", "add", "scale", "zero", "mean", "patch", "function"]
MODES: tuple[str, ...] = ("set", "add", "scale", "zero", "mean", "patch", "function")
_NEEDS_VALUE = ("set", "add", "mean", "patch")

InterventionFunction = Callable[..., Optional[Tensor]]
"""``fn(activation, hook, **kwargs) -> new activation`` (or ``None`` to keep it unchanged)."""


@dataclass(frozen=True, eq=False)
class Intervention:
    """One change to the activation at a hook.

    Args:
        hook: A hook name in any form :func:`minterp_tl.names.resolve_name` accepts, or a list of them;
            a per-layer name (``"z"``, ``"resid_post"``) is taken at each of ``layers``.
        mode: What to do (see the module docstring): ``"set"``, ``"add"``, ``"scale"``, ``"zero"``,
            ``"mean"``, ``"patch"`` or ``"function"``.
        value: The tensor of ``"set"`` / ``"add"`` / ``"mean"`` / ``"patch"``: one for every hook, or
            ``{canonical hook name: tensor}``.
        layers: Layer spec for per-layer hook names (``None``: every layer).
        positions: Position spec, per prompt (``None``: every position), or a ``[batch, k]`` tensor of
            absolute positions. For ``pattern`` / ``attn_scores`` these are query positions.
        heads: Head spec, for hooks with a head axis (``None``: every head).
        neurons: Spec of units of the last axis (``mlp.hook_post`` neurons, residual dimensions);
            not with ``heads``.
        alpha: The factor of ``"add"`` (``alpha * value``) and ``"scale"``.
        fn: The function of ``"function"``.
        kwargs: Keyword arguments for ``fn``.
    """

    hook: Union[NameSpec, list[str]]
    mode: Mode = "set"
    value: Union[None, Tensor, Mapping[str, Tensor]] = field(default=None, repr=False)
    layers: SpecLike = None
    positions: Union[SpecLike, Tensor] = None
    heads: SpecLike = None
    neurons: SpecLike = None
    alpha: float = 1.0
    fn: Optional[InterventionFunction] = field(default=None, repr=False)
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = self.hook if isinstance(self.hook, list) else [self.hook]
        if not names or not all(isinstance(h, (str, tuple)) for h in names):
            raise ValueError(
                f"Intervention hook must be a hook name (str) or a list of them, got {self.hook!r}."
            )
        if self.mode not in MODES:
            raise ValueError(f"Intervention mode must be one of {MODES}, got {self.mode!r}.")
        if (self.value is not None) != (self.mode in _NEEDS_VALUE):
            need = "needs" if self.mode in _NEEDS_VALUE else "takes no"
            raise ValueError(f"Intervention mode {self.mode!r} {need} value=.")
        if self.value is not None and not isinstance(self.value, (Tensor, Mapping)):
            raise ValueError(
                f"Intervention value must be a tensor or {{hook: tensor}}, got {type(self.value).__name__}."
            )
        if (self.fn is not None) != (self.mode == "function") or (
            self.fn is not None and not callable(self.fn)
        ):
            raise ValueError("Intervention fn= (a callable) is for mode 'function', and that mode needs it.")
        if self.mode == "function" and any(s is not None for s in (self.positions, self.heads, self.neurons)):
            raise ValueError(
                "Intervention mode 'function' gets the whole activation: no positions/heads/neurons."
            )
        if not isinstance(self.kwargs, Mapping) or (self.kwargs and self.mode != "function"):
            raise ValueError("Intervention kwargs= (a mapping) is for mode 'function' only.")
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float))
            or not math.isfinite(self.alpha)
        ):
            raise ValueError(f"Intervention alpha must be a finite number, got {self.alpha!r}.")
        if self.heads is not None and self.neurons is not None:
            raise ValueError("Intervention takes heads= or neurons=, not both (neurons index the last axis).")
        check_spec(self.layers, "layer")
        check_spec(self.heads, "head")
        check_spec(self.neurons, "index")
        if isinstance(self.positions, Tensor):
            if self.positions.ndim != 2 or self.positions.dtype.is_floating_point:
                raise ValueError(
                    f"Intervention positions tensor must be [batch, k] integers, got "
                    f"{tuple(self.positions.shape)} {self.positions.dtype}."
                )
        else:
            check_spec(self.positions, "position")


# --------------------------------------------------------------------------------------------------
# Where each prompt's tokens are
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BatchLayout:
    """Where each prompt's real tokens are in a padded ``[batch, padded_length]`` batch.

    Attributes:
        lengths: Each prompt's number of real tokens.
        padded_length: The batch's position count.
        padding_side: ``"right"`` (real tokens first) or ``"left"``.
        str_tokens: Each prompt's real tokens as strings, for token-text position specs (or ``None``).
    """

    lengths: tuple[int, ...]
    padded_length: int
    padding_side: str = "right"
    str_tokens: Optional[tuple[tuple[str, ...], ...]] = None
    _resolved: dict[Any, Optional[Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_tokens(cls, model: Any, tokens: Int[Tensor, "batch pos"]) -> BatchLayout:
        """The prompts of a token batch as TransformerLens sees them: trailing (or, with a tokenizer
        padding on the left, leading) pad tokens are padding; without a tokenizer or pad token every
        position is real."""
        b, n = tokens.shape
        tokenizer = getattr(model, "tokenizer", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            return cls((n,) * b, n)
        side = getattr(tokenizer, "padding_side", "right")
        real = tokens.ne(pad).long()
        run = real.flip(-1).cumsum(-1).flip(-1) if side == "right" else real.cumsum(-1)
        lengths = run.gt(0).sum(-1).clamp(min=1)
        return cls(tuple(int(x) for x in lengths), n, side)

    def positions(self, spec: Union[SpecLike, Tensor], n_pos: int, what: str) -> Optional[Tensor]:
        """``[batch, k]`` positions of ``spec`` (``None``: every position), resolved per prompt when the
        activation has this batch's ``n_pos`` positions, else against ``n_pos`` alone."""
        if isinstance(spec, Tensor):
            return spec
        if spec is None or (isinstance(spec, str) and spec.strip() == "all"):
            return None
        key = (repr(spec), n_pos)
        if key not in self._resolved:
            self._resolved[key] = self._resolve(spec, n_pos, what)
        return self._resolved[key]

    def _resolve(self, spec: SpecLike, n_pos: int, what: str) -> Tensor:
        b = len(self.lengths)
        if n_pos != self.padded_length:
            rows = [resolve(spec, n_pos, what="position")] * b
        elif self.str_tokens is not None:
            rows = resolve_positions(
                spec, self.str_tokens, padding_side=self.padding_side, padded_length=self.padded_length
            )
        else:
            if isinstance(spec, Token):
                raise ValueError(
                    f"{what}: the token position {spec!r} needs the prompts' tokens, which "
                    "this forward pass does not have; give an index (-1), a slice or a list."
                )
            shift = [self.padded_length - n if self.padding_side == "left" else 0 for n in self.lengths]
            rows = [[p + s for p in resolve(spec, n, what="position")] for n, s in zip(self.lengths, shift)]
        if len({len(r) for r in rows}) != 1:
            raise ValueError(
                f"Position spec {spec!r} selects different numbers of positions in different prompts "
                f"({[len(r) for r in rows]}) for {what}; a selection must have the same number of "
                "positions for every prompt (use 'last', an index, or prompts of equal length)."
            )
        return torch.tensor(rows, dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# Resolving records against a model, and applying them
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Step:
    """One intervention at one canonical hook, resolved against a model (built by :func:`resolve_steps`).

    Attributes:
        hook: The canonical hook name.
        intervention: The record.
        heads: The resolved heads, or ``None``.
        value: The tensor this hook uses (``None`` for modes without one).
        what: A description for messages.
    """

    hook: str
    intervention: Intervention
    heads: Optional[tuple[int, ...]]
    value: Optional[Tensor]
    what: str


def resolve_steps(model: Any, intervention: Intervention, what: str = "intervention") -> list[Step]:
    """The :class:`Step` of ``intervention`` at each hook it applies at: hook names, layers and heads are
    resolved and per-hook values looked up here, so bad names and specs fail before any forward pass.

    Raises:
        ValueError: For an unknown hook, a bad or empty layer selection, heads on a hook without a head
            axis (or out of range), a value mapping that does not match the hooks.
    """
    iv = intervention
    try:
        layers = resolve(iv.layers, int(model.cfg.n_layers), what="layer")
        names = iv.hook if isinstance(iv.hook, list) else [iv.hook]
        hooks = list(dict.fromkeys(h for name in names for h in expand_name(model, name, layers)))
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None
    if not hooks:
        raise ValueError(f"{what} applies at no hook (layers={iv.layers!r} selects no layer).")
    values = _per_hook(model, iv.value, hooks, what)
    steps = []
    for hook in hooks:
        heads = None
        if iv.heads is not None and not (isinstance(iv.heads, str) and iv.heads.strip() == "all"):
            if not has_heads(hook):
                raise ValueError(
                    f"{what}: heads={iv.heads!r} was given for {hook}, which has no head axis; heads "
                    "apply to q, k, v, z, result, pattern and attn_scores hooks."
                )
            try:
                heads = tuple(resolve(iv.heads, n_heads(model, hook), what="head"))
            except ValueError as err:
                raise ValueError(f"{what}: {err}") from None
        steps.append(Step(hook, iv, heads, values.get(hook), f"{what} at {hook}"))
    return steps


def _per_hook(model: Any, value: Any, hooks: Sequence[str], what: str) -> dict[str, Tensor]:
    if value is None:
        return {}
    if isinstance(value, Tensor):
        return {hook: value.detach() for hook in hooks}
    out = {}
    for key, v in value.items():
        if not isinstance(v, Tensor):
            raise ValueError(f"{what}: value[{key!r}] must be a tensor, got {type(v).__name__}.")
        out[resolve_name(model, key)] = v.detach()
    missing, extra = [h for h in hooks if h not in out], [h for h in out if h not in hooks]
    if missing or extra:
        raise ValueError(
            f"{what}: the value mapping must have one tensor per hook {list(hooks)}; missing "
            f"{missing}, not edited {extra}."
        )
    return out


_UNITS: dict[tuple[str, int], list[int]] = {}


def _neurons(spec: SpecLike, n: int, what: str) -> list[int]:
    key = (repr(spec), n)
    if key not in _UNITS:
        try:
            units = resolve(spec, n, what="index")
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from None
        if len(_UNITS) > 4096:
            _UNITS.clear()
        _UNITS[key] = units
    return _UNITS[key]


def apply_step(x: Tensor, step: Step, layout: Optional[BatchLayout], hook: Any = None) -> Tensor:
    """The activation ``x`` at ``step.hook`` after ``step`` (a new tensor unless the step changes nothing;
    ``x`` itself is never written). ``layout`` says where each prompt's tokens are (``None``: every
    position of every row is real)."""
    iv = step.intervention
    if iv.mode == "function":
        out = iv.fn(x, hook, **iv.kwargs)  # type: ignore[misc]
        return x if out is None else out
    pos_axis, head_axis = hook_layout(step.hook, x.ndim)
    positions = None
    if iv.positions is not None:
        if pos_axis is None:
            raise ValueError(f"{step.what}: the activation has no position axis to select.")
        n_pos = int(x.shape[pos_axis])
        where = (
            layout
            if layout is not None and len(layout.lengths) == x.shape[0]
            else BatchLayout((n_pos,) * x.shape[0], n_pos)
        )
        positions = where.positions(iv.positions, n_pos, step.what)
        if positions is not None:
            positions = positions.to(x.device)
            if positions.shape[0] == 1 and x.shape[0] != 1:
                positions = positions.expand(x.shape[0], -1)
            if (
                positions.shape[0] != x.shape[0]
                or int(positions.max()) >= n_pos
                or int(positions.min()) < -n_pos
            ):
                raise ValueError(
                    f"{step.what}: positions {positions.tolist()[:4]} do not fit an activation with "
                    f"batch {x.shape[0]} and {n_pos} positions."
                )
            positions = positions % n_pos
    unit_axis: Optional[int] = None
    units: Optional[Sequence[int]] = None
    if step.heads is not None:
        unit_axis, units = head_axis, step.heads
    elif iv.neurons is not None:
        unit_axis = x.ndim - 1
        units = _neurons(iv.neurons, int(x.shape[unit_axis]), step.what)
    if iv.mode == "zero":
        return scatter(x, x.new_zeros(()), pos_axis, unit_axis, positions, units, "set", step.what)
    if iv.mode == "set":
        return scatter(x, step.value, pos_axis, unit_axis, positions, units, "set", step.what)  # type: ignore[arg-type]
    if iv.mode == "add":
        value = iv.alpha * step.value.to(device=x.device, dtype=x.dtype)  # type: ignore[union-attr]
        return scatter(x, value, pos_axis, unit_axis, positions, units, "add", step.what)
    if iv.mode == "scale":
        region = gather(x, pos_axis, unit_axis, positions, units) * iv.alpha
        return scatter(x, region, pos_axis, unit_axis, positions, units, "set", step.what)
    # "mean" / "patch": the same region of a whole activation
    source = step.value.to(device=x.device, dtype=x.dtype)  # type: ignore[union-attr]
    try:
        source = torch.broadcast_to(source, x.shape)
    except RuntimeError:
        raise ValueError(
            f"Cannot load {step.what}: the {iv.mode} value of shape {tuple(source.shape)} does not "
            f"broadcast to the activation {tuple(x.shape)}."
        ) from None
    region = gather(source, pos_axis, unit_axis, positions, units)
    return scatter(x, region, pos_axis, unit_axis, positions, units, "set", step.what)


def hook_functions(
    steps: Sequence[Step], layout: Optional[BatchLayout] = None
) -> list[tuple[str, Callable[[Tensor, Any], Tensor]]]:
    """``[(hook name, hook function)]`` applying ``steps`` in order, one function per hook point, for
    ``model.run_with_hooks(..., fwd_hooks=...)`` or ``model.hooks(...)``."""
    by_hook: dict[str, list[Step]] = {}
    for step in steps:
        by_hook.setdefault(step.hook, []).append(step)

    def make(items: list[Step]) -> Callable[[Tensor, Any], Tensor]:
        def hook_fn(x: Tensor, hook: Any = None) -> Tensor:
            for step in items:
                x = apply_step(x, step, layout, hook)
            return x

        return hook_fn

    return [(name, make(items)) for name, items in by_hook.items()]


__all__ = [
    "MODES",
    "Intervention",
    "InterventionFunction",
    "Mode",
    "BatchLayout",
    "Step",
    "apply_step",
    "hook_functions",
    "resolve_steps",
]
