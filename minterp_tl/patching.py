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
its value is the corrupted run's metric. What a patch cannot change is not recomputed: a chunk of
patches at blocks >= l0 and positions >= p0 starts at block l0 from the corrupted run's residual and at
position p0 from its key/value cache (:mod:`minterp_tl.fast_path`; the engine is
:mod:`minterp_tl._patch_engine`). Results equal TL's up to the rounding of batched matrix products
(``<= 1e-4`` in the tests).

Keyword arguments of our own, on every function: ``max_batch`` (the most sequences in one forward),
``memory_budget`` (bytes; default a quarter of the free memory), ``progress`` (a tqdm bar over
chunks) and ``skip_unchanged`` (default ``True``).

Also here (re-exported from :mod:`minterp_tl.sweeps` and :mod:`minterp_tl.metrics`):

- :func:`activation_patch` -- a sweep over any hook with layers / positions / heads given as specs
  (``layers="n//2:"``, ``positions="-3:"``), returning a :class:`PatchSweep` that can plot itself;
- metrics: :func:`logit_diff_metric`, :func:`prob_metric` (probability or log-probability of a token)
  and :func:`normalized_metric` ((patched - corrupted) / (clean - corrupted)); at ``position=-1``
  they mark themselves as reading only the last position, and patching then unembeds only that one;
