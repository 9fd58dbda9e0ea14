"""Inputs checked at the door: one copy of the checks every entry point makes before any compute.

Each raises ``ValueError`` naming the input and what would be valid; none truncates or clamps silently.
"""

from __future__ import annotations

import difflib
import math
import operator
from collections.abc import Iterable
from typing import Any, Optional

import torch
from jaxtyping import Int
from torch import Tensor


def positive_int(value: Any, what: str, *, maximum: Optional[int] = None) -> int:
    """``value`` as an ``int >= 1`` (and ``<= maximum``); bools, floats and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value < 1 or (maximum is not None and value > maximum):
        valid = f"1..{maximum}" if maximum is not None else ">= 1"
        raise ValueError(f"{what} must be in {valid}, got {value}")
    return value


def positive_number(value: Any, what: str) -> float:
    """``value`` as a finite number ``> 0``; bools, NaN and infinities are refused."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


def _n_ctx(model: Any) -> Optional[int]:
    n = getattr(getattr(model, "cfg", None), "n_ctx", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def token_ids(model: Any, tokens: Any, what: str = "tokens") -> Int[Tensor, "batch pos"]:
    """``tokens`` as a ``[batch, pos]`` integer tensor of ids in ``0..d_vocab-1``, at most ``n_ctx`` long."""
    if not isinstance(tokens, Tensor):
        raise ValueError(
            f"{what} must be an integer tensor [batch, pos] of token ids, got {type(tokens).__name__}"
        )
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(
            f"{what} must be a non-empty [batch, pos] tensor of token ids, got shape {tuple(tokens.shape)}"
        )
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(
            f"{what} must be an integer tensor [batch, pos] of token ids, got dtype {tokens.dtype}"
        )
    d_vocab = int(model.cfg.d_vocab)
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= d_vocab:
        raise ValueError(
            f"{what} has token ids outside 0..{d_vocab - 1} (d_vocab={d_vocab}): min {low}, max {high}"
        )
    n_ctx = _n_ctx(model)
    if n_ctx is not None and tokens.shape[1] > n_ctx:
        raise ValueError(
            f"{what} has {tokens.shape[1]} positions, more than the model's context of {n_ctx}; "
            "shorten it (nothing is truncated silently)"
        )
    return tokens


def text_tokens(
    model: Any, text: str, what: str = "prompt", prepend_bos: Optional[bool] = None
) -> Int[Tensor, "1 pos"]:
    """``model.to_tokens(text)`` without TransformerLens's silent truncation to the context: a text longer
    than the model's context is refused, naming its length."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"{what} must be a non-empty string, got {text!r}")
    tokens = model.to_tokens(text, prepend_bos=prepend_bos, truncate=False)
    n_ctx = _n_ctx(model)
    if n_ctx is not None and tokens.shape[1] > n_ctx:
        start = text[:40] + ("..." if len(text) > 40 else "")
        raise ValueError(
            f"{what} {start!r} is {tokens.shape[1]} tokens, more than the model's context of {n_ctx}; "
            "shorten it (nothing is truncated silently)"
        )
    return tokens


def index(value: Any, n: int, what: str) -> int:
    """``value`` as an index into ``n`` items, negatives counted from the end (``-1`` is the last): an
    integer (``operator.index``; bools refused) in ``-n..n-1``, returned as ``0..n-1``; anything else is
    refused, naming the valid range."""
    try:
        if isinstance(value, bool):
            raise TypeError
        i = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an int, got {value!r}") from None
    if not -n <= i < n:
        valid = f"0..{n - 1} (or {-n}..-1)" if n > 0 else "none (there are no items)"
        raise ValueError(f"{what}={i} is out of range; valid: {valid}")
    return i % n


def did_you_mean(value: Any, options: Iterable[str], *, n: int = 3, cutoff: float = 0.6) -> str:
    """``" (did you mean 'a' or 'b'?)"`` for the options closest to ``value``, or ``""`` if none is close:
    the one "did you mean" of every error message that names an unknown word."""
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=n, cutoff=cutoff)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


__all__ = [
    "did_you_mean",
    "index",
    "positive_int",
    "positive_number",
    "text_tokens",
    "token_ids",
]
