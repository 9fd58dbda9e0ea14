"""The mask of one targeted weight: its mask parameters, mask units, ablation state and masked forward.

Each targeted weight is one ``nn.Linear`` of the bridge (the ``original_component`` of a ``LinearBridge``:
``blocks[l].attn.q`` ... ``.o``, ``blocks[l].mlp.in`` / ``.gate`` / ``.out``), for Hugging Face and
native models alike, or GPT-2's ``Conv1D``, whose weight is stored transposed (``[in_features,
out_features]``; masks and units are the same, on the transposed view). A mask unit groups the entries
of that weight, seen as ``[out_features, in_features]``:

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

Ablation modes, with ``h`` the found binary mask:

- ``"none"``: the mask (soft in training, ``h`` in eval);
- ``"zero_ablate"``: ``1 - mask`` (soft in training, ``1 - h`` in eval): remove the subnetwork;
- ``"random_ablate"``: as ``zero_ablate``, but the removed entries (the subnetwork) get freshly
  initialised weights (``nn.Linear``'s default init, seeded) instead of zeros;
- ``"randomly_sampled"``: a random binary mask with as many ones as ``h`` (per targeted weight);
- ``"complement_sampled"``: a random binary mask with as many ones as ``h``, drawn from the zeros of
  ``h`` (disjoint from the subnetwork).

The two sampled masks KEEP the sampled units (the design notes' convention: "run only a random set of
the same size"). NeuroSurgeon's sampled masks instead REMOVE the sampled set (the control for
``zero_ablate``); ``CircuitModel.set_ablate_mode(..., remove=True)`` gives that convention.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from minterp_tl.circuits.config import CircuitConfig
from minterp_tl.circuits.masks import MaskMethod

_SAMPLED: tuple[str, ...] = ("randomly_sampled", "complement_sampled")


class _MaskLayer(nn.Module):
    linear: nn.Linear  # or a Conv1D: held by reference, not registered (set in __init__)
    """The mask of one targeted ``nn.Linear`` (its logits or pruning mask, and the ablation state).

    The linear module is held by reference (not registered as a submodule), so the mask layer's
    parameters are only its mask logits (``weight_logits``, ``bias_logits``); magnitude pruning keeps
    its masks as buffers (``weight_pruned``, ``bias_pruned``).

    Args:
        name: Canonical weight name, ``"blocks.{l}.attn.W_Q"``.
        linear: The ``nn.Linear`` (or ``Conv1D``) whose forward is masked.
        side: ``"rows"`` (units are output features) or ``"cols"`` (input features).
        group: Number of consecutive features per unit (1 for neurons, ``d_head`` for heads; 0 for
            ``"weight"`` units).
        config: The circuit config.
        method: Its mask method (``config.method``, shared by the layers of a circuit).
    """

    def __init__(
        self, name: str, linear: nn.Linear, side: str, group: int, config: CircuitConfig, method: MaskMethod
    ) -> None:
        super().__init__()
        self.name = name
        object.__setattr__(self, "linear", linear)
        self.transposed = _is_conv1d(linear)  # GPT-2's Conv1D keeps its weight as [in, out]
        self.method = method
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
            shape = ((out_f if side == "rows" else in_f) // group,)
        has_bias = config.mask_bias and linear.bias is not None
        # A separate bias mask only for weight units; row units share their mask with the bias.
        self.has_bias_mask = has_bias and self.unit == "weight"
        self.mask_bias_by_unit = has_bias and self.unit != "weight" and side == "rows"
        self._suffix = "logits" if self.method.trainable else "pruned"
        self._set_raw("weight", self.method.init(shape, weight.device, lambda: self._unit_scores(weight)))
        if self.has_bias_mask:
            bias = linear.bias
            bias_scores = lambda: bias.detach().abs().float()  # noqa: E731
            self._set_raw("bias", self.method.init(bias.shape, weight.device, bias_scores))
        self._sampled: dict[str, Tensor] = {}
        self._random: dict[str, Tensor] = {}

    # -- shapes ---------------------------------------------------------------------------

    def weight(self) -> Float[Tensor, "d_out d_in"]:
        """The masked module's weight as ``[out_features, in_features]`` (a view; Conv1D's transposed)."""
        return self.linear.weight.t() if self.transposed else self.linear.weight

    def _unit_scores(self, weight: Float[Tensor, "d_out d_in"]) -> Float[Tensor, "*units"]:
        """The magnitude of each unit: ``|W|`` per entry, or the L2 norm of each neuron's / head's entries."""
        w = weight.detach().float()
        if self.unit == "weight":
            return w.abs()
        per_feature = w.pow(2).sum(dim=1 if self.side == "rows" else 0)  # [features]
        return per_feature.view(-1, self.group).sum(-1).sqrt()

    def _set_raw(self, which: str, value: Tensor) -> None:
        """Register the initial mask parameters: an ``nn.Parameter`` if trained, else a buffer."""
        if self.method.trainable:
            setattr(self, f"{which}_{self._suffix}", nn.Parameter(value))
        else:
            self.register_buffer(f"{which}_{self._suffix}", value)

    def _raw(self, which: str) -> Tensor:
        """The mask parameters of ``"weight"`` or ``"bias"``."""
        return getattr(self, f"{which}_{self._suffix}")

    def _expand(self, mask: Tensor) -> Tensor:
        """A unit-shaped mask, broadcastable to the ``[out, in]`` weight."""
        if self.unit == "weight":
            return mask
        full = mask.repeat_interleave(self.group)
        return full[:, None] if self.side == "rows" else full[None, :]

    def _which(self) -> tuple[str, ...]:
        return ("weight", "bias") if self.has_bias_mask else ("weight",)

    @property
    def n_units(self) -> int:
        """Mask entries (weight and bias masks together): ``max_l0`` of this layer."""
        return int(sum(self._raw(which).numel() for which in self._which()))

    # -- masks ----------------------------------------------------------------------------

    def hard(self, which: str = "weight") -> Tensor:
        """The found binary mask (float 0/1), independent of the ablation mode and training."""
        return self.method.deterministic(self._raw(which))

    def soft(self, which: str = "weight") -> Tensor:
        """The training mask (differentiable): ``sigmoid(T s)`` or a hard-concrete sample."""
        return self.method.sample(self._raw(which), self.temperature)

    def mask(self, which: str = "weight") -> Tensor:
        """The mask the forward pass uses now (mode, training, ablation), unit-shaped."""
        if self.ablation in _SAMPLED:
            sampled = self._sampled.get(f"{self.ablation}.{which}")
            if sampled is None:
                raise ValueError(
                    f"{self.name}: no {self.ablation} mask was sampled; "
                    f"call set_ablate_mode({self.ablation!r})"
                )
            return 1.0 - sampled if self.remove_sampled else sampled
        base = self.soft(which) if self.training else self.hard(which)
        return base if self.ablation == "none" else 1.0 - base

    def l0(self) -> Float[Tensor, ""]:
        """L0 of the found mask: expected / soft in training, the number of ones in eval."""
        total = torch.zeros((), device=self._raw("weight").device)
        for which in self._which():
            if self.training:
                total = total + self.method.l0(self._raw(which), self.temperature)
            else:
                total = total + self.hard(which).sum()
        return total

    # -- sampling and re-initialisation -------------------------------------------------

    def sample(self, ablation: str, generator: torch.Generator) -> None:
        """Draw the ``randomly_sampled`` / ``complement_sampled`` mask with as many ones as ``hard``."""
        for which in self._which():
            hard = self.hard(which).flatten().cpu()
            k = int(hard.sum())
            if ablation == "randomly_sampled":
                pool = torch.arange(hard.numel())
            else:
                pool = (hard == 0).nonzero()[:, 0]
            if k > pool.numel():
                raise ValueError(
                    f"set_ablate_mode('complement_sampled'): {self.name} keeps {k} of {hard.numel()} "
                    f"units, more than its complement ({pool.numel()}), so no disjoint mask of the same "
                    f"size exists; use 'randomly_sampled' or a sparser mask"
                )
            chosen = pool[torch.randperm(pool.numel(), generator=generator)[:k]]
            out = torch.zeros(hard.numel())
            out[chosen] = 1.0
            raw = self._raw(which)
            self._sampled[f"{ablation}.{which}"] = out.view(raw.shape).to(raw.device)

    def has_sample(self, ablation: str) -> bool:
        """Whether a sample of ``ablation`` exists with as many ones as the found mask has now."""
        key = f"{ablation}.weight"
        if key not in self._sampled:
            return False
        return int(self._sampled[key].sum()) == int(self.hard("weight").sum())

    def has_random_weights(self) -> bool:
        """Whether :meth:`reinitialise` has drawn the ``random_ablate`` weights."""
        return "weight" in self._random

    def reinitialise(self, generator: torch.Generator) -> None:
        """Fresh ``nn.Linear``-style weights (uniform in ``+-1/sqrt(fan_in)``) for ``random_ablate``."""
        weight = self.weight()
        bound = 1.0 / math.sqrt(weight.shape[1])
        self._random["weight"] = _uniform(weight.shape, bound, generator).to(weight.device, weight.dtype)
        if self.linear.bias is not None:
            bias = _uniform(self.linear.bias.shape, bound, generator)
            self._random["bias"] = bias.to(weight.device, weight.dtype)

    # -- forward --------------------------------------------------------------------------

    def masked_parameters(self) -> tuple[Float[Tensor, "d_out d_in"], Optional[Float[Tensor, d_out]]]:
        """The weight (``[out, in]``) and bias the masked ``nn.Linear`` uses now."""
        weight, bias = self.weight(), self.linear.bias
        m = self._expand(self.mask("weight")).to(weight.dtype)
        if self.has_bias_mask:
            mb: Optional[Tensor] = self.mask("bias").to(weight.dtype)
        elif self.mask_bias_by_unit:
            mb = m[:, 0]
        else:
            mb = None
        if self.ablation == "random_ablate":
            if not self.has_random_weights():
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


def _is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2): ``x @ W + b`` with ``W`` as ``[in, out]``."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _uniform(shape: torch.Size, bound: float, generator: torch.Generator) -> Tensor:
    """Uniform samples in ``[-bound, bound)`` from ``generator`` (on the CPU)."""
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


__all__: list[str] = []
