"""Attribution patching: every activation-patching sweep, estimated from one forward and one backward.

Activation patching (:mod:`minterp_tl.patching`) runs the corrupted prompt once per patched index,
with the clean activation written into that one slice. Attribution patching (Nanda, 2023) estimates
all of those runs at once with a first-order Taylor expansion around the corrupted run::

    metric(patched) - metric(corrupted)  ~=  sum over the patched slice of
                                             (clean_act - corrupted_act) * d metric / d act

where the gradient is taken on the corrupted run. One forward pass (caching the hooked activations)
and one backward pass give the gradient at every hook, so a whole ``layer x pos x head`` grid costs
about two forward passes instead of one per cell. The estimate is exact where the metric is linear in
the activation and degrades where patching changes the run a lot (an early-layer residual patch
that restores the whole answer, saturated softmaxes). The intended use is to *screen fast and confirm
with real patching*: rank the cells by attribution, patch the top ones for real, and report how well
the two agree with :func:`compare`.

Contents, top to bottom:

- :func:`attribution_patch` -- the sweep over any per-layer hook, with layers / positions / heads
  given as specs exactly as :func:`minterp_tl.patching.activation_patch` takes them, returning an
  :class:`AttributionSweep` (``values`` are estimated *changes* of the metric;
  :attr:`AttributionSweep.estimate` adds the corrupted run's metric back so it is directly comparable
  with a :class:`~minterp_tl.patching.PatchSweep`);
- drop-ins shaped like :mod:`minterp_tl.patching`'s (and TransformerLens's) sweeps:
  :func:`get_attr_patch_resid_pre`, :func:`get_attr_patch_attn_out`, :func:`get_attr_patch_mlp_out`
  (``[n_layers, pos]``), :func:`get_attr_patch_attn_head_out_all_pos` (``[n_layers, n_heads]``) and
  :func:`get_attr_patch_attn_head_out_by_pos` (``[n_layers, pos, n_heads]``);
- :func:`compare` -> :class:`AgreementReport`: Pearson and Spearman correlation, top-k overlap and
  the largest absolute error between attribution and patching effects.

How the gradient is taken: each needed hook returns ``act + delta`` with ``delta`` a zero tensor that
requires grad, so the forward is unchanged and ``torch.autograd.grad(metric, deltas)`` is the
gradient with respect to each hook's activation as the rest of the model consumes it -- whether or
not the model's parameters require grad, and without accumulating anything into any ``.grad``. The
hooks are added with ``model.hooks(...)`` and are gone when the call returns or raises.

Sums: the product is summed over the batch (metrics such as
:func:`~minterp_tl.patching.logit_diff_metric` already average over the batch, so the gradient
carries the ``1 / batch``) and over every axis that is not swept: ``positions=None`` sums over all
positions (patching the layer at every position at once), ``heads=None`` sums over all heads, and the
feature axis (``d_model``, ``d_head``, key positions of ``pattern``) is always summed.

Every bad input is a ``ValueError`` that names it and says what would be valid.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache

from minterp_tl import distributed
from minterp_tl._checks import token_ids
from minterp_tl.hooks import hook_layout, n_heads
from minterp_tl.metrics import MetricFn
from minterp_tl.names import resolve_name
from minterp_tl.specs import SpecLike, resolve
from minterp_tl.sweeps import PatchSweep

CleanInput = Union[Int[Tensor, "batch pos"], ActivationCache, Mapping[str, Tensor]]
"""What :func:`attribution_patch` takes as the clean run: tokens, or a cache of its activations."""


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class AttributionSweep(PatchSweep):
    """The result of :func:`attribution_patch`.

    Attributes:
        values: Estimated metric *changes* ``metric(patched) - metric(corrupted)``, shaped
            ``[len(layers), len(positions) or len(heads) ...]`` (axes as ``axis_names``).
        axis_names: ``("layer", "pos")``, ``("layer", "head")`` or ``("layer", "pos", "head")``.
        layers / positions / heads: The indices each axis stands for (``None``: summed over).
        hook: The hook name as given (``"resid_pre"``, ``"z"``, ...).
        labels: Token strings for the positions (single prompt with a tokenizer only).
        corrupted_metric: The metric on the unpatched corrupted run.
    """

    corrupted_metric: Optional[float] = None

    @property
    def estimate(self) -> Tensor:
        """``corrupted_metric + values``: the estimated metric of each patched run, on the same scale
        as :class:`~minterp_tl.patching.PatchSweep` ``values`` and the ``get_act_patch_*`` results."""
        if self.corrupted_metric is None:
            raise ValueError("this sweep has no corrupted_metric, so only the changes (values) are known.")
        return self.values + self.corrupted_metric

    def plot(self, path: Union[str, Path], title: Optional[str] = None) -> Path:
        """Heatmap PNG of a 2-D sweep (``layer x pos`` or ``layer x head``) of the estimated changes."""
        return super().plot(path, title=title or f"attribution patching {self.hook}")


# --------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------


def _check_tokens(model: Any, tokens: Any, what: str) -> Tensor:
    """``tokens`` as a ``[batch, pos]`` integer tensor of ids in ``range(d_vocab)`` (not a cache given in
    the wrong place)."""
    if isinstance(tokens, (ActivationCache, Mapping)):
        raise ValueError(
            f"{what} must be tokens, got a cache; the argument order is "
            "attribution_patch(model, clean_tokens_or_cache, corrupted_tokens, metric, ...)."
        )
    return token_ids(model, tokens, what)


def _cache_lookup(model: Any, cache: Union[ActivationCache, Mapping[str, Tensor]], name: str) -> Tensor:
    """The cached activation of hook ``name``, under its canonical name or any alias of its hook point."""
    entries = cache.cache_dict if isinstance(cache, ActivationCache) else cache
    if name in entries:
        return entries[name]
    point = model.hook_dict.get(name)
    for alias, other in model.hook_dict.items():
        if other is point and alias in entries:
            return entries[alias]
    raise ValueError(
        f"the clean cache has no {name!r} (it holds {len(entries)} entries); run the clean pass with "
        f"names_filter including it, or pass the clean tokens instead of a cache."
    )


def _nonempty(indices: list[int], spec: SpecLike, what: str) -> list[int]:
    if not indices:
        raise ValueError(f"{what} spec {spec!r} selects no {what}s; select at least one.")
    return indices


def attribution_patch(
    model: Any,
    clean: CleanInput,
    corrupted_tokens: Int[Tensor, "batch pos"],
    metric: MetricFn,
    hook: str = "resid_pre",
    *,
    layers: SpecLike = "all",
    positions: SpecLike = "all",
    heads: SpecLike = None,
) -> AttributionSweep:
    """Estimate patching the clean ``hook`` into the corrupted run at every layer x position (x head).

    One forward and one backward pass on the corrupted tokens give, for every selected index,
    ``sum over the slice of (clean_act - corrupted_act) * d metric / d act`` -- the first-order
    estimate of ``metric(patched) - metric(corrupted)`` that
    :func:`minterp_tl.patching.activation_patch` measures with one forward pass per index.

    Args:
        model: The model (a ``TransformerBridge``).
        clean: The clean run: ``[batch, pos]`` tokens (run once with ``run_with_cache``, caching only
            the hooks needed), or an ``ActivationCache`` / mapping holding ``hook`` at every selected
            layer (under its canonical name or an alias), shaped like the corrupted run's activation
            (a batch of 1 is broadcast).
        corrupted_tokens: ``[batch, pos]`` token ids of the corrupted run.
        metric: Logits ``[batch, pos, d_vocab]`` -> a scalar tensor, differentiable in the logits.
        hook: Any per-layer name :func:`minterp_tl.names.resolve_name` accepts (``"resid_pre"``,
            ``"attn_out"``, ``"z"``, ``"pattern"``, ``"mlp.hook_post"``, ...).
        layers: Layer spec (``"all"``, ``"n//2:"``, ``[0, 5]``, ...).
        positions: Position spec (``"all"``, ``"-3:"``, ...); ``None``: summed over all positions (a
            ``layer x head`` sweep). For ``pattern`` / ``attn_scores`` these are query positions.
        heads: Head spec for hooks with a head axis (key / value heads for ``k`` / ``v`` under
            grouped-query attention); ``None``: summed over heads.

    Returns:
        An :class:`AttributionSweep` with values ``[layers, positions]``, ``[layers, heads]`` or
        ``[layers, positions, heads]``.

    Raises:
        ValueError: If the tokens are not ``[batch, pos]`` ids in the vocabulary; ``hook`` is not a
            per-layer name; a spec is invalid, out of range or selects nothing; ``heads`` is given for
            a hook without a head axis or ``positions`` for one without a position axis; neither
            positions nor heads are swept; the cache lacks a needed activation or its shape does not
            match the corrupted run's; or the metric is not a scalar that depends on the logits.
    """
    corrupted_tokens = _check_tokens(model, corrupted_tokens, "corrupted_tokens")
    if not callable(metric):
        raise ValueError(f"metric must be a function logits -> scalar tensor, got {type(metric).__name__}")
    if torch.is_inference_mode_enabled():
        raise ValueError(
            "attribution_patch needs autograd, but it was called under torch.inference_mode(); "
            "call it outside that block (torch.no_grad() around it is fine)."
        )
    n_pos = int(corrupted_tokens.shape[1])
    layer_idx = _nonempty(resolve(layers, model.cfg.n_layers, what="layer"), layers, "layer")
    names = [resolve_name(model, hook, l) for l in layer_idx]
    if len(set(names)) != len(names):
        raise ValueError(
            f"hook {hook!r} names the same hook point at every layer ({names[0]!r}); "
            "give a per-layer name without a layer, such as 'resid_pre' or 'attn.hook_z'."
        )
    pos_axis, head_axis = hook_layout(names[0], 4)
    pos_idx = None
    if positions is not None:
        if pos_axis is None:
            raise ValueError(
                f"positions={positions!r} given for {names[0]}, which has no position axis; "
                "pass positions=None."
            )
        pos_idx = _nonempty(resolve(positions, n_pos, what="position"), positions, "position")
    head_idx = None
    if heads is not None:
        if head_axis is None:
            raise ValueError(
                f"heads={heads!r} given for {names[0]}, which has no head axis; valid only for "
                "hooks with one (q, k, v, z, result, pattern, attn_scores)."
            )
        head_idx = _nonempty(resolve(heads, n_heads(model, names[0]), what="head"), heads, "head")
    if pos_idx is None and head_idx is None:
        raise ValueError(
            "attribution_patch needs positions, heads, or both to sweep over "
            "(positions=None and heads=None leaves nothing)."
        )

    world = distributed.world()
    batch = int(corrupted_tokens.shape[0])
    mine = world.rows(batch)  # this rank's prompts (all of them in one process)
    if isinstance(clean, (ActivationCache, Mapping)):
        clean_acts = [_cache_lookup(model, clean, name) for name in names]
        clean_acts = [a[mine] if a.ndim > 0 and a.shape[0] == batch else a for a in clean_acts]
    else:
        clean_tokens = _check_tokens(model, clean, "clean (tokens)")
        if clean_tokens.shape[0] == batch:
            clean_tokens = clean_tokens[mine]
        clean_acts = []
        if mine.stop > mine.start:  # (a rank without prompts needs no clean run)
            wanted = set(names)
            with torch.no_grad():
                _, cache = model.run_with_cache(clean_tokens, names_filter=lambda n: n in wanted)
            clean_acts = [_cache_lookup(model, cache, name) for name in names]

    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def make_hook(name: str):
        def store(act: Tensor, hook: Any = None) -> Tensor:
            if name in seen:
                raise ValueError(
                    f"hook {name!r} ran twice in one forward pass; attribution patching needs "
                    "one activation per hook."
                )
            if not act.is_floating_point():
                raise ValueError(f"hook {name!r} carries a {act.dtype} tensor, which has no gradient.")
            delta = torch.zeros_like(act, requires_grad=True)
            seen[name] = (act.detach(), delta)
            return act + delta

        return store

    keep = [a for a, idx in ((pos_axis, pos_idx), (head_axis, head_idx)) if idx is not None]

    def _summed(name: str, clean_act: Tensor, grad: Optional[Tensor]) -> Tensor:
        """``(clean - corrupted) * grad`` at hook ``name``, summed over this rank's prompts and every axis
        not swept, as ``[pos]``, ``[head]`` or ``[pos, head]`` (on the CPU)."""
        corrupted_act = seen[name][0]
        clean_act = clean_act.to(corrupted_act.device)
        if clean_act.shape != corrupted_act.shape and not (
            clean_act.ndim == corrupted_act.ndim
            and clean_act.shape[0] == 1
            and clean_act.shape[1:] == corrupted_act.shape[1:]
        ):
            raise ValueError(
                f"clean {name} has shape {tuple(clean_act.shape)} but the corrupted run's is "
                f"{tuple(corrupted_act.shape)}; the runs need the same number of positions (and the same "
                "batch, or a clean batch of 1), and the cache must keep its batch axis."
            )
        if grad is None:  # the metric does not depend on this hook at all
            grad = torch.zeros_like(corrupted_act)
        product = (clean_act.float() - corrupted_act.float()) * grad.float()
        summed = product.sum(dim=[a for a in range(product.ndim) if a not in keep])
        # pattern / attn_scores are [head, pos]: give [pos, head]
        if len(keep) == 2 and head_axis is not None and pos_axis is not None and head_axis < pos_axis:
            summed = summed.transpose(0, 1)
        return summed.detach().cpu()

    local_tokens = corrupted_tokens[mine]
    local: Optional[Tensor] = None
    with torch.enable_grad(), model.hooks(fwd_hooks=[(name, make_hook(name)) for name in names]):

        def forward() -> Optional[Tensor]:
            """This rank's logits; what the other ranks need of them (detached, on the CPU)."""
            nonlocal local
            if local_tokens.shape[0] == 0:  # more ranks than prompts
                return None
            local = model(local_tokens)
            missing = [n for n in names if n not in seen]
            if missing:
                raise ValueError(
                    f"hook(s) {missing} did not run in the forward pass, so they cannot be attributed."
                )
            return local.detach().cpu() if world.size > 1 else None

        parts = world.exchange(forward)
        # the metric sees every rank's logits; its gradient flows into this rank's own
        mixed = [local if r == world.rank else part for r, part in enumerate(parts)]
        pieces = [p.to(model.cfg.device) for p in mixed if p is not None]
        logits = pieces[0] if len(pieces) == 1 else torch.cat(pieces)

        def attribute() -> tuple[float, Optional[list[Tensor]]]:
            """The metric, and this rank's products summed over its prompts and the unswept axes."""
            out = metric(logits)
            if not isinstance(out, Tensor) or out.ndim != 0:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(
                    f"metric must return a scalar tensor, got {shape}; average over the batch "
                    "(as patching.logit_diff_metric does with reduce='mean')."
                )
            if local is None:
                return float(out.detach()), None
            if not out.requires_grad:
                raise ValueError(
                    "metric's value does not depend on the logits through autograd (did it call "
                    ".item(), .detach() or torch.no_grad()?); attribution needs its gradient."
                )
            grads = torch.autograd.grad(out, [seen[n][1] for n in names], allow_unused=True)
            return float(out.detach()), [_summed(*args) for args in zip(names, clean_acts, grads)]

        shares = world.exchange(attribute)
    corrupted_metric = shares[0][0]

    rows = []
    for k, name in enumerate(names):
        summed = functools.reduce(torch.add, [share[1][k] for share in shares if share[1] is not None])
        if head_idx is not None and summed.shape[-1] <= max(head_idx):
            raise ValueError(f"{name} has {summed.shape[-1]} heads but heads selects {max(head_idx)}.")
        if pos_idx is not None:
            summed = summed[torch.as_tensor(pos_idx, device=summed.device)]
        if head_idx is not None:
            summed = summed[..., torch.as_tensor(head_idx, device=summed.device)]
        rows.append(summed)
    axes = (
        ("layer",) + (("pos",) if pos_idx is not None else ()) + (("head",) if head_idx is not None else ())
    )
    labels = None
    if getattr(model, "tokenizer", None) is not None and corrupted_tokens.shape[0] == 1:
        labels = list(model.to_str_tokens(corrupted_tokens[0]))
    return AttributionSweep(
        torch.stack(rows), axes, layer_idx, pos_idx, head_idx, hook, labels, corrupted_metric
    )


