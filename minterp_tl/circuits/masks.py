"""The mask maths: one small object per mask method, chosen once from the method's name.

A method turns mask parameters ``s`` (``[*unit_shape]``: logits, or a fixed 0/1 mask) into masks:

- :meth:`MaskMethod.init`: the initial ``s``;
- :meth:`MaskMethod.sample`: the training mask (differentiable, possibly random);
- :meth:`MaskMethod.deterministic`: the found binary mask (float 0/1), used in eval;
- :meth:`MaskMethod.l0`: the training L0 penalty (the eval L0 is the sum of the deterministic mask).

Formulas (design notes 4.3; ``T`` is the temperature):

- continuous sparsification: ``s`` starts at ``mask_init_value``; training mask ``sigmoid(T * s)``,
  eval mask ``1[s > 0]``, training L0 = ``sum sigmoid(T * s)``;
- hard concrete (Louizos et al. 2018): ``s`` starts at ``log(p / (1 - p))`` with
  ``p = mask_init_percentage``; training ``u ~ U(0, 1)``,
  ``sigma = sigmoid((log u - log(1 - u) + s) / beta)``, ``m = clamp(sigma * (zeta - gamma) + gamma, 0, 1)``
  with ``beta = 2/3``, ``gamma = -0.1``, ``zeta = 1.1``; training L0 =
  ``sum sigmoid(s - beta * log(-gamma / zeta))`` (the expected number of non-zero entries); eval mask
  ``1[clamp(sigmoid(s) * (zeta - gamma) + gamma, 0, 1) > 0.5]`` (= ``1[s > 0]``);
- magnitude pruning: keep exactly ``round(N * (1 - prune_percentage))`` of the ``N`` units, those with
  the largest scores (``|W|``, or the L2 norm of a unit's entries); computed once, nothing to train.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

# Hard concrete constants (Louizos et al. 2018).
HC_BETA: float = 2.0 / 3.0
HC_GAMMA: float = -0.1
HC_ZETA: float = 1.1

_Scores = Callable[[], Float[Tensor, "*units"]]
"""Computes the magnitude score of each mask unit (read by magnitude pruning only)."""


class MaskMethod(ABC):
    """How mask parameters become masks. Subclasses are built from a config's ``mask_hparams`` by
    :func:`mask_method`, which checks the method's own hyperparameter.

    Attributes:
        name: The ``mask_method`` of :class:`~minterp_tl.circuits.CircuitConfig`.
        required: The ``mask_hparams`` keys the method needs; ``optional``: those it also accepts.
        trainable: Whether the parameters are trained logits (``nn.Parameter`` named ``*_logits``) or a
            fixed mask (buffer named ``*_pruned``).
        has_temperature: Whether :meth:`sample` and :meth:`l0` read the temperature.
    """

    name: ClassVar[str]
    required: ClassVar[tuple[str, ...]]
    optional: ClassVar[tuple[str, ...]] = ()
    trainable: ClassVar[bool] = True
    has_temperature: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> MaskMethod:
        """The method with its hyperparameter read from ``hparams`` (a config's ``mask_hparams``, whose
        keys are already checked); raise ``ValueError`` naming the hyperparameter if it is invalid."""

    @abstractmethod
    def init(self, shape: tuple[int, ...], device: torch.device, scores: _Scores) -> Float[Tensor, "*units"]:
        """The initial mask parameters, float32 of ``shape`` on ``device``."""

    @abstractmethod
    def sample(self, s: Float[Tensor, "*units"], temperature: float) -> Float[Tensor, "*units"]:
        """The training mask in ``[0, 1]`` (differentiable in ``s``)."""

    def deterministic(self, s: Float[Tensor, "*units"]) -> Float[Tensor, "*units"]:
        """The found binary mask, float 0/1 (no gradient)."""
        return (s.detach() > 0).float()

    @abstractmethod
    def l0(self, s: Float[Tensor, "*units"], temperature: float) -> Float[Tensor, ""]:
        """The training L0: soft or expected number of kept units (differentiable in ``s``)."""


class ContinuousSparsification(MaskMethod):
    """Continuous sparsification: training mask ``sigmoid(T * s)``, eval mask ``1[s > 0]``.

    Args:
        init_value: The initial logit ``s`` of every unit (``mask_init_value``).
    """

    name = "continuous_sparsification"
    required = ("ablation", "mask_unit", "mask_bias", "mask_init_value")
    has_temperature = True

    def __init__(self, init_value: float) -> None:
        self.init_value = init_value

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> ContinuousSparsification:
        value = hparams["mask_init_value"]
        if not _is_real(value) or not math.isfinite(value):
            raise ValueError(
                f"CircuitConfig: mask_init_value must be a finite number (a mask logit), got {value!r}"
            )
        return cls(float(value))

    def init(self, shape: tuple[int, ...], device: torch.device, scores: _Scores) -> Float[Tensor, "*units"]:
        return torch.full(shape, self.init_value, device=device, dtype=torch.float32)

    def sample(self, s: Float[Tensor, "*units"], temperature: float) -> Float[Tensor, "*units"]:
        return torch.sigmoid(temperature * s)

    def l0(self, s: Float[Tensor, "*units"], temperature: float) -> Float[Tensor, ""]:
        return torch.sigmoid(temperature * s).sum()


class HardConcrete(MaskMethod):
    """Hard concrete: a stretched, clamped concrete sample in training, ``1[s > 0]`` in eval.

    Args:
        init_percentage: ``p`` in (0, 1); every logit starts at ``log(p / (1 - p))``
            (``mask_init_percentage``).
    """

    name = "hard_concrete"
    required = ("ablation", "mask_unit", "mask_bias", "mask_init_percentage")

    def __init__(self, init_percentage: float) -> None:
        self.init_percentage = init_percentage

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> HardConcrete:
        p = hparams["mask_init_percentage"]
        if not _is_real(p) or not 0.0 < p < 1.0:
            raise ValueError(
                f"CircuitConfig: mask_init_percentage must be a number strictly between 0 and 1, got {p!r}"
            )
        return cls(float(p))

    def init(self, shape: tuple[int, ...], device: torch.device, scores: _Scores) -> Float[Tensor, "*units"]:
        p = self.init_percentage
        return torch.full(shape, math.log(p / (1 - p)), device=device, dtype=torch.float32)

    def sample(self, s: Float[Tensor, "*units"], temperature: float) -> Float[Tensor, "*units"]:
        u = torch.rand(s.shape, device=s.device).clamp(1e-6, 1 - 1e-6)
        sigma = torch.sigmoid((torch.log(u) - torch.log(1 - u) + s) / HC_BETA)
        return (sigma * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0.0, 1.0)

    def l0(self, s: Float[Tensor, "*units"], temperature: float) -> Float[Tensor, ""]:
        return torch.sigmoid(s - HC_BETA * math.log(-HC_GAMMA / HC_ZETA)).sum()


class MagnitudePruning(MaskMethod):
    """Magnitude pruning: a fixed mask keeping the units with the largest scores, in training and eval.

    Args:
        prune_percentage: Fraction of the units to prune, in [0, 1].
    """

    name = "magnitude_pruning"
    required = ("ablation", "mask_bias", "prune_percentage")
    optional = ("mask_unit",)
    trainable = False

    def __init__(self, prune_percentage: float) -> None:
        self.prune_percentage = prune_percentage

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> MagnitudePruning:
        p = hparams["prune_percentage"]
        if not _is_real(p) or not 0.0 <= p <= 1.0:
            raise ValueError(f"CircuitConfig: prune_percentage must be a number in [0, 1], got {p!r}")
        return cls(float(p))

    def init(self, shape: tuple[int, ...], device: torch.device, scores: _Scores) -> Float[Tensor, "*units"]:
        return _top_fraction(scores(), 1.0 - self.prune_percentage)

    def sample(self, s: Float[Tensor, "*units"], temperature: float) -> Float[Tensor, "*units"]:
        return s.float()

    def deterministic(self, s: Float[Tensor, "*units"]) -> Float[Tensor, "*units"]:
        return s.float()

    def l0(self, s: Float[Tensor, "*units"], temperature: float) -> Float[Tensor, ""]:
        return s.float().sum()


_METHODS: dict[str, type[MaskMethod]] = {
    cls.name: cls for cls in (ContinuousSparsification, HardConcrete, MagnitudePruning)
}
MASK_METHODS: tuple[str, ...] = tuple(_METHODS)
REQUIRED_HPARAMS: dict[str, tuple[str, ...]] = {name: cls.required for name, cls in _METHODS.items()}
"""Hyperparameters each method requires in ``mask_hparams``; magnitude pruning may also take ``mask_unit``."""
_OPTIONAL_HPARAMS: dict[str, tuple[str, ...]] = {name: cls.optional for name, cls in _METHODS.items()}


def mask_method(name: str, hparams: Mapping[str, Any]) -> MaskMethod:
    """The method ``name`` (one of :data:`MASK_METHODS`) with its hyperparameter from ``hparams``.

    Raises:
        ValueError: The method's own hyperparameter is invalid (named, with its valid range).
    """
    return _METHODS[name].from_hparams(hparams)


def _is_real(value: Any) -> bool:
    """Whether ``value`` is an ``int`` or ``float`` (not a ``bool``)."""
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _top_fraction(scores: Tensor, keep_fraction: float) -> Float[Tensor, "*units"]:
    """Binary mask (float) keeping exactly ``round(N * keep_fraction)`` entries with the largest scores."""
    n = scores.numel()
    k = int(round(n * keep_fraction))
    out = torch.zeros(n, device=scores.device)
    if k > 0:
        out[scores.flatten().topk(k).indices] = 1.0
    return out.view(scores.shape)


__all__ = [
    "HC_BETA",
    "HC_GAMMA",
    "HC_ZETA",
    "MASK_METHODS",
    "REQUIRED_HPARAMS",
    "ContinuousSparsification",
    "HardConcrete",
    "MagnitudePruning",
    "MaskMethod",
    "mask_method",
]
