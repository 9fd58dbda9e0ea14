"""Circuit discovery with learned masks over a TransformerLens model's weights (NeuroSurgeon on TL 4).

Patching says which single component matters; a learned mask finds the smallest set of weights (or
MLP neurons, or attention heads) that still does a task, and lets the researcher check that removing
exactly that set breaks the task while removing a random set of the same size does not.

- :class:`CircuitConfig` -- a frozen description of the masks: the method
  (``"continuous_sparsification"``, ``"hard_concrete"``, ``"magnitude_pruning"``), its
  hyperparameters, the targeted weights (canonical names such as ``"blocks.3.attn.W_Q"``, or groups
  over a layer spec such as ``"attn[n//2:]"``), the mask unit (``"weight"``, ``"neuron"``,
  ``"head"``), whether the base model is frozen, and the L0 penalty.
- :class:`CircuitModel` -- wraps a ``TransformerBridge`` without copying it: each targeted weight's
  ``nn.Linear`` gets a masked ``forward`` (an instance attribute that shadows the class method,
  removed again by :meth:`CircuitModel.detach`), which computes ``F.linear(x, W * m_W, b * m_b)``.
  The parameters of the model are never modified. Ablation modes, ``use_masks``, L0 statistics,
  temperature follow NeuroSurgeon's ``CircuitModel``; masks save to and load from a
  :class:`minterp_tl.store.StateStore` (safetensors, written atomically, verified on load).
- :func:`find_subnetwork` -- the training loop: AdamW on the mask logits only, task loss
  ``+ l0_lambda * L0`` (or ``- task loss`` to find the set whose removal breaks the task), the
  continuous-sparsification temperature raised each epoch, a progress bar, and a history with a PNG plot.

Weights and units. The targetable weights are the HookedTransformer parameter names of each block:
``attn.W_Q``, ``attn.W_K``, ``attn.W_V``, ``attn.W_O``, ``mlp.W_in``, ``mlp.W_gate`` (gated MLPs
only) and ``mlp.W_out``. On the bridge each is one ``nn.Linear`` (``blocks[l].attn.q`` ... ``.o``,
``blocks[l].mlp.in`` / ``.gate`` / ``.out``; the ``original_component`` of a ``LinearBridge``), for
Hugging Face and native models alike, or GPT-2's ``Conv1D``, whose weight is stored transposed
(``[in_features, out_features]``; masks and units are the same, on the transposed view). A mask unit
groups the entries of that weight, seen as ``[out_features, in_features]``:

- ``"weight"``: one mask entry per weight entry (mask shape ``[out_features, in_features]``);
- ``"neuron"``: one entry per hidden unit: rows (output features) of ``W_Q/W_K/W_V/W_in/W_gate``,
  columns (input features) of ``W_O/W_out``; so neuron ``j`` of ``W_in`` and of ``W_out`` is the same
  MLP neuron;
- ``"head"``: one entry per attention head (``d_head`` consecutive rows of ``W_Q/W_K/W_V``, columns of
  ``W_O``; key / value heads for ``W_K/W_V`` of grouped-query models). A head mask on ``W_O`` scales
  that head's columns of ``W_O``, which is exactly scaling ``blocks.{l}.attn.hook_z`` for the head
  (``b_O`` belongs to no head and is never masked by a unit mask).

With ``mask_bias`` the bias is masked too: by its own mask for ``"weight"`` units, by the unit's mask
for row units (``W_Q/W_K/W_V/W_in/W_gate``); the biases of ``W_O/W_out`` belong to no unit and stay.

Formulas (design notes 4.3; ``s`` are the mask logits, ``T`` the temperature):

- continuous sparsification: training mask ``sigmoid(T * s)``, eval mask ``1[s > 0]``, L0 = sum of the
  mask; ``s`` starts at ``mask_init_value``;
- hard concrete: ``s`` starts at ``log(p / (1 - p))`` with ``p = mask_init_percentage``; training
  ``u ~ U(0, 1)``, ``sigma = sigmoid((log u - log(1 - u) + s) / beta)``, ``beta = 2/3``;
  ``m = clamp(sigma * (zeta - gamma) + gamma, 0, 1)``, ``gamma = -0.1``, ``zeta = 1.1``; training
  L0 = ``sum sigmoid(s - beta * log(-gamma / zeta))`` (the expected number of non-zero entries);
  eval mask ``1[clamp(sigmoid(s) * (zeta - gamma) + gamma, 0, 1) > 0.5]`` (= ``1[s > 0]``);
- magnitude pruning: per targeted weight, keep exactly ``round(N * (1 - prune_percentage))`` of its
  ``N`` units, those with the largest ``|W|`` (the L2 norm of the unit's entries for neuron / head
  units); computed once, from the weights at construction; nothing to train.

Ablation modes (:meth:`CircuitModel.set_ablate_mode`), with ``h`` the found binary mask:

- ``"none"``: the mask (soft in training, ``h`` in eval);
- ``"zero_ablate"``: ``1 - mask`` (soft in training, ``1 - h`` in eval): remove the subnetwork;
- ``"random_ablate"``: as ``zero_ablate``, but the removed entries (the subnetwork) get freshly initialised weights
  (``nn.Linear``'s default init, seeded) instead of zeros;
- ``"randomly_sampled"``: a random binary mask with as many ones as ``h`` (per targeted weight);
- ``"complement_sampled"``: a random binary mask with as many ones as ``h``, drawn from the zeros of
  ``h`` (disjoint from the subnetwork).

The two sampled masks KEEP the sampled units (the design notes' convention: "run only a random set of
the same size"). NeuroSurgeon's sampled masks instead REMOVE the sampled set (the control for
``zero_ablate``); ``set_ablate_mode(..., remove=True)`` gives that convention.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from minterp_tl._files import save_png
from minterp_tl.specs import SpecLike, check_spec, resolve

logger = logging.getLogger(__name__)

MASK_METHODS: tuple[str, ...] = ("continuous_sparsification", "hard_concrete", "magnitude_pruning")
ABLATIONS: tuple[str, ...] = ("none", "zero_ablate", "random_ablate", "randomly_sampled", "complement_sampled")
MASK_UNITS: tuple[str, ...] = ("weight", "neuron", "head")

# Hyperparameters each method requires in mask_hparams; magnitude pruning may also take mask_unit.
REQUIRED_HPARAMS: dict[str, tuple[str, ...]] = {
    "continuous_sparsification": ("ablation", "mask_unit", "mask_bias", "mask_init_value"),
    "hard_concrete": ("ablation", "mask_unit", "mask_bias", "mask_init_percentage"),
    "magnitude_pruning": ("ablation", "mask_bias", "prune_percentage"),
}
_OPTIONAL_HPARAMS: dict[str, tuple[str, ...]] = {
    "continuous_sparsification": (),
    "hard_concrete": (),
    "magnitude_pruning": ("mask_unit",),
}

# Hard concrete constants (Louizos et al. 2018).
HC_BETA: float = 2.0 / 3.0
HC_GAMMA: float = -0.1
HC_ZETA: float = 1.1

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


# --------------------------------------------------------------------------------------------
# CircuitConfig
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    """One parsed target: weight names (``"attn.W_Q"``, ...) at the layers of ``layers``."""

    weights: tuple[str, ...]
    layers: SpecLike
    text: str


@dataclass(frozen=True)
class CircuitConfig:
    """How a :class:`CircuitModel` masks a model.

    Attributes:
        mask_method: ``"continuous_sparsification"``, ``"hard_concrete"`` or ``"magnitude_pruning"``.
        mask_hparams: The method's hyperparameters (:data:`REQUIRED_HPARAMS`):

            - ``ablation``: the initial ablation mode (:data:`ABLATIONS`);
            - ``mask_unit``: ``"weight"``, ``"neuron"`` or ``"head"`` (optional for magnitude
              pruning, default ``"weight"``);
            - ``mask_bias``: also mask biases (see the module docstring);
            - ``mask_init_value`` (continuous sparsification): the initial mask logit ``s``;
            - ``mask_init_percentage`` (hard concrete): ``p`` in (0, 1), ``s = log(p / (1 - p))``;
            - ``prune_percentage`` (magnitude pruning): fraction of units to prune, in [0, 1].

        target_layers: The weights to mask, each a :data:`TargetLike`; at least one.
        freeze_base: Keep every parameter of the model frozen (``requires_grad=False``) while the
            :class:`CircuitModel` is attached, so that only mask logits train.
        add_l0: Add ``l0_lambda * L0`` to the loss when :meth:`CircuitModel.forward` computes one.
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
                + _closest(self.mask_method, MASK_METHODS)
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
            raise ValueError("CircuitConfig.from_json: 'target_layers' must be a list of names or [group, layers] pairs")
        targets = tuple(t if isinstance(t, str) else (t[0], _json_spec(t[1])) for t in raw)
        allowed = {"mask_method", "mask_hparams", "freeze_base", "add_l0", "l0_lambda"}
        try:
            return cls(target_layers=targets, **{k: v for k, v in payload.items() if k in allowed})
        except (TypeError, KeyError, IndexError) as err:  # the config's own checks raise ValueError
            raise ValueError(f"CircuitConfig.from_json: malformed config ({type(err).__name__}: {err})") from None