# --------------------------------------------------------------------------------------------------
# Drop-ins shaped like the patching sweeps
# --------------------------------------------------------------------------------------------------


def get_attr_patch_resid_pre(
    model: Any, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache: CleanInput, metric: MetricFn
) -> Float[Tensor, "n_layers pos"]:
    """Residual stream at the start of each block, by position: the attribution estimate of
    ``patching.get_act_patch_resid_pre`` *minus the corrupted metric* (changes, not values)."""
    return attribution_patch(model, clean_cache, corrupted_tokens, metric, "resid_pre").values


def get_attr_patch_attn_out(
    model: Any, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache: CleanInput, metric: MetricFn
) -> Float[Tensor, "n_layers pos"]:
    """Output of each attention layer, by position (estimate of ``get_act_patch_attn_out`` minus the
    corrupted metric)."""
    return attribution_patch(model, clean_cache, corrupted_tokens, metric, "attn_out").values


def get_attr_patch_mlp_out(
    model: Any, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache: CleanInput, metric: MetricFn
) -> Float[Tensor, "n_layers pos"]:
    """Output of each MLP layer, by position (estimate of ``get_act_patch_mlp_out`` minus the corrupted
    metric)."""
    return attribution_patch(model, clean_cache, corrupted_tokens, metric, "mlp_out").values


