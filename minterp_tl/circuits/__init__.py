"""Circuit discovery with learned masks over a TransformerLens model's weights (NeuroSurgeon on TL 4).

Patching says which single component matters; a learned mask finds the smallest set of weights (or
MLP neurons, or attention heads) that still does a task, and lets the researcher check that removing
exactly that set breaks the task while removing a random set of the same size does not.

- :class:`CircuitConfig` (:mod:`~minterp_tl.circuits.config`) -- a frozen description of the masks: the
  method (``"continuous_sparsification"``, ``"hard_concrete"``, ``"magnitude_pruning"``), its
  hyperparameters, the targeted weights (canonical names such as ``"blocks.3.attn.W_Q"``, or groups
  over a layer spec such as ``"attn[n//2:]"``), the mask unit (``"weight"``, ``"neuron"``, ``"head"``),
  whether the base model is frozen, and the L0 penalty.
- :mod:`~minterp_tl.circuits.masks` -- the mask maths: one small object per method (init, training
  sample, deterministic eval mask, L0 penalty), chosen once from the method's name.
- :mod:`~minterp_tl.circuits.layer` -- the mask of one targeted ``nn.Linear`` (or GPT-2 ``Conv1D``):
  mask units, bias masks, ablation modes and the masked forward.
- :class:`CircuitModel` (:mod:`~minterp_tl.circuits.model`) -- wraps a ``TransformerBridge`` without
  copying it: the masks attached to its weights, ``use_masks``, L0 statistics, temperature, ablation
  modes, save / load to a :class:`minterp_tl.store.StateStore`, and a plot of the found masks.
- :func:`find_subnetwork` (:mod:`~minterp_tl.circuits.training`) -- the training loop: AdamW on the
  mask logits only, task loss ``+ l0_lambda * L0`` (or ``- task loss`` to find the set whose removal
  breaks the task), the continuous-sparsification temperature raised each epoch, a progress bar, and a
  history with a PNG plot.
"""

from __future__ import annotations

from minterp_tl.circuits.config import ABLATIONS, MASK_UNITS, CircuitConfig, TargetLike
from minterp_tl.circuits.masks import HC_BETA, HC_GAMMA, HC_ZETA, MASK_METHODS, REQUIRED_HPARAMS
from minterp_tl.circuits.model import CircuitModel
from minterp_tl.circuits.training import Batches, SubnetworkHistory, find_subnetwork

__all__ = [
    "ABLATIONS",
    "Batches",
    "CircuitConfig",
    "CircuitModel",
    "HC_BETA",
    "HC_GAMMA",
    "HC_ZETA",
    "MASK_METHODS",
    "MASK_UNITS",
    "REQUIRED_HPARAMS",
    "SubnetworkHistory",
    "TargetLike",
    "find_subnetwork",
]