def _json_spec(spec: Any) -> SpecLike:
    return tuple(spec) if isinstance(spec, list) else spec


def _closest(value: Any, valid: Sequence[str]) -> str:
    if not isinstance(value, str):
        return ""
    near = difflib.get_close_matches(value, valid, n=3)
    return f" (did you mean {', '.join(map(repr, near))}?)" if near else ""


def _check_hparams(method: str, hparams: dict[str, Any]) -> None:
    """Check that ``hparams`` has exactly the keys ``method`` needs, each with a valid value."""
    required = REQUIRED_HPARAMS[method]
    allowed = required + _OPTIONAL_HPARAMS[method]
    missing = [k for k in required if k not in hparams]
    if missing:
        raise ValueError(
            f"CircuitConfig: mask_hparams for {method!r} is missing {', '.join(map(repr, missing))}; "
            f"{method} requires {', '.join(required)}"
            + (f" (optional: {', '.join(_OPTIONAL_HPARAMS[method])})" if _OPTIONAL_HPARAMS[method] else "")
        )
    unknown = [k for k in hparams if k not in allowed]
    if unknown:
        raise ValueError(
            f"CircuitConfig: mask_hparams has {', '.join(map(repr, unknown))}, which {method!r} does not "
            f"use; valid keys: {', '.join(allowed)}" + _closest(unknown[0], allowed)
        )
    if hparams["ablation"] not in ABLATIONS:
        raise ValueError(
            f"CircuitConfig: unknown ablation {hparams['ablation']!r}; valid: {', '.join(ABLATIONS)}"
            + _closest(hparams["ablation"], ABLATIONS)
        )
    unit = hparams.get("mask_unit", "weight")
    if unit not in MASK_UNITS:
        raise ValueError(
            f"CircuitConfig: unknown mask_unit {unit!r}; valid: {', '.join(MASK_UNITS)}" + _closest(unit, MASK_UNITS)
        )
    if not isinstance(hparams["mask_bias"], bool):
        raise ValueError(f"CircuitConfig: mask_bias must be True or False, got {hparams['mask_bias']!r}")
    if method == "continuous_sparsification":
        value = hparams["mask_init_value"]
        if not _is_real(value) or not math.isfinite(value):
            raise ValueError(f"CircuitConfig: mask_init_value must be a finite number (a mask logit), got {value!r}")
    elif method == "hard_concrete":
        p = hparams["mask_init_percentage"]
        if not _is_real(p) or not 0.0 < p < 1.0:
            raise ValueError(
                f"CircuitConfig: mask_init_percentage must be a number strictly between 0 and 1, got {p!r}"
            )
    else:
        p = hparams["prune_percentage"]
        if not _is_real(p) or not 0.0 <= p <= 1.0:
            raise ValueError(f"CircuitConfig: prune_percentage must be a number in [0, 1], got {p!r}")


def _is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _parse_target(target: TargetLike) -> _Target:
    """Parse one target into weight names and a layer spec; raise ``ValueError`` if malformed."""
    valid = (
        "a weight ('blocks.1.attn.W_Q', 'attn.W_O', 'W_in'), a group ('attn', 'mlp', 'all'), either "
        "with a layer spec in brackets ('attn[n//2:]'), or a tuple (name, layer_spec)"
    )
    if isinstance(target, tuple):
        if len(target) != 2 or not isinstance(target[0], str):
            raise ValueError(f"target {target!r}: a tuple target must be (name, layer_spec); valid targets: {valid}")
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
            raise ValueError(f"target {target!r}: give the layer once (blocks.{layer}. or [...]); valid: {valid}")
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
    if name in _GROUPS:
        return _GROUPS[name]
    if name in _WEIGHTS:
        return (name,)
    bare = {full.split(".")[1]: full for full in _WEIGHTS}
    if name in bare:
        return (bare[name],)
    choices = list(_GROUPS) + list(_WEIGHTS) + list(bare)
    raise ValueError(f"target {target!r}: unknown weight {name!r}; {valid}" + _closest(name, choices))


