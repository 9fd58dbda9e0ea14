"""Training masks: :func:`find_subnetwork` and its :class:`SubnetworkHistory`.

AdamW on the mask logits only, task loss ``+ l0_lambda * L0`` (or ``- task loss`` to find the set whose
removal breaks the task), the continuous-sparsification temperature raised each epoch, a tqdm progress
bar (``progress=False`` turns it off), and a history with a PNG plot.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from minterp_tl.circuits.config import CircuitConfig
from minterp_tl.circuits.masks import _is_real
from minterp_tl.circuits.model import CircuitModel
from minterp_tl.circuits.plots import plot_training

Batches = Union[Sequence[Any], Callable[[int], Any]]
"""Task batches: a list of model inputs (cycled), or a function ``step -> model input``."""

_LossFn = Callable[[Float[Tensor, "batch pos d_vocab"], Any], Float[Tensor, ""]]
"""``(logits [batch, pos, d_vocab], batch) -> scalar`` task loss."""


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
        return plot_training(self.task_loss, self.l0, self.temperature, self.final_l0, path)


def find_subnetwork(
    model: Union[TransformerBridge, CircuitModel],
    config: Optional[CircuitConfig],
    batches: Batches,
    loss_fn: _LossFn,
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
        progress: Show a tqdm progress bar (``False``: none).

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
        raise ValueError(
            f"find_subnetwork: final_temperature must be a number >= 1, got {final_temperature!r}"
        )
    if callable(batches):
        get_batch = batches
    elif isinstance(batches, Sequence) and len(batches) > 0:
        get_batch = lambda step: batches[step % len(batches)]  # noqa: E731
    else:
        raise ValueError(
            "find_subnetwork: batches must be a non-empty list of model inputs or a function step -> input"
        )

    if isinstance(model, CircuitModel):
        if config is not None:
            raise ValueError("find_subnetwork: pass config=None when model is already a CircuitModel")
        circuit, built = model, False
    else:
        if not isinstance(config, CircuitConfig):
            raise ValueError(f"find_subnetwork: config must be a CircuitConfig, got {type(config).__name__}")
        if not config.method.trainable:
            raise ValueError(
                f"find_subnetwork: {config.mask_method} has nothing to train; "
                "build CircuitModel(config, model)"
            )
        circuit, built = CircuitModel(config, model), True
    try:
        return _train_masks(
            circuit, get_batch, loss_fn, steps, epochs, lr, final_temperature, maximize, seed, progress
        )
    except BaseException:
        if built:  # a failed run leaves the caller's model as it was
            circuit.detach()
        raise


def _train_masks(
    circuit: CircuitModel,
    get_batch: Callable[[int], Any],
    loss_fn: _LossFn,
    steps: int,
    epochs: int,
    lr: float,
    final_temperature: float,
    maximize: bool,
    seed: int,
    progress: bool,
) -> tuple[CircuitModel, SubnetworkHistory]:
    """The loop of :func:`find_subnetwork` (arguments checked there)."""
    heated = circuit.method.has_temperature
    optimizer = torch.optim.AdamW(circuit.mask_parameters(), lr=lr, weight_decay=0.0)
    factor = final_temperature ** (1.0 / epochs)
    boundaries = {round(steps * (e + 1) / epochs) for e in range(epochs)}
    if heated:
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
            history["temperature"].append(circuit.temperature if heated else 1.0)
            if heated and step + 1 in boundaries:
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


__all__ = ["Batches", "SubnetworkHistory", "find_subnetwork"]