def get_attr_patch_attn_head_out_all_pos(
    model: Any, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache: CleanInput, metric: MetricFn
) -> Float[Tensor, "n_layers n_heads"]:
    """Each head's output (``z``) at every position at once (estimate of
    ``get_act_patch_attn_head_out_all_pos`` minus the corrupted metric)."""
    return attribution_patch(
        model, clean_cache, corrupted_tokens, metric, "z", positions=None, heads="all"
    ).values


def get_attr_patch_attn_head_out_by_pos(
    model: Any, corrupted_tokens: Int[Tensor, "batch pos"], clean_cache: CleanInput, metric: MetricFn
) -> Float[Tensor, "n_layers pos n_heads"]:
    """Each head's output (``z``), by position (estimate of ``get_act_patch_attn_head_out_by_pos``
    minus the corrupted metric)."""
    return attribution_patch(
        model, clean_cache, corrupted_tokens, metric, "z", positions="all", heads="all"
    ).values


# --------------------------------------------------------------------------------------------------
# Agreement with real patching
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgreementReport:
    """How well attribution patching agrees with activation patching over the same indices.

    Attributes:
        n: Number of indices compared.
        pearson: Pearson correlation of the two (``nan`` if either is constant).
        spearman: Spearman rank correlation (Pearson of the ranks, ties get their average rank).
        k: The ``k`` of the top-k overlap (``min(k, n)``).
        top_k_overlap: Fraction of patching's ``k`` largest-``|value|`` indices that are also among
            attribution's ``k`` largest.
        same_top: Whether the single largest-``|value|`` index is the same for both.
        max_abs_error: ``max |attribution - patching|``.
    """

    n: int
    pearson: float
    spearman: float
    k: int
    top_k_overlap: float
    same_top: bool
    max_abs_error: float

    def __str__(self) -> str:
        hits = round(self.top_k_overlap * self.k)
        return (
            f"attribution vs patching over {self.n} indices: pearson {self.pearson:.3f}, spearman "
            f"{self.spearman:.3f}, top-{self.k} overlap {hits}/{self.k}, top index "
            f"{'agrees' if self.same_top else 'differs'}, max |error| {self.max_abs_error:.4g}"
        )