- :func:`plot_heatmap` -- any ``layer x pos`` or ``layer x head`` result as a PNG.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Optional, Union

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
from minterp_tl._direct_path import direct_path, source_index
from minterp_tl._patch_engine import Patch, check_sizes, copies_per_forward, run_patched
from minterp_tl._patch_results import pad_heads, run_sweeps, stack_every
from minterp_tl.fast_path import CorruptedRun, FastPathStatus, check, last_status
from minterp_tl.hooks import n_heads
from minterp_tl.metrics import (
    MetricFn,
    logit_diff_metric,
    normalized_metric,
    prob_metric,
    reads_last_position_only,
)
from minterp_tl.sweeps import PatchSweep, activation_patch, plot_heatmap

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
        progress: Show a progress bar over the patches that need a forward.
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
        raise ValueError(
            "return_index_df only applies to the tensor return; a PatchingResult carries index_df"
        )
    token_ids(model, corrupted_tokens, "corrupted_tokens")
    check_sizes(max_batch, memory_budget)

    if index_df is None:
        if index_axis_names is None:
            raise ValueError("give index_axis_names (e.g. ('layer', 'pos')) or index_df")
        heads_here = n_heads(model, f"attn.hook_{activation_name}")
        n_pos = int(corrupted_tokens.shape[-1])
        ranges = {
            "layer": model.cfg.n_layers,
            "pos": n_pos,
            "src_pos": n_pos,
            "dest_pos": n_pos,
            "head_index": heads_here,
            "head": heads_here,
        }
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
    store = torch.zeros(
        (len(metrics), *cell_shape, *((batch_size,) if per_example else ())), device=model.cfg.device
    )

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

    results = run_patched(
        model,
        corrupted_tokens,
        patches,
        evaluate,
        max_batch=max_batch,
        memory_budget=memory_budget,
        progress=progress,
        skip_noops=skip_unchanged,
        last_only=all(reads_last_position_only(fn) for fn in metrics.values()),
    ).to(store.device)
    for i, values in enumerate(results):
        if flattened:
            store[:, i] = values
        else:
            store[(slice(None), *indices[i])] = values  # type: ignore[index]

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
    names = list(index_df.columns) if index_df is not None else list(index_axis_names or ())
    df = index_df if index_df is not None else make_df_from_ranges(list(cell_shape), names)
    return PatchingResult(
        values=store if has_metric_axis else store[0],
        axis_names=[] if flattened else list(index_axis_names or []),
        index_df=df,
        metric_names=list(metrics),
        reduced=reduce != "none",
        baseline=None
        if baseline_values is None
        else (baseline_values if has_metric_axis else baseline_values[0]),
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


# One entry each, as a table: setter, activation, index axes, what it patches.
# fmt: off
get_act_patch_resid_pre = _specialise(
    layer_pos_patch_setter, "resid_pre", ("layer", "pos"),
    "Residual stream at the start of each block, by position.")
get_act_patch_resid_mid = _specialise(
    layer_pos_patch_setter, "resid_mid", ("layer", "pos"),
    "Residual stream between attention and MLP, by position.")
get_act_patch_attn_out = _specialise(
    layer_pos_patch_setter, "attn_out", ("layer", "pos"), "Output of each attention layer, by position.")
get_act_patch_mlp_out = _specialise(
    layer_pos_patch_setter, "mlp_out", ("layer", "pos"), "Output of each MLP layer, by position.")
get_act_patch_attn_head_out_by_pos = _specialise(
    layer_pos_head_vector_patch_setter, "z", ("layer", "pos", "head"), "Each head's output (z), by position.")
get_act_patch_attn_head_q_by_pos = _specialise(
    layer_pos_head_vector_patch_setter, "q", ("layer", "pos", "head"), "Each head's queries, by position.")
get_act_patch_attn_head_k_by_pos = _specialise(
    layer_pos_head_vector_patch_setter, "k", ("layer", "pos", "head"),
    "Each key/value head's keys, by position.")
get_act_patch_attn_head_v_by_pos = _specialise(
    layer_pos_head_vector_patch_setter, "v", ("layer", "pos", "head"),
    "Each key/value head's values, by position.")
get_act_patch_attn_head_pattern_by_pos = _specialise(
    layer_head_pos_pattern_patch_setter, "pattern", ("layer", "head_index", "dest_pos"),
    "Each head's attention pattern, by destination position.")
get_act_patch_attn_head_pattern_dest_src_pos = _specialise(
    layer_head_dest_src_pos_pattern_patch_setter, "pattern", ("layer", "head_index", "dest_pos", "src_pos"),
    "Each head's attention pattern, by destination and source position.")
get_act_patch_attn_head_out_all_pos = _specialise(
    layer_head_vector_patch_setter, "z", ("layer", "head"),
    "Each head's output (z) at every position at once.")
get_act_patch_attn_head_q_all_pos = _specialise(
    layer_head_vector_patch_setter, "q", ("layer", "head"), "Each head's queries at every position at once.")
get_act_patch_attn_head_k_all_pos = _specialise(
    layer_head_vector_patch_setter, "k", ("layer", "head"),
    "Each key/value head's keys at every position at once.")
get_act_patch_attn_head_v_all_pos = _specialise(
    layer_head_vector_patch_setter, "v", ("layer", "head"),
    "Each key/value head's values at every position at once.")
get_act_patch_attn_head_pattern_all_pos = _specialise(
    layer_head_pattern_patch_setter, "pattern", ("layer", "head_index"),
    "Each head's whole attention pattern.")
# fmt: on

_HEAD_ALL_POS = (
    get_act_patch_attn_head_out_all_pos,
    get_act_patch_attn_head_q_all_pos,
    get_act_patch_attn_head_k_all_pos,
    get_act_patch_attn_head_v_all_pos,
    get_act_patch_attn_head_pattern_all_pos,
)
_HEAD_BY_POS = (
    get_act_patch_attn_head_out_by_pos,
    get_act_patch_attn_head_q_by_pos,
    get_act_patch_attn_head_k_by_pos,
    get_act_patch_attn_head_v_by_pos,
    get_act_patch_attn_head_pattern_by_pos,
)


_HEAD_TYPES = ("out", "q", "k", "v", "pattern")
_BLOCK_TYPES = ("resid_pre", "attn_out", "mlp_out")


def get_act_patch_attn_head_all_pos_every(
    model: Any,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache: ActivationCache,
    metric: Any,
    **kwargs: Any,
) -> Union[Float[Tensor, "5 layer head"], PatchingResult]:
    """Every head (all positions at once) for out, q, k, v, pattern: ``[5, n_layers, n_heads]``, or a
    ``PatchingResult`` with a leading ``patch_type`` axis under ``reduce=`` / ``baseline=`` / a metric
    mapping (drop-in for TL's function of the same name; ``k`` / ``v`` zero-padded for GQA)."""
    results = run_sweeps(
        _HEAD_ALL_POS,
        (("layer", "head"),) * 4 + (("layer", "head_index"),),
        model,
        corrupted_tokens,
        clean_cache,
        metric,
        kwargs,
    )
    out = stack_every(results, ("layer", "head"), model.cfg.n_heads, _HEAD_TYPES)
    if isinstance(out, PatchingResult):
        return out
    return torch.stack(pad_heads(list(out), model.cfg.n_heads), dim=0)


def get_act_patch_attn_head_by_pos_every(
    model: Any,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache: ActivationCache,
    metric: Any,
    **kwargs: Any,
) -> Union[Float[Tensor, "5 layer pos head"], PatchingResult]:
    """Every head by position for out, q, k, v, pattern: ``[5, n_layers, pos, n_heads]``, or a
    ``PatchingResult`` as in :func:`get_act_patch_attn_head_all_pos_every` (drop-in for TL's function of
    the same name)."""
    results = run_sweeps(
        _HEAD_BY_POS,
        (("layer", "pos", "head"),) * 4 + (("layer", "head_index", "dest_pos"),),
        model,
        corrupted_tokens,
        clean_cache,
        metric,
        kwargs,
    )
    out = stack_every(results, ("layer", "pos", "head"), model.cfg.n_heads, _HEAD_TYPES)
    if isinstance(out, PatchingResult):
        return out
    tensors = pad_heads(list(out), model.cfg.n_heads)
    tensors[4] = einops.rearrange(tensors[4], "layer head pos -> layer pos head")
    return torch.stack(tensors, dim=0)


def get_act_patch_block_every(
    model: Any,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache: ActivationCache,
    metric: Any,
    **kwargs: Any,
) -> Union[Float[Tensor, "3 layer pos"], PatchingResult]:
    """resid_pre, attn_out and mlp_out by layer and position: ``[3, n_layers, pos]``, or a
    ``PatchingResult`` with a leading ``patch_type`` axis (drop-in for TL's function of the same name)."""
    results = run_sweeps(
        (get_act_patch_resid_pre, get_act_patch_attn_out, get_act_patch_mlp_out),
        (("layer", "pos"),) * 3,
        model,
        corrupted_tokens,
        clean_cache,
        metric,
        kwargs,
    )
    out = stack_every(results, ("layer", "pos"), 0, _BLOCK_TYPES)
    return out if isinstance(out, PatchingResult) else torch.stack(list(out), dim=0)


def get_act_patch_direct_path(
    model: Any,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache: ActivationCache,
    corrupted_cache: ActivationCache,
    patching_metric: Callable[[Tensor], Tensor],
    src_layer: int,
    src_head: int,
    component: str = "q",
    verbose: bool = True,
    *,
    max_batch: Optional[int] = None,
    memory_budget: Optional[int] = None,
) -> Float[Tensor, "n_layers dst_heads"]:
    """Patch one source head's output into each later head's query, key or value input alone (direct
    path patching, Wang et al. 2022; TransformerLens's function, batched).

    The source's clean-minus-corrupted write ``z @ W_O`` is added at every position to the destination
    head's own copy of the residual before ``ln1``, while every other reader still sees the source's
    corrupted output: the exact edge intervention. Many edges run per forward; each joins at its
    destination block.

    Args:
        model: The model (not post-norm; in eval mode).
        corrupted_tokens: ``[batch, pos]`` corrupted token ids.
        clean_cache: Cache of the clean run; holds ``blocks.{src_layer}.attn.hook_z``.
        corrupted_cache: Cache of the corrupted run; holds the same ``hook_z``.
        patching_metric: Logits ``[batch, pos, d_vocab]`` -> scalar.
        src_layer: Layer of the source head (negatives count from the end).
        src_head: Index of the source head.
        component: The destination input: ``"q"`` (default), ``"k"`` or ``"v"``. On GQA/MQA models (which
            TransformerLens refuses for ``"k"`` / ``"v"``) each key/value head is one destination: the
            path into the key or value input that its query heads share.
        verbose: Show a progress bar.
        max_batch: The most sequences in one forward pass (see :func:`copies_per_forward`).
        memory_budget: Bytes one forward pass may use (default: a quarter of the free memory).

    Returns:
        ``[n_layers, dst_heads]`` (``dst_heads``: ``n_heads``, or ``n_key_value_heads`` for ``"k"`` / ``"v"``
        on GQA/MQA): the metric with the path into that head patched; rows ``<= src_layer`` are 0.0.
    """
    source = source_index(model, src_layer, src_head)
    return direct_path(
        model,
        corrupted_tokens,
        clean_cache,
        corrupted_cache,
        patching_metric,
        [source],
        component,
        verbose=verbose,
        max_batch=max_batch,
        memory_budget=memory_budget,
    )[0]


def get_act_patch_direct_path_all_sources(
    model: Any,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache: ActivationCache,
    corrupted_cache: ActivationCache,
    patching_metric: Callable[[Tensor], Tensor],
    component: str = "q",
    verbose: bool = True,
    *,
    max_batch: Optional[int] = None,
    memory_budget: Optional[int] = None,
) -> Float[Tensor, "n_layers n_heads n_layers dst_heads"]:
    """:func:`get_act_patch_direct_path` from every source head, all edges batched together.

    Returns:
        ``[n_layers, n_heads, n_layers, dst_heads]``: ``[sl, sh, dl, dh]`` is the metric with the path
        from head ``(sl, sh)`` into head ``(dl, dh)`` patched; 0.0 where ``dl <= sl``.
    """
    n_layers, heads = int(model.cfg.n_layers), n_heads(model, "attn.hook_z")
    sources = [(layer, head) for layer in range(n_layers) for head in range(heads)]
    out = direct_path(
        model,
        corrupted_tokens,
        clean_cache,
        corrupted_cache,
        patching_metric,
        sources,
        component,
        verbose=verbose,
        max_batch=max_batch,
        memory_budget=memory_budget,
    )
    return out.reshape(n_layers, heads, *out.shape[1:])


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
    "get_act_patch_direct_path",
    "get_act_patch_direct_path_all_sources",
    "get_act_patch_mlp_out",
    "get_act_patch_resid_mid",
    "get_act_patch_resid_pre",
    "logit_diff_metric",
    "normalized_metric",
    "plot_heatmap",
    "prob_metric",
]
