"""Batched activation patching: a drop-in for ``transformer_lens.patching``.

``transformer_lens.patching.generic_activation_patch`` runs one forward pass per patched index in a
Python loop. This module has the same functions -- same names, arguments, meaning and return shapes
(``get_act_patch_resid_pre``, ``..._attn_head_out_by_pos``, ``..._every``, ``reduce=`` /
``baseline=`` / metric mappings and ``PatchingResult``) -- so changing the import is all a notebook
needs::

    from minterp_tl import patching          # was: from transformer_lens import patching
    out = patching.get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, metric)  # [n_layers, pos]

The difference is how the work is done: many patched copies of the corrupted batch run in one
batched forward pass (``[copies * batch, pos]``), each copy with its own patch applied by TL's own
patch setters, chunked so a chunk fits the memory budget. A patch that leaves the corrupted activation
bit-for-bit unchanged (e.g. before the first token where the prompts differ) runs no forward at all:
its value is the corrupted run's metric. On Hugging Face models (SmolLM2) what a
patch cannot change is not recomputed: a chunk of patches at blocks >= l0 and positions >= p0 starts
at block l0 from the corrupted run's residual and at position p0 from its key/value cache. Results equal TL's up to the rounding of
batched matrix products (``<= 1e-4`` in the tests).

Keyword arguments of our own, on every function: ``max_batch`` (the most sequences in one forward),
``memory_budget`` (bytes; default a quarter of the free memory), ``progress`` (a tqdm bar over
chunks) and ``skip_unchanged`` (default ``True``).

Also here:

- :func:`activation_patch` -- a sweep over any hook with layers / positions / heads given as specs
  (``layers="n//2:"``, ``positions="-3:"``), returning a :class:`PatchSweep` that can plot itself;
- metrics: :func:`logit_diff_metric`, :func:`prob_metric` (probability or log-probability of a token)
  and :func:`normalized_metric` ((patched - corrupted) / (clean - corrupted)); at ``position=-1``
  they mark themselves as reading only the last position, and patching then unembeds only that one;
- :func:`plot_heatmap` -- any ``layer x pos`` or ``layer x head`` result as a PNG.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Union

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache
from transformer_lens.patching import (
    PatchingResult,
    layer_head_dest_src_pos_pattern_patch_setter,
    layer_head_pattern_patch_setter,
    layer_head_pos_pattern_patch_setter,
    layer_head_vector_patch_setter,
    layer_pos_head_vector_patch_setter,
    layer_pos_patch_setter,
    make_df_from_ranges,
)
from transformer_lens.utilities import get_act_name

from minterp_tl._checks import token_ids
from minterp_tl._files import save_png
from minterp_tl._patch_engine import Patch, check_sizes, copies_per_forward, run_patched
from minterp_tl.fast_path import CorruptedRun, FastPathStatus, check, last_status
from minterp_tl.hooks import hook_layout, n_heads
from minterp_tl.interventions import Intervention, Step, apply_step
from minterp_tl.names import resolve_name
from minterp_tl.specs import SpecLike, resolve

MetricFn = Callable[[Float[Tensor, "batch pos d_vocab"]], Tensor]
"""A function from the patched logits of the corrupted batch to a scalar (or ``[batch]``) metric."""

_REDUCE_MODES = ("scalar", "mean", "none")


# --------------------------------------------------------------------------------------------------
# The TransformerLens-compatible API
# --------------------------------------------------------------------------------------------------


def generic_activation_patch(
    model: Any,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache: ActivationCache,
    patching_metric: Union[MetricFn, Mapping[str, MetricFn]],
    patch_setter: Callable[[Tensor, Sequence[int], Tensor], Tensor],
    activation_name: str,
    index_axis_names: Optional[Sequence[str]] = None,
    index_df: Any = None,
    return_index_df: bool = False,
    *,
    reduce: str = "scalar",
    baseline: bool = False,
    max_batch: Optional[int] = None,
    memory_budget: Optional[int] = None,
    progress: bool = True,
    skip_unchanged: bool = True,
) -> Union[Tensor, tuple[Tensor, Any], PatchingResult]:
    """``transformer_lens.patching.generic_activation_patch``, batched.

    Same arguments, meaning and return values as TransformerLens's function (see its docstring): for
    every index (a row of ``index_df``, or every combination of ``index_axis_names`` ranges, the first
    axis being the layer), patch the clean activation ``activation_name`` into the corrupted run with
    ``patch_setter`` and evaluate ``patching_metric`` on the patched logits.

    Args:
        model: The model (a ``TransformerBridge``).
        corrupted_tokens: ``[batch, pos]`` tokens of the corrupted run.
        clean_cache: Activations of the clean run (it needs ``activation_name`` at every patched layer).
        patching_metric: Logits ``[batch, pos, d_vocab]`` -> scalar (``reduce="scalar"``) or
            ``[batch]`` (``"mean"``, ``"none"``); or a mapping ``{name: metric}``.
        patch_setter: ``setter(corrupted_activation, index, clean_activation) -> patched`` (TL's setters).
        activation_name: A ``get_act_name`` short name (``"resid_pre"``, ``"z"``, ``"pattern"``, ...).
        index_axis_names: Axes to sweep: ``"layer"``, ``"pos"``, ``"head_index"``, ``"head"``,
            ``"src_pos"``, ``"dest_pos"``.
        index_df: Explicit indices (a pandas DataFrame, one row per patch); the output is then flat.
        return_index_df: Also return the index DataFrame (tensor return only).
        reduce: ``"scalar"``, ``"mean"`` or ``"none"`` (see TL).
        baseline: Also evaluate the unpatched corrupted run (returns a ``PatchingResult``).
        max_batch: The most sequences in one forward pass (see :func:`copies_per_forward`).
        memory_budget: Bytes one forward pass may use (default: a quarter of the free memory).
        progress: Show a progress bar over forward passes.
        skip_unchanged: Run no forward for a patch that leaves the corrupted activation bit-for-bit
            unchanged (clean and corrupted agree there, e.g. before the first differing token); its
            value is the metric of the corrupted run, exactly what the patched forward would give.

    Returns:
        As TL: a tensor shaped by the index axes (or flat with ``index_df``), optionally with the index
        DataFrame, or a ``PatchingResult`` when ``reduce="none"``, ``baseline=True`` or a metric
        mapping was given.
    """
    if reduce not in _REDUCE_MODES:
        raise ValueError(f"reduce must be one of {_REDUCE_MODES}, got {reduce!r}")
    if isinstance(patching_metric, Mapping):
        metrics = dict(patching_metric)
        if not metrics:
            raise ValueError("patching_metric mapping must contain at least one metric")
        has_metric_axis = True
    else:
        metrics, has_metric_axis = {"metric": patching_metric}, False
    want_result = has_metric_axis or reduce == "none" or baseline
    if want_result and return_index_df:
        raise ValueError("return_index_df only applies to the tensor return; a PatchingResult carries index_df")
    token_ids(model, corrupted_tokens, "corrupted_tokens")
    check_sizes(max_batch, memory_budget)

    if index_df is None:
        if index_axis_names is None:
            raise ValueError("give index_axis_names (e.g. ('layer', 'pos')) or index_df")
        heads_here = n_heads(model, f"attn.hook_{activation_name}")
        n_pos = int(corrupted_tokens.shape[-1])
        ranges = {"layer": model.cfg.n_layers, "pos": n_pos, "src_pos": n_pos, "dest_pos": n_pos,
                  "head_index": heads_here, "head": heads_here}
        unknown = [a for a in index_axis_names if a not in ranges]
        if unknown:
            raise ValueError(f"unknown index axis name(s) {unknown}; valid: {sorted(ranges)}")
        axis_ranges = [ranges[a] for a in index_axis_names]
        indices = [list(i) for i in itertools.product(*[range(r) for r in axis_ranges])]
        cell_shape: tuple[int, ...] = tuple(axis_ranges)
        flattened = False
    else:
        if index_axis_names is not None:
            raise ValueError("give index_axis_names or index_df, not both")
        indices = [[int(v) for v in row] for row in index_df.itertuples(index=False)]
        cell_shape = (len(indices),)
        flattened = True

    batch_size = int(corrupted_tokens.shape[0])
    per_example = reduce != "scalar"
    store = torch.zeros((len(metrics), *cell_shape, *((batch_size,) if per_example else ())),
                        device=model.cfg.device)

    def evaluate(logits: Tensor) -> Tensor:
        rows = []
        for name, fn in metrics.items():
            out = torch.as_tensor(fn(logits))
            if per_example and (out.ndim != 1 or out.shape[0] != batch_size):
                raise ValueError(
                    f"patching_metric {name!r} must return a [batch] tensor of length {batch_size} under "
                    f"reduce={reduce!r}, got shape {tuple(out.shape)}"
                )
            if not per_example and out.ndim != 0:
                raise ValueError(
                    f"patching_metric {name!r} must return a scalar under reduce='scalar', got shape "
                    f"{tuple(out.shape)}; return a [batch] tensor and pass reduce='mean' or 'none'"
                )
            rows.append(out.detach())
        return torch.stack(rows).to(store.dtype)

    baseline_values = None
    if baseline:
        with torch.no_grad():
            baseline_values = evaluate(model(corrupted_tokens))

    patches = []
    for index in indices:
        name = get_act_name(activation_name, index[0])
        if name not in clean_cache.cache_dict:
            raise ValueError(
                f"clean_cache has no {name!r}; run the clean pass with names_filter including it "
                f"(it holds {len(clean_cache.cache_dict)} entries)."
            )
        patches.append(Patch(name, patch_setter, index, clean_cache[name], index[0]))

    def store_values(i: int, logits: Tensor) -> None:
        values = evaluate(logits)
        if flattened:
            store[:, i] = values
        else:
            store[(slice(None), *indices[i])] = values

    run_patched(model, corrupted_tokens, patches, store_values,
                 max_batch=max_batch, memory_budget=memory_budget, progress=progress, skip_noops=skip_unchanged,
                 last_only=all(_reads_last_only(fn) for fn in metrics.values()))

    if reduce == "mean":
        store = store.mean(dim=-1)
        if baseline_values is not None:
            baseline_values = baseline_values.mean(dim=-1)
    if not want_result:
        if return_index_df:
            names = list(index_axis_names) if index_axis_names is not None else list(index_df.columns)
            df = index_df if index_df is not None else make_df_from_ranges(list(cell_shape), names)
            return store[0], df
        return store[0]
    df = index_df if index_df is not None else make_df_from_ranges(list(cell_shape), list(index_axis_names))
    return PatchingResult(
        values=store if has_metric_axis else store[0],
        axis_names=[] if flattened else list(index_axis_names or []),
        index_df=df,
        metric_names=list(metrics),
        reduced=reduce != "none",
        baseline=None if baseline_values is None else (baseline_values if has_metric_axis else baseline_values[0]),
        has_metric_axis=has_metric_axis,
    )


def _specialise(setter: Callable, name: str, axes: tuple[str, ...], doc: str) -> Callable:
    fn = partial(generic_activation_patch, patch_setter=setter, activation_name=name, index_axis_names=axes)
    fn.__doc__ = (
        f"{doc} Batched drop-in for ``transformer_lens.patching``'s function of the same name; see "
        f":func:`generic_activation_patch` for the arguments (``model, corrupted_tokens, clean_cache, "
        f"patching_metric``, ``reduce=``, ``baseline=``, ``max_batch=``, ``memory_budget=``, "
        f"``progress=``). Returns ``[{', '.join(axes)}]``."
    )
    return fn


get_act_patch_resid_pre = _specialise(layer_pos_patch_setter, "resid_pre", ("layer", "pos"), "Residual stream at the start of each block, by position.")
get_act_patch_resid_mid = _specialise(layer_pos_patch_setter, "resid_mid", ("layer", "pos"), "Residual stream between attention and MLP, by position.")
get_act_patch_attn_out = _specialise(layer_pos_patch_setter, "attn_out", ("layer", "pos"), "Output of each attention layer, by position.")
get_act_patch_mlp_out = _specialise(layer_pos_patch_setter, "mlp_out", ("layer", "pos"), "Output of each MLP layer, by position.")
get_act_patch_attn_head_out_by_pos = _specialise(layer_pos_head_vector_patch_setter, "z", ("layer", "pos", "head"), "Each head's output (z), by position.")
get_act_patch_attn_head_q_by_pos = _specialise(layer_pos_head_vector_patch_setter, "q", ("layer", "pos", "head"), "Each head's queries, by position.")
get_act_patch_attn_head_k_by_pos = _specialise(layer_pos_head_vector_patch_setter, "k", ("layer", "pos", "head"), "Each key/value head's keys, by position.")
get_act_patch_attn_head_v_by_pos = _specialise(layer_pos_head_vector_patch_setter, "v", ("layer", "pos", "head"), "Each key/value head's values, by position.")
get_act_patch_attn_head_pattern_by_pos = _specialise(layer_head_pos_pattern_patch_setter, "pattern", ("layer", "head_index", "dest_pos"), "Each head's attention pattern, by destination position.")
get_act_patch_attn_head_pattern_dest_src_pos = _specialise(layer_head_dest_src_pos_pattern_patch_setter, "pattern", ("layer", "head_index", "dest_pos", "src_pos"), "Each head's attention pattern, by destination and source position.")
get_act_patch_attn_head_out_all_pos = _specialise(layer_head_vector_patch_setter, "z", ("layer", "head"), "Each head's output (z) at every position at once.")
get_act_patch_attn_head_q_all_pos = _specialise(layer_head_vector_patch_setter, "q", ("layer", "head"), "Each head's queries at every position at once.")
get_act_patch_attn_head_k_all_pos = _specialise(layer_head_vector_patch_setter, "k", ("layer", "head"), "Each key/value head's keys at every position at once.")
get_act_patch_attn_head_v_all_pos = _specialise(layer_head_vector_patch_setter, "v", ("layer", "head"), "Each key/value head's values at every position at once.")
get_act_patch_attn_head_pattern_all_pos = _specialise(layer_head_pattern_patch_setter, "pattern", ("layer", "head_index"), "Each head's whole attention pattern.")

_HEAD_ALL_POS = (get_act_patch_attn_head_out_all_pos, get_act_patch_attn_head_q_all_pos,
                 get_act_patch_attn_head_k_all_pos, get_act_patch_attn_head_v_all_pos,
                 get_act_patch_attn_head_pattern_all_pos)
_HEAD_BY_POS = (get_act_patch_attn_head_out_by_pos, get_act_patch_attn_head_q_by_pos,
                get_act_patch_attn_head_k_by_pos, get_act_patch_attn_head_v_by_pos,
                get_act_patch_attn_head_pattern_by_pos)


_HEAD_TYPES = ("out", "q", "k", "v", "pattern")
_BLOCK_TYPES = ("resid_pre", "attn_out", "mlp_out")
_RESULT_AXIS_RENAMES = {"head_index": "head", "dest_pos": "pos"}


def _run_sweeps(
    sweeps: Sequence[Callable], axes: Sequence[tuple[str, ...]], model: Any, corrupted_tokens: Tensor,
    clean_cache: ActivationCache, metric: Any, kwargs: dict[str, Any],
) -> list[Union[Tensor, PatchingResult]]:
    """Run the sweeps of an ``_every`` helper; a requested baseline is computed once (by the first)."""
    kwargs = dict(kwargs)
    baseline = bool(kwargs.pop("baseline", False))
    results: list[Union[Tensor, PatchingResult]] = []
    for i, (sweep, names) in enumerate(zip(sweeps, axes)):
        out = sweep(model, corrupted_tokens, clean_cache, metric, baseline=baseline and i == 0, **kwargs)
        if baseline and isinstance(out, Tensor):  # later sweeps return plain tensors: give them the result form
            out = PatchingResult(values=out, axis_names=list(names),
                                 index_df=make_df_from_ranges(list(out.shape), list(names)),
                                 metric_names=["metric"], reduced=True)
        results.append(out)
    return results


def _stack_results(
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
        names = [_RESULT_AXIS_RENAMES.get(n, n) for n in r.axis_names]
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
        values=stacked, axis_names=["patch_type", *axis_order],
        index_df=make_df_from_ranges(cells, ["patch_type", *axis_order]), metric_names=list(first.metric_names),
        reduced=first.reduced, baseline=first.baseline, has_metric_axis=first.has_metric_axis,
        patch_type_names=list(type_names),
    )


def _pad_heads(tensors: list[Tensor], n_heads: int) -> list[Tensor]:
    """Zero-pad GQA ``k`` / ``v`` sweeps (indices 2 and 3) to ``n_heads`` on the last axis, as TL does."""
    for i in (2, 3):
        tensors[i] = torch.nn.functional.pad(tensors[i], (0, n_heads - tensors[i].size(-1)))
    return tensors


def _stack_every(results: list, axis_order: tuple[str, ...], n_heads: int, type_names: tuple[str, ...]):
    if all(isinstance(r, Tensor) for r in results):
        return results  # the caller pads / rearranges and stacks
    if not all(isinstance(r, PatchingResult) for r in results):
        raise TypeError("cannot stack tensor and PatchingResult sweeps together")
    return _stack_results(results, axis_order, n_heads, type_names)


def get_act_patch_attn_head_all_pos_every(
    model: Any, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache: ActivationCache, metric: Any, **kwargs: Any
) -> Union[Float[Tensor, "5 layer head"], PatchingResult]:
    """Every head (all positions at once) for out, q, k, v, pattern: ``[5, n_layers, n_heads]``, or a
    ``PatchingResult`` with a leading ``patch_type`` axis under ``reduce=`` / ``baseline=`` / a metric
    mapping (drop-in for TL's function of the same name; ``k`` / ``v`` zero-padded for GQA)."""
    results = _run_sweeps(_HEAD_ALL_POS, (("layer", "head"),) * 4 + (("layer", "head_index"),),
                          model, corrupted_tokens, clean_cache, metric, kwargs)
    out = _stack_every(results, ("layer", "head"), model.cfg.n_heads, _HEAD_TYPES)
    if isinstance(out, PatchingResult):
        return out
    return torch.stack(_pad_heads(list(out), model.cfg.n_heads), dim=0)


def get_act_patch_attn_head_by_pos_every(
    model: Any, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache: ActivationCache, metric: Any, **kwargs: Any
) -> Union[Float[Tensor, "5 layer pos head"], PatchingResult]:
    """Every head by position for out, q, k, v, pattern: ``[5, n_layers, pos, n_heads]``, or a
    ``PatchingResult`` as in :func:`get_act_patch_attn_head_all_pos_every` (drop-in for TL's function of
    the same name)."""
    results = _run_sweeps(_HEAD_BY_POS, (("layer", "pos", "head"),) * 4 + (("layer", "head_index", "dest_pos"),),
                          model, corrupted_tokens, clean_cache, metric, kwargs)
    out = _stack_every(results, ("layer", "pos", "head"), model.cfg.n_heads, _HEAD_TYPES)
    if isinstance(out, PatchingResult):
        return out
    tensors = _pad_heads(list(out), model.cfg.n_heads)
    tensors[4] = einops.rearrange(tensors[4], "layer head pos -> layer pos head")
    return torch.stack(tensors, dim=0)


def get_act_patch_block_every(
    model: Any, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache: ActivationCache, metric: Any, **kwargs: Any
) -> Union[Float[Tensor, "3 layer pos"], PatchingResult]:
    """resid_pre, attn_out and mlp_out by layer and position: ``[3, n_layers, pos]``, or a
    ``PatchingResult`` with a leading ``patch_type`` axis (drop-in for TL's function of the same name)."""
    results = _run_sweeps((get_act_patch_resid_pre, get_act_patch_attn_out, get_act_patch_mlp_out),
                          (("layer", "pos"),) * 3, model, corrupted_tokens, clean_cache, metric, kwargs)
    out = _stack_every(results, ("layer", "pos"), 0, _BLOCK_TYPES)
    return out if isinstance(out, PatchingResult) else torch.stack(list(out), dim=0)


def fast_path_status(
    model: Any, corrupted_tokens: Optional[Int[Tensor, "batch pos"]] = None
) -> Optional[FastPathStatus]:
    """How patching runs on ``model``: which starts of the fast path are on, and why a part is off.

    Args:
        model: The model.
        corrupted_tokens: ``[batch, pos]``: decide for a call on these tokens (runs the corrupted forward
            and the check). ``None``: the decision of the model's most recent patching call (``None``
            if there was none).

    Returns:
        A :class:`~minterp_tl.fast_path.FastPathStatus` (``layers``, ``positions``, ``last_only``,
        ``reason``). The decision is made per call: a prompt longer than a sliding attention window turns
        the position start off for that call only.
    """
    if corrupted_tokens is None:
        return last_status(model)
    return check(model, CorruptedRun(model, corrupted_tokens, set()), warn=False)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def _answer_logits(logits: Tensor, tokens: Union[int, Sequence[int], Tensor], position: int) -> Tensor:
    """``[batch]`` logits of one answer token per prompt at ``position``."""
    at = logits[:, position]
    idx = torch.as_tensor(tokens, device=logits.device).reshape(-1)
    if idx.numel() == 1:
        idx = idx.expand(at.shape[0])
    if idx.numel() != at.shape[0]:
        raise ValueError(f"give one answer token or one per prompt ({at.shape[0]}), got {idx.numel()}")
    return at.gather(-1, idx[:, None])[:, 0]


def logit_diff_metric(
    correct: Union[int, Sequence[int], Tensor],
    incorrect: Union[int, Sequence[int], Tensor],
    position: int = -1,
    reduce: str = "mean",
) -> MetricFn:
    """``logit[correct] - logit[incorrect]`` at ``position`` (one token, or one per prompt), averaged
    over the batch (``reduce="mean"``) or per prompt (``"none"``: a ``[batch]`` tensor)."""
    if reduce not in ("mean", "none"):
        raise ValueError(f"reduce must be 'mean' or 'none', got {reduce!r}")

    def metric(logits: Tensor) -> Tensor:
        diff = _answer_logits(logits, correct, position) - _answer_logits(logits, incorrect, position)
        return diff.mean() if reduce == "mean" else diff

    return _mark_last_only(metric, position)


def prob_metric(
    token: Union[int, Sequence[int], Tensor], position: int = -1, log: bool = False, reduce: str = "mean"
) -> MetricFn:
    """Probability (``log=True``: log-probability) of ``token`` at ``position``, averaged over the
    batch (``reduce="mean"``) or per prompt (``"none"``)."""
    if reduce not in ("mean", "none"):
        raise ValueError(f"reduce must be 'mean' or 'none', got {reduce!r}")

    def metric(logits: Tensor) -> Tensor:
        logp = _answer_logits(logits[:, [position]].log_softmax(-1), token, 0)
        value = logp if log else logp.exp()
        return value.mean() if reduce == "mean" else value

    return _mark_last_only(metric, position)


def normalized_metric(metric: MetricFn, clean_logits: Tensor, corrupted_logits: Tensor) -> MetricFn:
    """``(metric(patched) - metric(corrupted)) / (metric(clean) - metric(corrupted))``: 0 = the patch
    did nothing, 1 = it restored the clean run.

    Raises:
        ValueError: If the metric is the same on the clean and corrupted runs (no scale to normalise by).
    """
    with torch.no_grad():
        clean, corrupted = metric(clean_logits), metric(corrupted_logits)
    scale = clean - corrupted
    if bool((scale.abs() < 1e-8).any()):
        raise ValueError(
            f"normalized_metric: the metric is {float(clean.mean()):.6g} on both the clean and the corrupted "
            "run, so there is nothing to normalise by; choose prompts or a metric that tell them apart."
        )
    def normalized(logits: Tensor) -> Tensor:
        return (metric(logits) - corrupted) / scale

    normalized.reads_last_position_only = _reads_last_only(metric)  # type: ignore[attr-defined]
    return normalized


def _mark_last_only(metric: MetricFn, position: int) -> MetricFn:
    """Mark a metric that reads only the last position's logits, so patching may compute just those."""
    metric.reads_last_position_only = position == -1  # type: ignore[attr-defined]
    return metric


def _reads_last_only(metric: Any) -> bool:
    return bool(getattr(metric, "reads_last_position_only", False))


# --------------------------------------------------------------------------------------------------
# Spec-driven sweeps and plots
# --------------------------------------------------------------------------------------------------


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
        cols = self.positions if self.axis_names[1] == "pos" else self.heads
        labels = [f"{p} {self.labels[p]!r}" for p in cols] if self.labels and self.axis_names[1] == "pos" else [str(c) for c in cols]
        return plot_heatmap(self.values, path, row_labels=[str(l) for l in self.layers], col_labels=labels,
                            xlabel=self.axis_names[1], ylabel="layer", title=title or f"patching {self.hook}")


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
        raise ValueError(f"positions={positions!r} selects no position (n_positions={n_pos}); select at least one")
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

    grid = list(itertools.product(range(len(layer_idx)), range(len(pos_idx or [None])), range(len(head_idx or [None]))))
    patches = []
    for li, pi, hi in grid:
        name = names[li]
        if name not in clean_cache.cache_dict:
            raise ValueError(f"clean_cache has no {name!r}; cache it in the clean run.")
        index = (layer_idx[li], None if pos_idx is None else pos_idx[pi], None if head_idx is None else head_idx[hi])
        patches.append(Patch(name, _patch_setter(name, index, clean_cache[name]), index, clean_cache[name], index[0]))
    values = torch.zeros(len(grid))

    def on_logits(i: int, logits: Tensor) -> None:
        out = torch.as_tensor(metric(logits))
        if out.ndim != 0:
            raise ValueError(f"metric must return a scalar, got shape {tuple(out.shape)}")
        values[i] = float(out)

    run_patched(model, corrupted_tokens, patches, on_logits,
                 max_batch=max_batch, memory_budget=memory_budget, progress=progress, skip_noops=skip_unchanged,
                 last_only=_reads_last_only(metric))
    shape = [len(layer_idx)] + ([len(pos_idx)] if pos_idx is not None else []) + ([len(head_idx)] if head_idx is not None else [])
    axes = ("layer",) + (("pos",) if pos_idx is not None else ()) + (("head",) if head_idx is not None else ())
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
    record = Intervention(name, "patch", clean, positions=None if p is None else torch.tensor([[p]]),
                          heads=None if h is None else [h])
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
    im = ax.imshow(values.numpy(), aspect="auto", cmap="RdBu" if center else "viridis",
                   vmin=-vmax if center else None, vmax=vmax if center else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xticks(range(cols))
    ax.set_xticklabels(col_labels if col_labels is not None else [str(i) for i in range(cols)], rotation=90, fontsize=7)
    ax.set_yticks(range(rows))
    ax.set_yticklabels(row_labels if row_labels is not None else [str(i) for i in range(rows)], fontsize=7)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return save_png(fig, path)


__all__ = [
    "MetricFn",
    "PatchSweep",
    "activation_patch",
    "copies_per_forward",
    "fast_path_status",
    "generic_activation_patch",
    "get_act_patch_attn_head_all_pos_every",
    "get_act_patch_attn_head_by_pos_every",
    "get_act_patch_attn_head_k_all_pos",
    "get_act_patch_attn_head_k_by_pos",
    "get_act_patch_attn_head_out_all_pos",
    "get_act_patch_attn_head_out_by_pos",
    "get_act_patch_attn_head_pattern_all_pos",
    "get_act_patch_attn_head_pattern_by_pos",
    "get_act_patch_attn_head_pattern_dest_src_pos",
    "get_act_patch_attn_head_q_all_pos",
    "get_act_patch_attn_head_q_by_pos",
    "get_act_patch_attn_head_v_all_pos",
    "get_act_patch_attn_head_v_by_pos",
    "get_act_patch_attn_out",
    "get_act_patch_block_every",
    "get_act_patch_mlp_out",
    "get_act_patch_resid_mid",
    "get_act_patch_resid_pre",
    "logit_diff_metric",
    "normalized_metric",
    "plot_heatmap",
    "prob_metric",
]