def _as_values(x: Any, what: str) -> Tensor:
    """A flat float tensor from a tensor, a sweep or a ``PatchingResult`` (anything with ``.values``)."""
    if not isinstance(x, Tensor) and isinstance(getattr(x, "values", None), Tensor):
        x = x.values
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"{what} must be a tensor (or a sweep with .values), got {type(x).__name__}"
            ) from None
    x = x.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} has non-finite values (nan or inf); compare only finite results.")
    return x


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else math.nan


def _ranks(x: Tensor) -> Tensor:
    """0-based ranks of ``x`` (ascending), tied values sharing their average rank."""
    sorted_x, order = x.sort()
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0)
    average = (ends - counts + ends - 1).to(torch.float64) / 2
    ranks = torch.empty_like(x)
    ranks[order] = average[inverse]
    return ranks


def compare(
    attribution_values: Any, patching_values: Any, *, k: int = 5, baseline: Optional[float] = None
) -> AgreementReport:
    """Agreement of attribution patching with activation patching over the same indices.

    Attribution estimates the *change* of the metric, so ``patching_values`` should be patching
    effects ``metric(patched) - metric(corrupted)``. The ``get_act_patch_*`` functions and
    :class:`~minterp_tl.patching.PatchSweep` return the patched metric itself: pass the corrupted
    run's metric as ``baseline`` (e.g. ``sweep.corrupted_metric`` of the :class:`AttributionSweep`) to
    have it subtracted. The correlations do not depend on this; the top-k overlap and the error do.

    Args:
        attribution_values: Attribution results (a tensor or an :class:`AttributionSweep`).
        patching_values: Patching results of the same shape (a tensor, a ``PatchSweep`` or a
            ``PatchingResult``).
        k: How many of the largest-``|value|`` indices the top-k overlap looks at (at most ``n``).
        baseline: Subtracted from ``patching_values`` first.

    Returns:
        An :class:`AgreementReport`; ``str(report)`` is a one-line summary.

    Raises:
        ValueError: If the shapes differ, there are fewer than 2 values, a value is not finite, or
            ``k`` is not a positive int.
    """
    a = _as_values(attribution_values, "attribution_values")
    p = _as_values(patching_values, "patching_values")
    if a.shape != p.shape:
        raise ValueError(
            f"attribution_values has shape {tuple(a.shape)} but patching_values has "
            f"{tuple(p.shape)}; compare results over the same indices."
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if baseline is not None:
        p = p - float(baseline)
    a, p = a.reshape(-1), p.reshape(-1)
    n = a.numel()
    if n < 2:
        raise ValueError(f"compare needs at least 2 values to correlate, got {n}")
    k = min(k, n)
    top_p = set(p.abs().topk(k).indices.tolist())
    top_a = set(a.abs().topk(k).indices.tolist())
    return AgreementReport(
        n=n,
        pearson=_pearson(a, p),
        spearman=_pearson(_ranks(a), _ranks(p)),
        k=k,
        top_k_overlap=len(top_p & top_a) / k,
        same_top=int(a.abs().argmax()) == int(p.abs().argmax()),
        max_abs_error=float((a - p).abs().max()),
    )


__all__ = [
    "AgreementReport",
    "AttributionSweep",
    "attribution_patch",
    "compare",
    "get_attr_patch_attn_head_out_all_pos",
    "get_attr_patch_attn_head_out_by_pos",
    "get_attr_patch_attn_out",
    "get_attr_patch_mlp_out",
    "get_attr_patch_resid_pre",
]
