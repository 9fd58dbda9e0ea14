"""PNG plots of found masks and of a mask-training run (matplotlib's ``Figure``, no pyplot)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import torch
from jaxtyping import Float
from torch import Tensor

from minterp_tl._files import save_png


def plot_masks(
    masks: Mapping[str, Float[Tensor, "*units"]], unit: str, title: str, path: Union[str, os.PathLike[str]]
) -> Path:
    """PNG of binary masks: a masked-weights x units heatmap for head / neuron masks, the fraction kept
    per masked weight for weight masks.

    Args:
        masks: ``{weight name: 0/1 mask}`` (unit-shaped, on the CPU), in plot order.
        unit: The mask unit (``"weight"``, ``"neuron"``, ``"head"``); also the x label of the heatmap.
        title: The plot's title.
        path: The PNG to write.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend, no figure manager

    if unit == "weight":
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
        ax.set_xlabel(unit)
    ax.set_title(title)
    fig.tight_layout()
    return save_png(fig, path)


def plot_training(
    task_loss: Sequence[float],
    l0: Sequence[float],
    temperature: Sequence[float],
    final_l0: float,
    path: Union[str, os.PathLike[str]],
) -> Path:
    """PNG with the task loss, the training L0 (and the final hard L0) and the temperature over the steps.

    Args:
        task_loss: The task loss at each step.
        l0: The training (soft / expected) L0 at each step.
        temperature: The temperature at each step.
        final_l0: Number of units the found (eval) masks keep.
        path: The PNG to write.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend, no figure manager

    fig = Figure(figsize=(11, 3.2))
    axes = fig.subplots(1, 3)
    panels = ((task_loss, "task loss"), (l0, "L0 (training)"), (temperature, "temperature"))
    for ax, (values, title) in zip(axes, panels):
        ax.plot(values)
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[1].axhline(final_l0, color="k", linestyle=":", label=f"final hard L0 = {final_l0:g}")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, path)


__all__ = ["plot_masks", "plot_training"]
