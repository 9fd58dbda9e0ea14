"""TransformerLens's result forms for batched sweeps: the ``_every`` helpers' stacking and baselines.

:mod:`minterp_tl.patching` returns what ``transformer_lens.patching`` returns; this private module builds
the stacked forms (a leading ``patch_type`` axis, ``PatchingResult`` with ``index_df``) from single sweeps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from torch import Tensor
from transformer_lens import ActivationCache
from transformer_lens.patching import PatchingResult, make_df_from_ranges

_AXIS_RENAMES = {"head_index": "head", "dest_pos": "pos"}


def run_sweeps(
    sweeps: Sequence[Callable],
    axes: Sequence[tuple[str, ...]],
    model: Any,
    corrupted_tokens: Tensor,
    clean_cache: ActivationCache,
    metric: Any,
    kwargs: dict[str, Any],
) -> list[Union[Tensor, PatchingResult]]:
    """Run the sweeps of an ``_every`` helper; a requested baseline is computed once (by the first)."""
    kwargs = dict(kwargs)
    baseline = bool(kwargs.pop("baseline", False))
    results: list[Union[Tensor, PatchingResult]] = []
    for i, (sweep, names) in enumerate(zip(sweeps, axes)):
        out = sweep(model, corrupted_tokens, clean_cache, metric, baseline=baseline and i == 0, **kwargs)
        if baseline and isinstance(
            out, Tensor
        ):  # later sweeps return plain tensors: give them the result form
            out = PatchingResult(
                values=out,
                axis_names=list(names),
                index_df=make_df_from_ranges(list(out.shape), list(names)),
                metric_names=["metric"],
                reduced=True,
            )
        results.append(out)
    return results


def stack_results(
    results: Sequence[PatchingResult], axis_order: Sequence[str], n_heads: int, type_names: Sequence[str]
) -> PatchingResult:
    """Stack ``PatchingResult`` sweeps on a leading ``patch_type`` axis, as TransformerLens's ``_every``
    helpers do: each sweep's axes permuted to ``axis_order`` (``head_index`` / ``dest_pos`` read as
    ``head`` / ``pos``), GQA ``k`` / ``v`` head axes zero-padded to ``n_heads``, the metric axis first and
    the batch axis last; ``index_df`` one row per cell of the stacked values."""
    first = results[0]
    for r in results[1:]:
        if r.metric_names != first.metric_names or r.reduced != first.reduced:
            raise ValueError("every sweep must use the same metrics and reduce mode to be stacked")
    lead = 1 if first.has_metric_axis else 0
    head_axis = list(axis_order).index("head") if "head" in axis_order else None
    values = []
    for r in results:
        names = [_AXIS_RENAMES.get(n, n) for n in r.axis_names]
        perm = list(range(lead)) + [lead + names.index(n) for n in axis_order]
        v = r.values.permute(*perm, *range(lead + len(names), r.values.ndim))
        if head_axis is not None and v.shape[lead + head_axis] < n_heads:
            pad = list(v.shape)
            pad[lead + head_axis] = n_heads - v.shape[lead + head_axis]
            v = torch.cat([v, v.new_zeros(pad)], dim=lead + head_axis)
        values.append(v)
    stacked = torch.stack(values, dim=lead)
    cells = list(stacked.shape[lead : lead + 1 + len(axis_order)])
    return PatchingResult(
        values=stacked,
        axis_names=["patch_type", *axis_order],
        index_df=make_df_from_ranges(cells, ["patch_type", *axis_order]),
        metric_names=list(first.metric_names),
        reduced=first.reduced,
        baseline=first.baseline,
        has_metric_axis=first.has_metric_axis,
        patch_type_names=list(type_names),
    )


def pad_heads(tensors: list[Tensor], n_heads: int) -> list[Tensor]:
    """Zero-pad GQA ``k`` / ``v`` sweeps (indices 2 and 3) to ``n_heads`` on the last axis, as TL does."""
    for i in (2, 3):
        tensors[i] = torch.nn.functional.pad(tensors[i], (0, n_heads - tensors[i].size(-1)))
    return tensors


def stack_every(results: list, axis_order: tuple[str, ...], n_heads: int, type_names: tuple[str, ...]):
    if all(isinstance(r, Tensor) for r in results):
        return results  # the caller pads / rearranges and stacks
    if not all(isinstance(r, PatchingResult) for r in results):
        raise TypeError("cannot stack tensor and PatchingResult sweeps together")
    return stack_results(results, axis_order, n_heads, type_names)


__all__ = ["pad_heads", "run_sweeps", "stack_every", "stack_results"]
