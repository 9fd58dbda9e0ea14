"""What a circuit masks and how: :class:`CircuitConfig`, its JSON form, and the target grammar.

Targets name the weights to mask with the HookedTransformer parameter names of each block:
``attn.W_Q``, ``attn.W_K``, ``attn.W_V``, ``attn.W_O``, ``mlp.W_in``, ``mlp.W_gate`` (gated MLPs only)
and ``mlp.W_out``, or the groups ``attn``, ``mlp`` and ``all``; at one layer (``"blocks.3.attn.W_Q"``),
at every layer (``"attn.W_Q"``, ``"W_Q"``), or at the layers of a layer spec (``"attn[n//2:]"``,
``("mlp", "last_third")``; see :mod:`minterp_tl.specs`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from minterp_tl._checks import did_you_mean
from minterp_tl.circuits.masks import (
    _OPTIONAL_HPARAMS,
    MASK_METHODS,
    REQUIRED_HPARAMS,
    MaskMethod,
    mask_method,
)
from minterp_tl.specs import SpecLike, check_spec

ABLATIONS: tuple[str, ...] = (
    "none",
    "zero_ablate",
    "random_ablate",
    "randomly_sampled",
    "complement_sampled",
)
MASK_UNITS: tuple[str, ...] = ("weight", "neuron", "head")

# The targetable weights: TL name -> (bridge path under blocks[l], side the units live on).
# "rows": units are output features (rows of the nn.Linear weight); "cols": input features.
_WEIGHTS: dict[str, tuple[str, str]] = {
    "attn.W_Q": ("attn.q", "rows"),
    "attn.W_K": ("attn.k", "rows"),
    "attn.W_V": ("attn.v", "rows"),
    "attn.W_O": ("attn.o", "cols"),
    "mlp.W_in": ("mlp.in", "rows"),
    "mlp.W_gate": ("mlp.gate", "rows"),
    "mlp.W_out": ("mlp.out", "cols"),
}
_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O"),
    "mlp": ("mlp.W_in", "mlp.W_gate", "mlp.W_out"),
    "all": tuple(_WEIGHTS),
}
_TARGET = re.compile(r"(?:blocks\.(-?\d+)\.)?([A-Za-z_.]+?)\s*(?:\[(.*)\])?")
_MAX_TARGET_LENGTH = 300

TargetLike = Union[str, tuple[str, SpecLike]]
"""A target: ``"blocks.3.attn.W_Q"``, ``"attn.W_Q"`` / ``"W_Q"`` (every layer), a group ``"attn"`` /
``"mlp"`` / ``"all"``, any of these with a layer spec in brackets (``"attn[n//2:]"``,
``"mlp.W_in[0, -1]"``), or a tuple ``(name, layer_spec)`` (``("attn", "last_third")``)."""


@dataclass(frozen=True)
class _Target:
    """One parsed target: weight names (``"attn.W_Q"``, ...) at the layers of ``layers``."""

    weights: tuple[str, ...]
    layers: SpecLike
    text: str


@dataclass(frozen=True)
class CircuitConfig:
    """How a :class:`~minterp_tl.circuits.CircuitModel` masks a model.

    Attributes:
        mask_method: ``"continuous_sparsification"``, ``"hard_concrete"`` or ``"magnitude_pruning"``
            (formulas in :mod:`minterp_tl.circuits.masks`).
        mask_hparams: The method's hyperparameters (:data:`REQUIRED_HPARAMS`):

            - ``ablation``: the initial ablation mode (:data:`ABLATIONS`);
            - ``mask_unit``: ``"weight"``, ``"neuron"`` or ``"head"`` (optional for magnitude
              pruning, default ``"weight"``);
            - ``mask_bias``: also mask biases (see :mod:`minterp_tl.circuits.layer`);
            - ``mask_init_value`` (continuous sparsification): the initial mask logit ``s``;
            - ``mask_init_percentage`` (hard concrete): ``p`` in (0, 1), ``s = log(p / (1 - p))``;
            - ``prune_percentage`` (magnitude pruning): fraction of units to prune, in [0, 1].

        target_layers: The weights to mask, each a :data:`TargetLike`; at least one.
        freeze_base: Keep every parameter of the model frozen (``requires_grad=False``) while the
            CircuitModel is attached, so that only mask logits train.
        add_l0: Add ``l0_lambda * L0`` to the loss when ``CircuitModel.forward`` computes one.
        l0_lambda: Weight of the L0 penalty (counted in mask units), >= 0.
    """

    mask_method: str = "continuous_sparsification"
    mask_hparams: Mapping[str, Any] = field(default_factory=dict)
    target_layers: tuple[TargetLike, ...] = ()
    freeze_base: bool = True
    add_l0: bool = True
    l0_lambda: float = 1e-8

    def __post_init__(self) -> None:
        """Validate every field; raise ``ValueError`` naming the field and what would be valid."""
        if self.mask_method not in MASK_METHODS:
            raise ValueError(
                f"CircuitConfig: unknown mask_method {self.mask_method!r}; valid: {', '.join(MASK_METHODS)}"
                + did_you_mean(self.mask_method, MASK_METHODS)
            )
        if not isinstance(self.mask_hparams, Mapping):
            raise ValueError(
                f"CircuitConfig: mask_hparams must be a dict, got {type(self.mask_hparams).__name__}; "
                f"{self.mask_method} needs {', '.join(REQUIRED_HPARAMS[self.mask_method])}"
            )
        hparams = dict(self.mask_hparams)
        _check_hparams(self.mask_method, hparams)
        object.__setattr__(self, "mask_hparams", hparams)
        targets = self.target_layers
        if isinstance(targets, str):
            targets = (targets,)
        if not isinstance(targets, (list, tuple)) or not targets:
            raise ValueError(
                f"CircuitConfig: target_layers must be a non-empty list of targets such as "
                f"['blocks.1.attn.W_O', 'attn[n//2:]', ('mlp', 'last_third')], got {targets!r}"
            )
        object.__setattr__(self, "target_layers", tuple(targets))
        self.targets()  # parse now: bad targets fail at construction
        for name in ("freeze_base", "add_l0"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"CircuitConfig: {name} must be True or False, got {getattr(self, name)!r}")
        lam = self.l0_lambda
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"CircuitConfig: l0_lambda must be a finite number >= 0, got {lam!r}")

    @property
    def method(self) -> MaskMethod:
        """The mask method object (:mod:`minterp_tl.circuits.masks`) with its hyperparameter."""
        return mask_method(self.mask_method, self.mask_hparams)

    @property
    def ablation(self) -> str:
        """The initial ablation mode."""
        return str(self.mask_hparams["ablation"])

    @property
    def mask_unit(self) -> str:
        """``"weight"``, ``"neuron"`` or ``"head"``."""
        return str(self.mask_hparams.get("mask_unit", "weight"))

    @property
    def mask_bias(self) -> bool:
        """Whether biases are masked."""
        return bool(self.mask_hparams["mask_bias"])

    def targets(self) -> tuple[_Target, ...]:
        """The parsed targets (weight names and layer specs), in order."""
        return tuple(_parse_target(t) for t in self.target_layers)

    def to_json(self) -> str:
        """The config as JSON (layer specs must then be ints, strings or lists of them)."""
        payload = {
            "mask_method": self.mask_method,
            "mask_hparams": self.mask_hparams,
            "target_layers": [t if isinstance(t, str) else list(t) for t in self.target_layers],
            "freeze_base": self.freeze_base,
            "add_l0": self.add_l0,
            "l0_lambda": self.l0_lambda,
        }
        try:
            return json.dumps(payload, sort_keys=True)
        except TypeError as err:
            raise ValueError(
                f"CircuitConfig.to_json: the targets {self.target_layers!r} hold a spec JSON cannot "
                f"write (slice or range objects); write them as strings such as 'attn[n//2:]'"
            ) from err

    @classmethod
    def from_json(cls, text: str) -> CircuitConfig:
        """Rebuild a config written by :meth:`to_json`."""
        try:
            payload = json.loads(text)
        except (TypeError, ValueError, RecursionError) as err:
            raise ValueError(f"CircuitConfig.from_json: not JSON ({type(err).__name__})") from None
        if not isinstance(payload, dict):
            raise ValueError(f"CircuitConfig.from_json: expected a JSON object, got {type(payload).__name__}")
        raw = payload.get("target_layers", ())
        if not isinstance(raw, list) or not all(
            isinstance(t, str) or (isinstance(t, list) and len(t) == 2 and isinstance(t[0], str)) for t in raw
        ):
            raise ValueError(
                "CircuitConfig.from_json: 'target_layers' must be a list of names or [group, layers] pairs"
            )
        targets = tuple(t if isinstance(t, str) else (t[0], _json_spec(t[1])) for t in raw)
        allowed = {"mask_method", "mask_hparams", "freeze_base", "add_l0", "l0_lambda"}
        try:
            return cls(target_layers=targets, **{k: v for k, v in payload.items() if k in allowed})
        except (TypeError, KeyError, IndexError) as err:  # the config's own checks raise ValueError
            raise ValueError(
                f"CircuitConfig.from_json: malformed config ({type(err).__name__}: {err})"
            ) from None


def _json_spec(spec: Any) -> SpecLike:
    return tuple(spec) if isinstance(spec, list) else spec


def _check_hparams(method: str, hparams: dict[str, Any]) -> None:
    """Check that ``hparams`` has exactly the keys ``method`` needs, each with a valid value."""
    required = REQUIRED_HPARAMS[method]
    optional = _OPTIONAL_HPARAMS[method]
    allowed = required + optional
    missing = [k for k in required if k not in hparams]
    if missing:
        raise ValueError(
            f"CircuitConfig: mask_hparams for {method!r} is missing {', '.join(map(repr, missing))}; "
            f"{method} requires {', '.join(required)}"
            + (f" (optional: {', '.join(optional)})" if optional else "")
        )
    unknown = [k for k in hparams if k not in allowed]
    if unknown:
        raise ValueError(
            f"CircuitConfig: mask_hparams has {', '.join(map(repr, unknown))}, which {method!r} does not "
            f"use; valid keys: {', '.join(allowed)}" + did_you_mean(unknown[0], allowed)
        )
    if hparams["ablation"] not in ABLATIONS:
        raise ValueError(
            f"CircuitConfig: unknown ablation {hparams['ablation']!r}; valid: {', '.join(ABLATIONS)}"
            + did_you_mean(hparams["ablation"], ABLATIONS)
        )
    unit = hparams.get("mask_unit", "weight")
    if unit not in MASK_UNITS:
        raise ValueError(
            f"CircuitConfig: unknown mask_unit {unit!r}; valid: {', '.join(MASK_UNITS)}"
            + did_you_mean(unit, MASK_UNITS)
        )
    if not isinstance(hparams["mask_bias"], bool):
        raise ValueError(f"CircuitConfig: mask_bias must be True or False, got {hparams['mask_bias']!r}")
    mask_method(method, hparams)  # the method's own hyperparameter


def _parse_target(target: TargetLike) -> _Target:
    """Parse one target into weight names and a layer spec; raise ``ValueError`` if malformed."""
    valid = (
        "a weight ('blocks.1.attn.W_Q', 'attn.W_O', 'W_in'), a group ('attn', 'mlp', 'all'), either "
        "with a layer spec in brackets ('attn[n//2:]'), or a tuple (name, layer_spec)"
    )
    if isinstance(target, tuple):
        if len(target) != 2 or not isinstance(target[0], str):
            raise ValueError(
                f"target {target!r}: a tuple target must be (name, layer_spec); valid targets: {valid}"
            )
        name, spec = target[0].strip(), target[1]
        if "[" in name or name.startswith("blocks."):
            raise ValueError(f"target {target!r}: give the layers once, in the tuple; valid targets: {valid}")
    elif isinstance(target, str):
        if len(target) > _MAX_TARGET_LENGTH:
            raise ValueError(f"target {target[:40]!r}...: longer than {_MAX_TARGET_LENGTH} characters")
        match = _TARGET.fullmatch(target.strip())
        if match is None:
            raise ValueError(
                f"target {target!r} is malformed; valid targets: {valid}. (target_layers is a list of "
                f"targets: a (name, layer_spec) pair goes inside it, [('attn', 'n//2:')])"
            )
        layer, name, bracket = match.groups()
        if layer is not None and bracket is not None:
            raise ValueError(
                f"target {target!r}: give the layer once (blocks.{layer}. or [...]); valid: {valid}"
            )
        spec = int(layer) if layer is not None else (bracket if bracket is not None else "all")
    else:
        raise ValueError(
            f"target {target!r}: must be a str or a (name, layer_spec) tuple; valid targets: {valid}. "
            f"target_layers is a list of targets: write [('attn', 'n//2:')], not ('attn', 'n//2:')"
        )
    weights = _weight_names(name, target, valid)
    check_spec(spec, "layer")
    return _Target(weights=weights, layers=spec, text=str(target))


def _weight_names(name: str, target: Any, valid: str) -> tuple[str, ...]:
    """The weight names a target's name stands for (a group, a full or a bare weight name)."""
    if name in _GROUPS:
        return _GROUPS[name]
    if name in _WEIGHTS:
        return (name,)
    bare = {full.split(".")[1]: full for full in _WEIGHTS}
    if name in bare:
        return (bare[name],)
    choices = list(_GROUPS) + list(_WEIGHTS) + list(bare)
    raise ValueError(f"target {target!r}: unknown weight {name!r}; {valid}" + did_you_mean(name, choices))


__all__ = ["ABLATIONS", "MASK_UNITS", "CircuitConfig", "TargetLike"]
