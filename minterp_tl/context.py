"""RepresentationContext: a frozen description of one phase of an experiment.

An experiment is several forward passes that hand states to each other (run clean and save, run
corrupted and patch, ...). Each pass is described by a :class:`RepresentationContext`: which prompts
to run, and by default which layers, positions and heads to look at and which hooks.
The next phase is ``context.clone(prompts=corrupted)``.

A context holds specs, not indices: ``layers="n//3:"`` means "the last two thirds of the layers of
whatever model runs it". Specs are checked for syntax when the context is built (so a typo fails at
once) and resolved against a model by :class:`minterp_tl.wrapper.ModelWrapper` when the phase runs,
with the errors of :mod:`minterp_tl.specs` and :mod:`minterp_tl.names`.

What is *done* with the states (saved, patched in, dropped) is the business of
:class:`minterp_tl.state.StateConfig`; a context alone, run by ``ModelWrapper.run(context)``, saves
the activations at its ``hooks`` at its ``layers`` / ``positions`` / ``heads``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Optional, Union

import torch
from jaxtyping import Int
from torch import Tensor

from minterp_tl import _deprecated
from minterp_tl.specs import SpecLike, check_spec

Prompts = Union[str, Sequence[str], Int[Tensor, "batch pos"], Sequence[Sequence[int]]]
"""What a context accepts as prompts: one string, a list of strings, a token tensor ``[batch, pos]``
(or ``[pos]``), or a list of token-id lists of different lengths (they are padded on the right)."""


@_deprecated.renamed_field("states", "hooks")
@dataclass(frozen=True, eq=False)
class RepresentationContext:
    """One phase: the prompts and the default layers / positions / heads / hooks to act on.

    Args:
        prompts: The inputs (see :data:`Prompts`). Strings are tokenized by the model (SmolLM2
            prepends its BOS token, which is then position 0). A batch of strings of different lengths
            is padded on the right, and position specs are resolved per prompt (``"last"`` is each
            prompt's own last token).
        layers: Layer spec resolved against ``n_layers`` (``"all"``, ``3``, ``-1``, ``[0, 5]``,
            ``"n//3:2*n//3"``, ``"last_third"``, ...; see :mod:`minterp_tl.specs`).
        positions: Position spec resolved per prompt against its number of tokens; also token
            strings (``" Paris"``) and :class:`minterp_tl.specs.Token`.
        heads: Head spec resolved against the hook's number of heads (``n_heads``, or the number of
            key/value heads for ``hook_k`` / ``hook_v``). Applies only to hooks with a head axis
            (``z``, ``q``, ``k``, ``v``, ``pattern``, ``attn_scores``, ``result``).
        hooks: Hook names, in any form :func:`minterp_tl.names.resolve_name` accepts: per-layer
            names without a layer (``"resid_pre"``, ``"z"``, ``"layers.{l}.mlp"`` style is given as
            ``"mlp_out"``) are taken at every layer of ``layers``; full names (``"hook_embed"``,
            ``"blocks.3.hook_resid_post"``) are taken once. (``states=`` is the deprecated spelling.)
        metadata: Free-form notes carried along (a read-only mapping).
        name: The phase name; :class:`minterp_tl.wrapper.ModelWrapper` uses it to pick the phase's
            :class:`~minterp_tl.state.StateConfig` when no phase is passed.
        prepend_bos: Passed to ``model.to_tokens`` for string prompts (``None``: the model's default).

    Raises:
        ValueError: On prompts of the wrong type, an empty batch, a spec that is not valid syntax, or
            hooks that are not strings.
    """

    prompts: Prompts
    layers: SpecLike = "all"
    positions: SpecLike = "all"
    heads: SpecLike = "all"
    hooks: tuple[str, ...] = ("resid_post",)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""
    prepend_bos: Optional[bool] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", _check_prompts(self.prompts))
        hooks = (self.hooks,) if isinstance(self.hooks, str) else self.hooks
        if not isinstance(hooks, Sequence) or not all(isinstance(h, str) for h in hooks):
            raise ValueError(
                f"RepresentationContext hooks must be hook names (strings), got {self.hooks!r}; "
                "e.g. hooks=('resid_pre', 'attn.hook_z')."
            )
        object.__setattr__(self, "hooks", tuple(hooks))
        check_spec(self.layers, "layer")
        check_spec(self.positions, "position")
        check_spec(self.heads, "head")
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    def clone(self, **overrides: Any) -> RepresentationContext:
        """Return the next phase's context: this one with ``overrides`` replaced.

        ``metadata`` overrides are merged into the current metadata (use ``metadata=None`` to clear
        it). Unknown field names raise ``ValueError`` listing the fields.
        """
        fields = [f.name for f in dataclasses.fields(self)]
        if "states" in overrides:
            _deprecated.warn("RepresentationContext.clone(states=...)", "hooks=...")
            overrides["hooks"] = overrides.pop("states")
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ValueError(
                f"RepresentationContext.clone got unknown field(s) {unknown}; fields are {fields}."
            )
        if "metadata" in overrides:
            extra = overrides["metadata"]
            overrides["metadata"] = {} if extra is None else {**self.metadata, **dict(extra)}
        return dataclasses.replace(self, **overrides)

    @property
    def batch_size(self) -> int:
        """The number of prompts."""
        if isinstance(self.prompts, Tensor):
            return int(self.prompts.shape[0])
        return len(self.prompts)

    def __repr__(self) -> str:
        if isinstance(self.prompts, Tensor):
            prompts = f"<tokens {tuple(self.prompts.shape)}>"
        else:
            shown = ", ".join(
                repr(p) if isinstance(p, str) else f"<{len(p)} tokens>" for p in self.prompts[:3]
            )
            prompts = f"[{shown}{', ...' if len(self.prompts) > 3 else ''}] ({len(self.prompts)})"
        return (
            f"RepresentationContext(name={self.name!r}, prompts={prompts}, layers={self.layers!r}, "
            f"positions={self.positions!r}, heads={self.heads!r}, hooks={self.hooks!r})"
        )


def _check_prompts(prompts: Any) -> Union[tuple[str, ...], Tensor, tuple[tuple[int, ...], ...]]:
    """Normalize prompts to a tuple of strings, a 2-D token tensor, or a tuple of id tuples."""
    if isinstance(prompts, str):
        return (prompts,)
    if isinstance(prompts, Tensor):
        if prompts.is_floating_point() or prompts.ndim not in (1, 2) or prompts.numel() == 0:
            raise ValueError(
                f"RepresentationContext prompts tensor must hold integer token ids with shape "
                f"[batch, pos] or [pos], got dtype {prompts.dtype} and shape {tuple(prompts.shape)}."
            )
        return prompts.unsqueeze(0) if prompts.ndim == 1 else prompts
    if isinstance(prompts, Sequence) and len(prompts) > 0:
        if all(isinstance(p, str) for p in prompts):
            return tuple(prompts)
        if all(isinstance(p, (Sequence, Tensor)) and not isinstance(p, str) and len(p) > 0 for p in prompts):
            ids = tuple(tuple(int(t) for t in p) for p in prompts)
            if all(len(p) == len(ids[0]) for p in ids):
                return torch.tensor(ids, dtype=torch.long)
            return ids
    raise ValueError(
        f"RepresentationContext prompts must be a string, a non-empty list of strings, a token tensor "
        f"[batch, pos], or a non-empty list of non-empty token-id lists; got {type(prompts).__name__} "
        f"{str(prompts)[:80]!r}."
    )


__all__ = ["Prompts", "RepresentationContext"]
