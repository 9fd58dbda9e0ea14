"""Spec-driven patching sweeps: any hook, layers / positions / heads given as specs, a result that plots.

:func:`activation_patch` patches the clean activation of one hook into the corrupted run at every selected
layer x position (x head), with specs such as ``layers="n//2:"`` and ``positions="-3:"``. Each patched copy
is one :class:`~minterp_tl.interventions.Intervention` (``mode="patch"``), applied by the same code as
every other intervention, run by the batched engine of :mod:`minterp_tl.patching`.
:func:`plot_heatmap` draws any ``layer x pos`` / ``layer x head`` result as a PNG.
:mod:`minterp_tl.patching` re-exports all three.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache

from minterp_tl._checks import token_ids
from minterp_tl._files import save_png
from minterp_tl._patch_engine import Patch, check_sizes, run_patched
from minterp_tl.hooks import hook_layout, n_heads
from minterp_tl.interventions import Intervention, Step, apply_step
from minterp_tl.metrics import MetricFn, reads_last_position_only
from minterp_tl.names import resolve_name
from minterp_tl.specs import SpecLike, resolve


@dataclass(eq=False)
class PatchSweep:
    """The result of :func:`activation_patch`.

    Attributes:
        values: ``[len(layers), len(positions) or len(heads) ...]`` metric values (axes as ``axis_names``).
        axis_names: ``("layer", "pos")``, ``("layer", "head")`` or ``("layer", "pos", "head")``.
        layers / positions / heads: The indices each axis stands for.
        hook: The short hook name that was patched.
        labels: Token strings for the positions (if known).
    """

    values: Tensor
    axis_names: tuple[str, ...]
    layers: list[int]
    positions: Optional[list[int]]
    heads: Optional[list[int]]
    hook: str
    labels: Optional[list[str]] = None

    def plot(self, path: Union[str, Path], title: Optional[str] = None) -> Path:
        """Heatmap PNG of a 2-D sweep (``layer x pos`` or ``layer x head``)."""
        if self.values.ndim != 2:
            raise ValueError(f"plot needs a 2-D sweep, this one is {self.axis_names}; index it first.")
        cols = (self.positions if self.axis_names[1] == "pos" else self.heads) or []
        labels = (
            [f"{p} {self.labels[p]!r}" for p in cols]
            if self.labels and self.axis_names[1] == "pos"
            else [str(c) for c in cols]
        )
        return plot_heatmap(
            self.values,
            path,
            row_labels=[str(l) for l in self.layers],
            col_labels=labels,
            xlabel=self.axis_names[1],
            ylabel="layer",
            title=title or f"patching {self.hook}",
        )


def activation_patch(
    model: Any,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache: ActivationCache,
    metric: MetricFn,
    hook: str = "resid_pre",
    *,
    layers: SpecLike = "all",
    positions: SpecLike = "all",
    heads: SpecLike = None,
    max_batch: Optional[int] = None,
    memory_budget: Optional[int] = None,
    progress: bool = True,
    skip_unchanged: bool = True,
) -> PatchSweep:
    """Patch the clean ``hook`` into the corrupted run at every selected layer x position (x head).

    Args:
        model: The model.
        corrupted_tokens: ``[batch, pos]``.
        clean_cache: The clean run's activations (needs ``hook`` at the selected layers).
        metric: Logits -> scalar.
        hook: Any per-layer name :func:`minterp_tl.names.resolve_name` accepts (``"resid_pre"``,
            ``"attn_out"``, ``"z"``, ``"mlp.hook_post"``, ...).
        layers: Layer spec (``"n//2:"``, ``[0, 5]``, ...).
        positions: Position spec (``"-3:"``, ``"last"``; ``None``: all positions at once, for a
            ``layer x head`` sweep). For ``pattern`` / ``attn_scores`` these are query positions.
        heads: Head spec for hooks with a head axis; ``None``: no head axis in the sweep.
        max_batch, memory_budget, progress, skip_unchanged: As in :func:`generic_activation_patch`.

    Returns:
        A :class:`PatchSweep` with values ``[layers, positions]``, ``[layers, heads]`` or
        ``[layers, positions, heads]``.
    """
    token_ids(model, corrupted_tokens, "corrupted_tokens")
    check_sizes(max_batch, memory_budget)
    n_layers, n_pos = model.cfg.n_layers, int(corrupted_tokens.shape[-1])
    layer_idx = resolve(layers, n_layers, what="layer")
    if not layer_idx:
        raise ValueError(f"layers={layers!r} selects no layer (n_layers={n_layers}); select at least one")
    names = [resolve_name(model, hook, l) for l in layer_idx]
    pos_axis, head_axis = hook_layout(names[0], 4)
    pos_idx = None if positions is None else resolve(positions, n_pos, what="position")
    if pos_idx is not None and not pos_idx:
        raise ValueError(
            f"positions={positions!r} selects no position (n_positions={n_pos}); select at least one"
        )
    head_idx = None
    if heads is not None:
        if head_axis is None:
            raise ValueError(f"heads={heads!r} given for {names[0]}, which has no head axis.")
        heads_here = n_heads(model, names[0])
        head_idx = resolve(heads, heads_here, what="head")
        if not head_idx:
            raise ValueError(f"heads={heads!r} selects no head (n_heads={heads_here}); select at least one")
    if pos_idx is None and head_idx is None:
        raise ValueError("activation_patch needs positions, heads, or both to sweep over.")

    grid = list(
        itertools.product(
            range(len(layer_idx)), range(len(pos_idx or [None])), range(len(head_idx or [None]))
        )
    )
    patches = []
    for li, pi, hi in grid:
        name = names[li]
        if name not in clean_cache.cache_dict:
            raise ValueError(f"clean_cache has no {name!r}; cache it in the clean run.")
        index = (
            layer_idx[li],
            None if pos_idx is None else pos_idx[pi],
            None if head_idx is None else head_idx[hi],
        )
        patches.append(
            Patch(name, _patch_setter(name, index, clean_cache[name]), index, clean_cache[name], index[0])
        )

    def evaluate(logits: Tensor) -> Tensor:
        out = torch.as_tensor(metric(logits))
        if out.ndim != 0:
            raise ValueError(f"metric must return a scalar, got shape {tuple(out.shape)}")
        return torch.tensor(float(out))

    values = run_patched(
        model,
        corrupted_tokens,
        patches,
        evaluate,
        max_batch=max_batch,
        memory_budget=memory_budget,
        progress=progress,
        skip_noops=skip_unchanged,
        last_only=reads_last_position_only(metric),
    ).cpu()
    shape = (
        [len(layer_idx)]
        + ([len(pos_idx)] if pos_idx is not None else [])
        + ([len(head_idx)] if head_idx is not None else [])
    )
    axes = (
        ("layer",) + (("pos",) if pos_idx is not None else ()) + (("head",) if head_idx is not None else ())
    )
    labels = None
    if getattr(model, "tokenizer", None) is not None and corrupted_tokens.shape[0] == 1:
        labels = list(model.to_str_tokens(corrupted_tokens[0]))
    return PatchSweep(values.reshape(shape), axes, layer_idx, pos_idx, head_idx, hook, labels)


def _patch_setter(name: str, index: tuple[int, Optional[int], Optional[int]], clean: Tensor) -> Callable:
    """The setter of one patched copy of :func:`activation_patch`: an ``Intervention(mode="patch")`` at
    ``name`` for position ``index[1]`` and head ``index[2]`` (``None``: all), applied by the same code as
    every other intervention."""
    _, p, h = index
    heads = None if h is None else (h,)
    record = Intervention(
        name,
        "patch",
        clean,
        positions=None if p is None else torch.tensor([[p]]),
        heads=None if h is None else [h],
    )
    step = Step(name, record, heads, clean, f"patch {name} at {index}")
    return lambda act, index, clean: apply_step(act, step, None)


def plot_heatmap(
    values: Float[Tensor, "rows cols"],
    path: Union[str, Path],
    *,
    row_labels: Optional[Sequence[str]] = None,
    col_labels: Optional[Sequence[str]] = None,
    xlabel: str = "pos",
    ylabel: str = "layer",
    title: str = "",
    center: bool = True,
) -> Path:
    """Save a heatmap of a 2-D result (``layer x pos`` / ``layer x head``) as a PNG and return its path.

    ``center=True`` uses a diverging colour map centred on 0 (patching effects have a sign). The file
    is written to a temporary name and renamed, so it is never left half-written.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend, no figure manager

    values = torch.as_tensor(values).detach().float().cpu()
    if values.ndim != 2:
        raise ValueError(f"plot_heatmap needs a 2-D tensor, got shape {tuple(values.shape)}")
    rows, cols = values.shape
    fig = Figure(figsize=(max(4.0, 0.6 * cols + 2), max(3.0, 0.3 * rows + 1.5)))
    ax = fig.subplots()
    vmax = float(values.abs().max()) or 1.0
    im = ax.imshow(
        values.numpy(),
        aspect="auto",
        cmap="RdBu" if center else "viridis",
        vmin=-vmax if center else None,
        vmax=vmax if center else None,
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xticks(range(cols))
    ax.set_xticklabels(
        col_labels if col_labels is not None else [str(i) for i in range(cols)], rotation=90, fontsize=7
    )
    ax.set_yticks(range(rows))
    ax.set_yticklabels(row_labels if row_labels is not None else [str(i) for i in range(rows)], fontsize=7)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return save_png(fig, path)


__all__ = ["PatchSweep", "activation_patch", "plot_heatmap"]