# --------------------------------------------------------------------------------------------
# Mask layers: one per masked nn.Linear
# --------------------------------------------------------------------------------------------


class _MaskLayer(nn.Module):
    """The mask of one targeted ``nn.Linear`` (its logits or pruning mask, and the ablation state).

    The linear module is held by reference (not registered as a submodule), so the mask layer's
    parameters are only its mask logits.

    Args:
        name: Canonical weight name, ``"blocks.{l}.attn.W_Q"``.
        linear: The ``nn.Linear`` whose forward is masked.
        side: ``"rows"`` (units are output features) or ``"cols"`` (input features).
        group: Number of consecutive features per unit (1 for neurons, ``d_head`` for heads; 0 for
            ``"weight"`` units).
        config: The circuit config.
    """

    def __init__(self, name: str, linear: nn.Linear, side: str, group: int, config: CircuitConfig) -> None:
        super().__init__()
        self.name = name
        object.__setattr__(self, "linear", linear)
        self.transposed = _is_conv1d(linear)  # GPT-2's Conv1D keeps its weight as [in, out]
        self.method = config.mask_method
        self.unit = config.mask_unit
        self.side = side
        self.group = group
        self.ablation = config.ablation
        self.use_mask = True
        self.calls = 0
        self.remove_sampled = False
        self.temperature = 1.0
        weight = self.weight()
        out_f, in_f = weight.shape
        if self.unit == "weight":
            shape: tuple[int, ...] = (out_f, in_f)
        else:
            features = out_f if side == "rows" else in_f
            shape = (features // group,)
        # A separate bias mask only for weight units; row units share their mask with the bias.
        self.has_bias_mask = config.mask_bias and linear.bias is not None and self.unit == "weight"
        self.mask_bias_by_unit = config.mask_bias and linear.bias is not None and self.unit != "weight" and side == "rows"
        hp = config.mask_hparams
        kw = dict(device=weight.device, dtype=torch.float32)
        if self.method == "magnitude_pruning":
            self.register_buffer("weight_pruned", self._magnitude_mask(weight, float(hp["prune_percentage"])))
            if self.has_bias_mask:
                self.register_buffer(
                    "bias_pruned", _top_fraction(linear.bias.detach().abs().float(), 1 - float(hp["prune_percentage"]))
                )
        else:
            if self.method == "continuous_sparsification":
                init = float(hp["mask_init_value"])
            else:
                p = float(hp["mask_init_percentage"])
                init = math.log(p / (1 - p))
            self.weight_logits = nn.Parameter(torch.full(shape, init, **kw))
            if self.has_bias_mask:
                self.bias_logits = nn.Parameter(torch.full(linear.bias.shape, init, **kw))
        self._sampled: dict[str, Tensor] = {}
        self._random: dict[str, Tensor] = {}

    # -- shapes ---------------------------------------------------------------------------

    def weight(self) -> Float[Tensor, "d_out d_in"]:
        """The masked module's weight as ``[out_features, in_features]`` (a view; Conv1D's transposed)."""
        return self.linear.weight.t() if self.transposed else self.linear.weight

    def _magnitude_mask(self, weight: Tensor, prune: float) -> Tensor:
        w = weight.detach().float()
        if self.unit == "weight":
            scores = w.abs()
        else:
            per_feature = w.pow(2).sum(dim=1 if self.side == "rows" else 0)  # [features]
            scores = per_feature.view(-1, self.group).sum(-1).sqrt()
        return _top_fraction(scores, 1.0 - prune)

    def _expand(self, mask: Tensor) -> Tensor:
        """A unit-shaped mask, broadcastable to the ``[out, in]`` weight."""
        if self.unit == "weight":
            return mask
        full = mask.repeat_interleave(self.group)
        return full[:, None] if self.side == "rows" else full[None, :]

    @property
    def n_units(self) -> int:
        """Mask entries (weight and bias masks together): ``max_l0`` of this layer."""
        n = self._raw("weight").numel()
        if self.has_bias_mask:
            n += self._raw("bias").numel()
        return int(n)

    def _raw(self, which: str) -> Tensor:
        if self.method == "magnitude_pruning":
            return getattr(self, f"{which}_pruned")
        return getattr(self, f"{which}_logits")

    # -- masks ----------------------------------------------------------------------------

    def hard(self, which: str = "weight") -> Tensor:
        """The found binary mask (float 0/1), independent of the ablation mode and training."""
        raw = self._raw(which)
        if self.method == "magnitude_pruning":
            return raw.float()
        return (raw.detach() > 0).float()

    def soft(self, which: str = "weight") -> Tensor:
        """The training mask (differentiable): ``sigmoid(T s)`` or a hard-concrete sample."""
        raw = self._raw(which)
        if self.method == "continuous_sparsification":
            return torch.sigmoid(self.temperature * raw)
        if self.method == "hard_concrete":
            u = torch.rand(raw.shape, device=raw.device).clamp(1e-6, 1 - 1e-6)
            sigma = torch.sigmoid((torch.log(u) - torch.log(1 - u) + raw) / HC_BETA)
            return (sigma * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0.0, 1.0)
        return raw.float()

    def mask(self, which: str = "weight") -> Tensor:
        """The mask the forward pass uses now (mode, training, ablation), unit-shaped."""
        if self.ablation in ("randomly_sampled", "complement_sampled"):
            sampled = self._sampled.get(f"{self.ablation}.{which}")
            if sampled is None:
                raise ValueError(
                    f"{self.name}: no {self.ablation} mask was sampled; call set_ablate_mode({self.ablation!r})"
                )
            return 1.0 - sampled if self.remove_sampled else sampled
        base = self.soft(which) if self.training else self.hard(which)
        return base if self.ablation == "none" else 1.0 - base

    def l0(self) -> Tensor:
        """L0 of the found mask: expected / soft in training, the number of ones in eval."""
        total = torch.zeros((), device=self._raw("weight").device)
        for which in ("weight", "bias") if self.has_bias_mask else ("weight",):
            raw = self._raw(which)
            if not self.training or self.method == "magnitude_pruning":
                total = total + self.hard(which).sum()
            elif self.method == "continuous_sparsification":
                total = total + torch.sigmoid(self.temperature * raw).sum()
            else:
                total = total + torch.sigmoid(raw - HC_BETA * math.log(-HC_GAMMA / HC_ZETA)).sum()
        return total

    # -- sampling and re-initialisation -------------------------------------------------

    def sample(self, ablation: str, generator: torch.Generator) -> None:
        """Draw the ``randomly_sampled`` / ``complement_sampled`` mask with as many ones as ``hard``."""
        for which in ("weight", "bias") if self.has_bias_mask else ("weight",):
            hard = self.hard(which).flatten().cpu()
            k = int(hard.sum())
            pool = torch.arange(hard.numel()) if ablation == "randomly_sampled" else (hard == 0).nonzero()[:, 0]
            if k > pool.numel():
                raise ValueError(
                    f"set_ablate_mode('complement_sampled'): {self.name} keeps {k} of {hard.numel()} units, more "
                    f"than its complement ({pool.numel()}), so no disjoint mask of the same size exists; use "
                    f"'randomly_sampled' or a sparser mask"
                )
            chosen = pool[torch.randperm(pool.numel(), generator=generator)[:k]]
            out = torch.zeros(hard.numel())
            out[chosen] = 1.0
            self._sampled[f"{ablation}.{which}"] = out.view(self._raw(which).shape).to(self._raw(which).device)

    def has_sample(self, ablation: str) -> bool:
        key = f"{ablation}.weight"
        if key not in self._sampled:
            return False
        return int(self._sampled[key].sum()) == int(self.hard("weight").sum())

    def reinitialise(self, generator: torch.Generator) -> None:
        """Fresh ``nn.Linear``-style weights (uniform in ``+-1/sqrt(fan_in)``) for ``random_ablate``."""
        weight = self.weight()
        bound = 1.0 / math.sqrt(weight.shape[1])
        self._random["weight"] = _uniform(weight.shape, bound, generator).to(weight.device, weight.dtype)
        if self.linear.bias is not None:
            self._random["bias"] = _uniform(self.linear.bias.shape, bound, generator).to(weight.device, weight.dtype)

    # -- forward --------------------------------------------------------------------------

    def masked_parameters(self) -> tuple[Tensor, Optional[Tensor]]:
        """The weight and bias the masked ``nn.Linear`` uses now."""
        weight, bias = self.weight(), self.linear.bias
        m = self._expand(self.mask("weight")).to(weight.dtype)
        if self.has_bias_mask:
            mb: Optional[Tensor] = self.mask("bias").to(weight.dtype)
        elif self.mask_bias_by_unit:
            mb = m[:, 0]
        else:
            mb = None
        if self.ablation == "random_ablate":
            if "weight" not in self._random:
                raise ValueError(f"{self.name}: no random weights; call set_ablate_mode('random_ablate')")
            new_w = weight * m + self._random["weight"] * (1 - m)
            new_b = bias if mb is None else bias * mb + self._random["bias"] * (1 - mb)
            return new_w, new_b
        return weight * m, (bias if mb is None else bias * mb)

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        """The masked forward (installed as the module's ``forward``): ``F.linear`` with the masked
        ``[out, in]`` weight, the same product an ``nn.Linear`` or a ``Conv1D`` computes."""
        self.calls += 1
        if not self.use_mask:
            return type(self.linear).forward(self.linear, x)  # the module's own class forward
        weight, bias = self.masked_parameters()
        return F.linear(x, weight, bias)


def _top_fraction(scores: Tensor, keep_fraction: float) -> Tensor:
    """Binary mask (float) keeping exactly ``round(N * keep_fraction)`` entries with the largest scores."""
    n = scores.numel()
    k = int(round(n * keep_fraction))
    out = torch.zeros(n, device=scores.device)
    if k > 0:
        out[scores.flatten().topk(k).indices] = 1.0
    return out.view(scores.shape)


def _uniform(shape: torch.Size, bound: float, generator: torch.Generator) -> Tensor:
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


# --------------------------------------------------------------------------------------------
# CircuitModel
# --------------------------------------------------------------------------------------------


def _all_modules(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model``, including the wrapped HF model a TransformerBridge keeps outside its
    registered children (``original_model``), whose train / eval mode ``model.train()`` also sets."""
    modules = {id(m): m for m in model.modules()}
    inner = getattr(model, "original_model", None)
    if isinstance(inner, nn.Module):
        modules.update({id(m): m for m in inner.modules()})
    return list(modules.values())


class CircuitModel(nn.Module):
    """A ``TransformerBridge`` with learned (or magnitude) masks on some of its weights.

    The model is not copied: each targeted ``nn.Linear`` gets an instance ``forward`` that applies
    its mask, until :meth:`detach` (also on ``with CircuitModel(...) as circuit:`` exit) restores the
    module and the parameters' ``requires_grad``. Only one CircuitModel can be attached to a module at
    a time.

    Args:
        config: What to mask and how (:class:`CircuitConfig`).
        model: The model; its parameters are never modified. With ``config.freeze_base`` every
            parameter is set to ``requires_grad=False`` while attached.

    Attributes:
        model: The wrapped model.
        mask_layers: ``nn.ModuleDict`` of the mask layers, keyed by canonical weight name with dots
            replaced by ``"/"`` (``"blocks/1/attn/W_O"``); use :attr:`names` for the names.
        names: The canonical names of the masked weights (``"blocks.1.attn.W_O"``), in layer order.
    """

    def __init__(self, config: CircuitConfig, model: TransformerBridge) -> None:
        super().__init__()
        if not isinstance(config, CircuitConfig):
            raise ValueError(f"CircuitModel: config must be a CircuitConfig, got {type(config).__name__}")
        if not isinstance(model, TransformerBridge):
            raise ValueError(
                f"CircuitModel: model must be a transformer_lens TransformerBridge, got {type(model).__name__}"
            )
        self.config = config
        self.model = model
        self.names: list[str] = []
        self.mask_layers = nn.ModuleDict()
        self._generator = torch.Generator().manual_seed(0)
        self._attached = False
        layers = self._resolve_targets(config, model)
        for name, (linear, side, group) in layers.items():
            if getattr(linear, "_minterp_circuit_mask", None) is not None:
                raise ValueError(
                    f"CircuitModel: {name} is already masked by another CircuitModel; call its detach() first"
                )
            self.names.append(name)
            self.mask_layers[_key(name)] = _MaskLayer(name, linear, side, group, config)
        self._requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        self._training = [(m, m.training) for m in _all_modules(model)]  # restored by detach()
        self._attach()
        self.set_ablate_mode(config.ablation)
        self.train(model.training)

    # -- construction -------------------------------------------------------------------

    @staticmethod
    def _resolve_targets(config: CircuitConfig, model: TransformerBridge) -> dict[str, tuple[nn.Linear, str, int]]:
        n_layers = int(model.cfg.n_layers)
        unit = config.mask_unit
        found: dict[str, tuple[nn.Linear, str, int]] = {}
        for target in config.targets():
            layers = resolve(target.layers, n_layers, what="layer")
            explicit = len(target.weights) == 1
            for layer in sorted(layers):
                block = model.blocks[layer]
                for weight in target.weights:
                    path, side = _WEIGHTS[weight]
                    linear = _linear(block, path)
                    if linear is None:
                        if explicit:
                            have = [w for w, (p, _) in _WEIGHTS.items() if _linear(block, p) is not None]
                            raise ValueError(
                                f"target {target.text!r}: blocks.{layer} has no {weight} (this model's block "
                                f"weights: {', '.join(have) or 'none'})"
                            )
                        continue  # a group skips what the architecture lacks (W_gate, MLPs of attn-only)
                    found[f"blocks.{layer}.{weight}"] = (linear, side, _group(model, weight, unit, target.text))
        if not found:
            raise ValueError(
                f"CircuitModel: the targets {list(config.target_layers)!r} select no weight on this model "
                f"(n_layers={n_layers}, attn_only={bool(getattr(model.cfg, 'attn_only', False))})"
            )
        order = {w: i for i, w in enumerate(_WEIGHTS)}
        return dict(sorted(found.items(), key=lambda kv: (int(kv[0].split(".")[1]), order[kv[0].split(".", 2)[2]])))

    def _attach(self) -> None:
        for layer in self._layers():
            linear = layer.linear
            object.__setattr__(linear, "_minterp_circuit_mask", layer)
            linear.forward = types.MethodType(_masked_forward, linear)
        self._attached = True

    def detach(self) -> TransformerBridge:
        """Remove the masks from the model and restore ``requires_grad`` and the train / eval mode of
        every module as they were when the masks were attached; return the model.

        The CircuitModel is unusable afterwards (its masks stay readable, e.g. for saving).
        """
        if self._attached:
            for layer in self._layers():
                linear = layer.linear
                if getattr(linear, "_minterp_circuit_mask", None) is layer:
                    del linear.forward
                    object.__setattr__(linear, "_minterp_circuit_mask", None)
            for p in self.model.parameters():
                p.requires_grad_(self._requires_grad.get(id(p), p.requires_grad))
            for module, training in self._training:
                module.training = training
            self._attached = False
        return self.model

    def __enter__(self) -> CircuitModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def _layers(self) -> list[_MaskLayer]:
        return [self.mask_layers[_key(name)] for name in self.names]

    def _check_attached(self) -> None:
        if not self._attached:
            raise ValueError("CircuitModel: the masks were detached from the model; build a new CircuitModel")

    # -- nn.Module ------------------------------------------------------------------------

    def train(self, mode: bool = True) -> CircuitModel:
        """Set train / eval mode on the model and the masks (soft masks in training, hard in eval).

        With ``config.freeze_base``, every parameter of the model stays ``requires_grad=False``
        whatever the mode; only the mask logits train.
        """
        if not isinstance(mode, bool):
            raise ValueError(f"CircuitModel.train: mode must be True or False, got {mode!r}")
        super().train(mode)
        if self.config.freeze_base and self._attached:
            for p in self.model.parameters():
                p.requires_grad_(False)
        return self

    def mask_parameters(self) -> list[nn.Parameter]:
        """The trainable mask logits (empty for magnitude pruning)."""
        return [p for layer in self._layers() for p in layer.parameters(recurse=False)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the masked model: ``circuit(tokens, return_type=...)`` takes the model's arguments.

        Returns the model's output. When the model computes a loss (``return_type="loss"`` or
        ``"both"``) and ``config.add_l0``, ``l0_lambda * L0`` (L0 of the current mode, see
        :meth:`l0`) is added to that loss.

        Raises:
            RuntimeError: A full forward pass never called a masked weight's ``nn.Linear`` (a bridge
                that computes with processed copies of the weights): the masks would do nothing.
        """
        self._check_attached()
        before = [layer.calls for layer in self._layers()]
        out = self.model(*args, **kwargs)
        if kwargs.get("start_at_layer") is None and kwargs.get("stop_at_layer") is None:
            idle = [l.name for l, n in zip(self._layers(), before) if l.use_mask and l.calls == n]
            if idle:
                raise RuntimeError(
                    f"CircuitModel: the forward pass never called the nn.Linear of {', '.join(idle[:4])}, so "
                    f"its mask had no effect; this bridge computes with other copies of these weights"
                )
        return_type = kwargs.get("return_type", args[1] if len(args) > 1 else "logits")
        if not self.config.add_l0 or return_type not in ("loss", "both"):
            return out
        penalty = self.config.l0_lambda * self.l0()
        if return_type == "loss":
            return out + penalty
        logits, loss = out
        return logits, loss + penalty

    def l0(self) -> Float[Tensor, ""]:
        """Total L0 of the found masks in the current mode (differentiable in training)."""
        layers = self._layers()
        total = layers[0].l0()
        for layer in layers[1:]:
            total = total + layer.l0().to(total.device)
        return total

    # -- NeuroSurgeon API -----------------------------------------------------------------

    @property
    def temperature(self) -> float:
        """Temperature ``T`` of continuous-sparsification masks (training mask ``sigmoid(T s)``)."""
        self._require_cs("temperature")
        return float(self._layers()[0].temperature)

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._require_cs("temperature")
        if not _is_real(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"CircuitModel.temperature must be a finite number > 0, got {value!r}")
        for layer in self._layers():
            layer.temperature = float(value)

    def _require_cs(self, what: str) -> None:
        if self.config.mask_method != "continuous_sparsification":
            raise ValueError(
                f"CircuitModel.{what} applies to continuous_sparsification masks only; this model uses "
                f"{self.config.mask_method}"
            )

    def set_ablate_mode(
        self,
        ablation: str,
        force_resample: bool = False,
        *,
        seed: Optional[int] = None,
        remove: bool = False,
    ) -> None:
        """Change how masks are produced from the mask parameters (every mask layer).

        Args:
            ablation: ``"none"``, ``"zero_ablate"``, ``"random_ablate"``, ``"randomly_sampled"`` or
                ``"complement_sampled"`` (see the module docstring).
            force_resample: Draw new random masks (sampled modes) or new random weights
                (``random_ablate``) even when some exist. Otherwise a sample is reused while the
                found mask keeps its size.
            seed: Reseed the CircuitModel's generator first (samples are then reproducible).
            remove: For the sampled modes: remove the sampled units instead of keeping them
                (NeuroSurgeon's convention).
        """
        if ablation not in ABLATIONS:
            raise ValueError(f"set_ablate_mode: unknown ablation {ablation!r}; valid: {', '.join(ABLATIONS)}" + _closest(ablation, ABLATIONS))
        if seed is not None:
            self._generator.manual_seed(int(seed))
        for layer in self._layers():
            if ablation in ("randomly_sampled", "complement_sampled") and (force_resample or not layer.has_sample(ablation)):
                layer.sample(ablation, self._generator)
            if ablation == "random_ablate" and (force_resample or "weight" not in layer._random):
                layer.reinitialise(self._generator)
        for layer in self._layers():
            layer.ablation = ablation
            layer.remove_sampled = bool(remove)

    @property
    def ablation(self) -> str:
        """The current ablation mode."""
        return self._layers()[0].ablation

    def use_masks(self, value: bool, name_list: Optional[Iterable[str]] = None) -> None:
        """Turn masking on or off, for every masked weight or only those in ``name_list``.

        With masks off a weight's ``nn.Linear`` runs its own forward, so ``use_masks(False)`` gives
        exactly (``torch.equal``) the model's own output.

        Args:
            value: Whether to apply the masks.
            name_list: Canonical names (``"blocks.1.attn.W_O"``, as in :attr:`names`); ``None``: all.
        """
        if not isinstance(value, bool):
            raise ValueError(f"use_masks: value must be True or False, got {value!r}")
        names = self.names if name_list is None else list(name_list)
        for name in names:
            if name not in self.names:
                raise ValueError(
                    f"use_masks: {name!r} is not a masked weight; masked: {', '.join(self.names)}"
                    + _closest(name, self.names)
                )
            self.mask_layers[_key(name)].use_mask = value

    def compute_l0_statistics(self) -> dict[str, Any]:
        """L0 statistics of the found masks in the current mode.

        Returns:
            ``{"total_l0": float, "max_l0": int, "layer2l0": {name: float}, "layer2maxl0": {name: int}}``:
            the summed L0 (soft / expected in training, the number of kept units in eval), the number of
            mask entries, and both per masked weight.
        """
        with torch.no_grad():
            layer2l0 = {layer.name: float(layer.l0()) for layer in self._layers()}
        layer2max = {layer.name: layer.n_units for layer in self._layers()}
        return {
            "total_l0": float(sum(layer2l0.values())),
            "max_l0": int(sum(layer2max.values())),
            "layer2l0": layer2l0,
            "layer2maxl0": layer2max,
        }

    # -- inspection -----------------------------------------------------------------------

    def hard_masks(self) -> dict[str, Tensor]:
        """The found binary masks, ``{name: bool tensor}`` (unit-shaped: ``[n_heads]`` for heads,
        ``[n_units]`` for neurons, ``[out_features, in_features]`` for weights); bias masks as
        ``"{name}.bias"``."""
        out: dict[str, Tensor] = {}
        for layer in self._layers():
            out[layer.name] = layer.hard("weight").bool()
            if layer.has_bias_mask:
                out[f"{layer.name}.bias"] = layer.hard("bias").bool()
        return out

    def current_masks(self) -> dict[str, Tensor]:
        """The masks the forward pass uses now (mode, ablation), detached, unit-shaped."""
        with torch.no_grad():
            return {layer.name: layer.mask("weight").detach().clone() for layer in self._layers()}

    def kept_heads(self) -> list[tuple[int, int]]:
        """``(layer, head)`` of the heads the found masks keep, for head masks on ``attn.W_O``.

        A head is kept when its ``W_O`` mask is 1 (its output reaches the residual stream).
        """
        if self.config.mask_unit != "head":
            raise ValueError(f"kept_heads needs mask_unit 'head', this circuit uses {self.config.mask_unit!r}")
        if not any(name.endswith("attn.W_O") for name in self.names):
            raise ValueError(f"kept_heads needs attn.W_O among the masked weights; masked: {', '.join(self.names)}")
        heads = []
        for layer in self._layers():
            if layer.name.endswith("attn.W_O"):
                l = int(layer.name.split(".")[1])
                heads += [(l, int(h)) for h in layer.hard().nonzero()[:, 0]]
        return heads

    # -- save / load ----------------------------------------------------------------------

    def mask_state(self) -> dict[str, Tensor]:
        """The mask parameters (logits, or pruning masks), ``{"{name}.weight_logits": tensor, ...}``."""
        out: dict[str, Tensor] = {}
        for layer in self._layers():
            for key, tensor in list(layer.named_parameters(recurse=False)) + list(layer.named_buffers(recurse=False)):
                out[f"{layer.name}.{key}"] = tensor.detach().cpu().contiguous().clone()
        return out

    def save_masks(self, root: Union[str, os.PathLike[str]]) -> Any:
        """Save the mask parameters and the config to a :class:`minterp_tl.store.StateStore` directory.

        The store writes each tensor as safetensors (temporary file, then rename) and rewrites only
        the tensors that changed since the last save to the same directory.

        Args:
            root: The store's directory (created if missing).

        Returns:
            The store's ``SaveReport`` (what was written, kept, removed). The store's metadata holds
            the config (``"config"``, JSON), the model's name and, for continuous sparsification, the
            temperature.
        """
        from minterp_tl.store import StateStore

        meta = {
            "config": self.config.to_json(),
            "model": str(getattr(self.model, "_minterp_name", None) or self.model.cfg.model_name),
            "format": "minterp_tl.circuits/1",
        }
        if self.config.mask_method == "continuous_sparsification":
            meta["temperature"] = repr(self.temperature)
        return StateStore(root).save(self.mask_state(), meta)

    @staticmethod
    def _read_store(root: Union[str, os.PathLike[str]], caller: str) -> tuple[dict[str, Tensor], dict[str, str]]:
        from minterp_tl.store import StateStore

        store = StateStore(root)
        if not store.exists():
            raise ValueError(f"{caller}: no saved masks at {str(root)!r} (write them with save_masks)")
        meta = store.metadata
        if meta.get("format") != "minterp_tl.circuits/1" or "config" not in meta:
            raise ValueError(f"{caller}: the store at {str(root)!r} holds no masks written by save_masks")
        return store.load(), meta

    def load_masks(self, root: Union[str, os.PathLike[str]]) -> None:
        """Load mask parameters written by :meth:`save_masks` into this CircuitModel.

        Raises:
            ValueError: Nothing saved there, or its tensors do not match this model's masks (names or
                shapes; the message lists the differences), or a stored file fails its hash check.
        """
        tensors, meta = self._read_store(root, "load_masks")
        mine = self.mask_state()
        if set(tensors) != set(mine):
            missing = sorted(set(mine) - set(tensors))
            extra = sorted(set(tensors) - set(mine))
            raise ValueError(
                f"load_masks: the masks at {str(root)!r} do not match this CircuitModel's masks; missing: "
                f"{missing[:5]}, unexpected: {extra[:5]}"
            )
        for key, tensor in tensors.items():
            if tensor.shape != mine[key].shape:
                raise ValueError(
                    f"load_masks: {key} has shape {tuple(tensor.shape)} at {str(root)!r}, expected "
                    f"{tuple(mine[key].shape)}"
                )
        with torch.no_grad():
            for layer in self._layers():
                for key, target in list(layer.named_parameters(recurse=False)) + list(layer.named_buffers(recurse=False)):
                    target.copy_(tensors[f"{layer.name}.{key}"].to(target.device, target.dtype))
        if "temperature" in meta and self.config.mask_method == "continuous_sparsification":
            self.temperature = float(meta["temperature"])

    @classmethod
    def load(cls, root: Union[str, os.PathLike[str]], model: TransformerBridge) -> CircuitModel:
        """Rebuild a CircuitModel on ``model`` from masks written by :meth:`save_masks`."""
        _, meta = cls._read_store(root, "CircuitModel.load")
        circuit = cls(CircuitConfig.from_json(meta["config"]), model)
        try:
            circuit.load_masks(root)
        except ValueError:
            circuit.detach()
            raise
        return circuit

    # -- plot -----------------------------------------------------------------------------

    def plot_masks(self, path: Union[str, os.PathLike[str]]) -> Path:
        """PNG of the found masks: a masked-weights x units heatmap for head / neuron masks, the
        fraction kept per masked weight for weight masks."""
        from matplotlib.figure import Figure  # no pyplot: no global backend, no figure manager

        masks = {layer.name: layer.hard().float().cpu() for layer in self._layers()}
        if self.config.mask_unit == "weight":
            fig = Figure(figsize=(max(4, 0.4 * len(masks) + 2), 3.5))
            ax = fig.subplots()
            ax.bar(range(len(masks)), [float(m.mean()) for m in masks.values()])
            ax.set_xticks(range(len(masks)), list(masks), rotation=90, fontsize=7)
            ax.set_ylabel("fraction kept")
        else:
            width = max(m.numel() for m in masks.values())
            grid = torch.full((len(masks), width), float("nan"))
            for i, m in enumerate(masks.values()):
                grid[i, : m.numel()] = m
            fig = Figure(figsize=(min(12, 2 + 0.35 * width), 1 + 0.35 * len(masks)))
            ax = fig.subplots()
            ax.imshow(grid.numpy(), cmap="Greens", vmin=0, vmax=1, aspect="auto")
            ax.set_yticks(range(len(masks)), list(masks), fontsize=7)
            ax.set_xlabel(self.config.mask_unit)
        ax.set_title(f"{self.config.mask_method} masks (kept = 1)")
        fig.tight_layout()
        return save_png(fig, path)


def _masked_forward(self: nn.Linear, x: Tensor) -> Tensor:
    """The ``forward`` a CircuitModel installs on a targeted ``nn.Linear`` (``self`` is the linear)."""
    return self._minterp_circuit_mask(x)


def _key(name: str) -> str:
    return name.replace(".", "/")


def _linear(block: nn.Module, path: str) -> Optional[nn.Linear]:
    """The ``nn.Linear`` at ``path`` (``"attn.q"``) of a bridge block, or ``None`` if absent."""
    try:
        module = block.get_submodule(path)
    except AttributeError:
        return None
    linear = getattr(module, "original_component", module)
    if not (isinstance(linear, nn.Linear) or _is_conv1d(linear)):
        raise ValueError(
            f"CircuitModel: {path} of this model is a {type(linear).__name__}, not an nn.Linear or a Conv1D; "
            f"masks support those weights only"
        )
    return linear


def _is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2): ``x @ W + b`` with ``W`` as ``[in, out]``."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _group(model: TransformerBridge, weight: str, unit: str, target: str) -> int:
    if unit == "weight":
        return 0
    if unit == "neuron":
        return 1
    if not weight.startswith("attn."):
        raise ValueError(
            f"target {target!r}: mask_unit 'head' applies to attention weights (W_Q, W_K, W_V, W_O), not "
            f"{weight}; use mask_unit 'neuron' for MLP neurons"
        )
    return int(model.cfg.d_head)


# --------------------------------------------------------------------------------------------
# find_subnetwork: the training loop
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubnetworkHistory:
    """What :func:`find_subnetwork` did, step by step.

    Attributes:
        task_loss: The task loss at each step (before the sign flip of ``maximize``).
        l0: The training (soft / expected) L0 at each step.
        loss: The optimised objective at each step (``+-task_loss + l0_lambda * l0``).
        temperature: The temperature at each step (1.0 throughout for methods without one).
        final_l0: Number of kept units of the found (eval) masks.
        max_l0: Number of mask units.
    """

    task_loss: tuple[float, ...]
    l0: tuple[float, ...]
    loss: tuple[float, ...]
    temperature: tuple[float, ...]
    final_l0: float
    max_l0: int

    def plot(self, path: Union[str, os.PathLike[str]]) -> Path:
        """PNG with the task loss, the L0 and the temperature over the steps."""
        from matplotlib.figure import Figure  # no pyplot: no global backend, no figure manager

        fig = Figure(figsize=(11, 3.2))
        axes = fig.subplots(1, 3)
        for ax, values, title in zip(axes, (self.task_loss, self.l0, self.temperature), ("task loss", "L0 (training)", "temperature")):
            ax.plot(values)
            ax.set_title(title)
            ax.set_xlabel("step")
        axes[1].axhline(self.final_l0, color="k", linestyle=":", label=f"final hard L0 = {self.final_l0:g}")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        return save_png(fig, path)


Batches = Union[Sequence[Any], Callable[[int], Any]]
"""Task batches: a list of model inputs (cycled), or a function ``step -> model input``."""


def find_subnetwork(
    model: Union[TransformerBridge, CircuitModel],
    config: Optional[CircuitConfig],
    batches: Batches,
    loss_fn: Callable[[Float[Tensor, "batch pos d_vocab"], Any], Float[Tensor, ""]],
    *,
    steps: int = 300,
    epochs: int = 10,
    lr: float = 0.1,
    final_temperature: float = 200.0,
    maximize: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> tuple[CircuitModel, SubnetworkHistory]:
    """Train masks that keep (or, with ``maximize``, break) a task with as few units as possible.

    Each step runs ``logits = circuit(batch)`` in training mode (soft masks in the config's
    ablation mode), computes ``task = loss_fn(logits, batch)`` and minimises
    ``task + l0_lambda * L0`` (``-task + l0_lambda * L0`` with ``maximize``) with AdamW on the mask
    logits only (the base model is not touched; with ``config.freeze_base`` it is frozen). For
    continuous sparsification the temperature rises geometrically from 1 to ``final_temperature``
    over ``epochs`` equal parts of the steps (``T <- T * final_temperature ** (1 / epochs)``).

    To find the set whose removal breaks the task, use ``ablation="zero_ablate"`` in the config and
    ``maximize=True``: the model then runs without the masked-in units, and the penalty keeps that
    set small. Initialise such masks negative (few units selected at the start).

    Args:
        model: A ``TransformerBridge`` (a :class:`CircuitModel` is built on it from ``config``) or a
            CircuitModel to train further (``config`` must then be ``None``).
        config: The masks; must not be magnitude pruning (nothing to train).
        batches: Task inputs: a list of token tensors ``[batch, pos]`` (cycled) or a function
            ``step -> tokens``.
        loss_fn: ``(logits [batch, pos, d_vocab], batch) -> scalar`` task loss.
        steps: Optimiser steps (>= epochs).
        epochs: Number of temperature increases.
        lr: AdamW learning rate for the mask logits (no weight decay).
        final_temperature: Temperature at the end (continuous sparsification only), >= 1.
        maximize: Maximise the task loss instead of minimising it.
        seed: Seeds the hard-concrete noise (the caller's RNG state is restored afterwards).
        progress: Show a tqdm progress bar.

    Returns:
        ``(circuit, history)``: the CircuitModel in eval mode, still attached to the model (call
        ``circuit.detach()`` when done), and the :class:`SubnetworkHistory`.
    """
    for name, value, low in (("steps", steps, 1), ("epochs", epochs, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"find_subnetwork: {name} must be an int >= {low}, got {value!r}")
    if steps < epochs:
        raise ValueError(f"find_subnetwork: steps ({steps}) must be >= epochs ({epochs})")
    if not _is_real(lr) or not lr > 0:
        raise ValueError(f"find_subnetwork: lr must be a number > 0, got {lr!r}")
    if not _is_real(final_temperature) or not final_temperature >= 1:
        raise ValueError(f"find_subnetwork: final_temperature must be a number >= 1, got {final_temperature!r}")
    if callable(batches):
        get_batch = batches
    elif isinstance(batches, Sequence) and len(batches) > 0:
        get_batch = lambda step: batches[step % len(batches)]  # noqa: E731
    else:
        raise ValueError("find_subnetwork: batches must be a non-empty list of model inputs or a function step -> input")

    if isinstance(model, CircuitModel):
        if config is not None:
            raise ValueError("find_subnetwork: pass config=None when model is already a CircuitModel")
        circuit, built = model, False
    else:
        if not isinstance(config, CircuitConfig):
            raise ValueError(f"find_subnetwork: config must be a CircuitConfig, got {type(config).__name__}")
        if config.mask_method == "magnitude_pruning":
            raise ValueError("find_subnetwork: magnitude_pruning has nothing to train; build CircuitModel(config, model)")
        circuit, built = CircuitModel(config, model), True
    try:
        return _train_masks(circuit, get_batch, loss_fn, steps, epochs, lr, final_temperature, maximize, seed, progress)
    except BaseException:
        if built:  # a failed run leaves the caller's model as it was
            circuit.detach()
        raise


def _train_masks(
    circuit: CircuitModel,
    get_batch: Callable[[int], Any],
    loss_fn: Callable[[Float[Tensor, "batch pos d_vocab"], Any], Float[Tensor, ""]],
    steps: int,
    epochs: int,
    lr: float,
    final_temperature: float,
    maximize: bool,
    seed: int,
    progress: bool,
) -> tuple[CircuitModel, SubnetworkHistory]:
    """The loop of :func:`find_subnetwork` (arguments checked there)."""
    cs = circuit.config.mask_method == "continuous_sparsification"
    params = circuit.mask_parameters()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    factor = final_temperature ** (1.0 / epochs)
    boundaries = {round(steps * (e + 1) / epochs) for e in range(epochs)}
    if cs:
        circuit.temperature = 1.0
    lam = circuit.config.l0_lambda
    history: dict[str, list[float]] = {"task_loss": [], "l0": [], "loss": [], "temperature": []}
    circuit.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bar = tqdm(range(steps), desc="find_subnetwork", disable=not progress)
        for step in bar:
            batch = get_batch(step)
            logits = circuit(batch)
            task = loss_fn(logits, batch)
            l0 = circuit.l0()
            loss = (-task if maximize else task) + lam * l0
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history["task_loss"].append(float(task.detach()))
            history["l0"].append(float(l0.detach()))
            history["loss"].append(float(loss.detach()))
            history["temperature"].append(circuit.temperature if cs else 1.0)
            if cs and step + 1 in boundaries:
                circuit.temperature = circuit.temperature * factor
            if step % 10 == 0:
                bar.set_postfix(task=f"{history['task_loss'][-1]:.3f}", l0=f"{history['l0'][-1]:.1f}")
    circuit.eval()
    stats = circuit.compute_l0_statistics()
    result = SubnetworkHistory(
        task_loss=tuple(history["task_loss"]),
        l0=tuple(history["l0"]),
        loss=tuple(history["loss"]),
        temperature=tuple(history["temperature"]),
        final_l0=stats["total_l0"],
        max_l0=stats["max_l0"],
    )
    return circuit, result


__all__ = [
    "ABLATIONS",
    "CircuitConfig",
    "CircuitModel",
    "MASK_METHODS",
    "MASK_UNITS",
    "REQUIRED_HPARAMS",
    "SubnetworkHistory",
    "find_subnetwork",
]
