"""Metrics for patching: functions from a run's logits to a scalar (or ``[batch]``) score.

- :func:`logit_diff_metric` -- ``logit[correct] - logit[incorrect]`` at a position;
- :func:`prob_metric` -- the probability (or log-probability) of a token;
- :func:`normalized_metric` -- ``(patched - corrupted) / (clean - corrupted)``: 0 = as corrupted, 1 = as
  clean.

At ``position=-1`` a metric marks itself as reading only the last position
(:func:`reads_last_position_only`), and patching then unembeds only that one. :mod:`minterp_tl.patching`
re-exports them, so ``from minterp_tl.patching import logit_diff_metric`` works as in TransformerLens
notebooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
from jaxtyping import Float
from torch import Tensor

MetricFn = Callable[[Float[Tensor, "batch pos d_vocab"]], Tensor]
"""A function from the patched logits of the corrupted batch to a scalar (or ``[batch]``) metric."""


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

    normalized.reads_last_position_only = reads_last_position_only(metric)  # type: ignore[attr-defined]
    return normalized


def _mark_last_only(metric: MetricFn, position: int) -> MetricFn:
    """Mark a metric that reads only the last position's logits, so patching may compute just those."""
    metric.reads_last_position_only = position == -1  # type: ignore[attr-defined]
    return metric


def reads_last_position_only(metric: Any) -> bool:
    """Whether ``metric`` reads only the last position's logits (so patching may compute just those)."""
    return bool(getattr(metric, "reads_last_position_only", False))


__all__ = ["MetricFn", "logit_diff_metric", "normalized_metric", "prob_metric", "reads_last_position_only"]
