"""The fast path of batched patching: resuming a forward pass from the corrupted run.

A patch at block ``l`` and position ``p`` cannot change the residual below block ``l``, nor (causal
attention) anything before position ``p``. So a patched copy need not recompute those: it joins the batch
at its own block from the corrupted run's residual there (the *layer* start and *per-layer joins*: the
batch grows as the forward climbs), and a chunk starts at its lowest patched position from the corrupted
run's keys and values of the earlier positions (the *position* start). This module holds the corrupted
run, the resumed forward, and the decision of which starts a call uses::

    run = CorruptedRun(model, corrupted_tokens, names={"blocks.3.hook_resid_pre"})
    status = assume(model, run)                # what nothing rules out, before any forward
    logits = run.forward(copies=3, l0=3, p0=5, hooks=[...], joins=[3, 3, 7])  # [3 * batch, pos - 5, d_vocab]
    status = check(model, run)                 # each start tried against the plain corrupted run

The key/value cache is ours: a ``transformers.DynamicCache`` we hand to the model and read back, never
the cache the bridge returns (TransformerLens 4.3 returns an empty one on transformers >= 5.24, see
:func:`_cache_kwarg_shim`). Nothing here changes values: the engine verifies every resumed chunk with
unpatched copies riding along, and :func:`check` compares resumed forwards with the plain corrupted
run's logits on the call's own tokens, turning a start off (with a warning that says why, once per model
and reason) when it does not agree to ``1e-4``.
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

TOLERANCE = 1e-4
"""How close (max abs logit difference) a resumed forward must be to the plain corrupted run."""


@dataclass(frozen=True)
class FastPathStatus:
    """Which parts of the fast path a patching call used on a model, and why a part was off.

    Attributes:
        layers: Chunks start at their lowest patched block, from the corrupted run's residual.
        positions: Chunks also start at their lowest patched position, from the corrupted run's
            key/value cache.
        last_only: Metrics that read only the last position get only its logits (``logits_to_keep=1``:
            on Hugging Face models only that position is unembedded).
        reason: Why a part is off (``None`` when all are on).
        per_layer: Each copy of a chunk joins the batch at its own patched block, from the corrupted
            residual there (the batch grows as the forward climbs), instead of every copy starting at the
            chunk's lowest patched block.
    """

    layers: bool
    positions: bool
    last_only: bool
    reason: Optional[str] = None
    per_layer: bool = False


_LAST: weakref.WeakKeyDictionary[Any, FastPathStatus] = weakref.WeakKeyDictionary()
_WARNED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def last_status(model: Any) -> Optional[FastPathStatus]:
    """The fast-path decision of ``model``'s most recent patching call (``None`` before the first)."""
    return _LAST.get(model)


# --------------------------------------------------------------------------------------------------
# Compatibility: the key/value cache's keyword
# --------------------------------------------------------------------------------------------------


@contextmanager
def _cache_kwarg_shim(model: Any) -> Iterator[None]:
    """Hand each attention bridge the key/value cache under the keyword it reads.

    transformers 5.24 renamed the cache argument of its attention layers from ``past_key_values`` to
    ``cache``; TransformerLens 4.3's attention bridges read ``past_key_values`` (or ``layer_past``) and
    so neither fill nor read a cache passed under the new name. While this context is open, a forward
    pre-hook on every ``blocks.{l}.attn`` copies ``cache=`` to ``past_key_values=`` when only the former
    is given. It changes nothing on transformers <= 5.23 (no ``cache=`` is passed) and is a no-op once
    TransformerLens reads the new name; remove it then. The bridge itself still passes the cache to the
    Hugging Face model as ``past_key_values=``, which transformers 5.24 accepts with a ``FutureWarning``
    per call, and bridges that call the Hugging Face attention (OPT) then pass it under both names (the
    same object; another ``FutureWarning``); those two warnings are silenced inside this context only.
    """

    def hook(module: Any, args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
            return args, {**kwargs, "past_key_values": kwargs["cache"]}
        return None

    handles = []
    try:
        for block in getattr(model, "blocks", []):
            attn = getattr(block, "attn", None)
            if isinstance(attn, torch.nn.Module):
                handles.append(attn.register_forward_pre_hook(hook, with_kwargs=True))
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="`past_key_values` is deprecated", category=FutureWarning
            )
            warnings.filterwarnings(
                "ignore", message="Both `past_key_values` and `cache` are set", category=FutureWarning
            )
            yield
    finally:
        for handle in handles:
            handle.remove()


def _new_cache() -> Any:
    from transformers import DynamicCache

    return DynamicCache()


def _sliding_window(model: Any) -> Optional[int]:
    """The model's attention window (Mistral, Gemma-2/3, Qwen2 with one), or ``None``."""
    config = getattr(getattr(model, "original_model", None), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and window > 0 and getattr(config, "use_sliding_window", True) is not False:
        return window
    window = getattr(getattr(model, "cfg", None), "window_size", None)
    return window if isinstance(window, int) and window > 0 else None


# --------------------------------------------------------------------------------------------------
# The corrupted run and the resumed forward
# --------------------------------------------------------------------------------------------------


@contextmanager
def _skip_blocks(model: Any, n: int, tuple_len: int) -> Iterator[None]:
    """Make blocks ``0..n-1`` return their input unchanged, in the form a block of this model returns (a
    bare tensor when ``tuple_len == 0``, else a tuple of that length with ``None`` after the hidden
    states): with ``start_at_layer=n`` the bridge swaps the given residual in at block ``n`` and discards
    what the blocks below computed."""

    def identity(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        return (hidden_states,) + (None,) * (tuple_len - 1) if tuple_len else hidden_states

    skipped = []
    try:
        for block in list(model.blocks)[:n]:
            inner = block.original_component
            inner.forward = identity
            skipped.append(inner)
        yield
    finally:
        for inner in skipped:
            del inner.forward


class CorruptedRun:
    """The corrupted run, computed once per patching call.

    Attributes:
        tokens: ``[batch, pos]`` corrupted tokens.
        logits: ``[batch, pos, d_vocab]`` its logits.
        acts: The activations of the requested hooks and ``blocks.{l}.hook_resid_pre`` of every block.
        kv: Per layer, its keys and values ``[batch, kv_heads, pos, d_head]`` (``None`` when the model
            has no key/value cache; ``kv_reason`` then says why).
    """

    def __init__(self, model: Any, tokens: Int[Tensor, "batch pos"], names: set[str]) -> None:
        self.model, self.tokens = model, tokens
        n_layers, n_pos = model.cfg.n_layers, tokens.shape[1]
        wanted = names | {f"blocks.{l}.hook_resid_pre" for l in range(n_layers)}
        self.acts: dict[str, Tensor] = {}

        def keep(name: str):
            def hook(act: Tensor, hook: Any = None) -> None:
                self.acts[name] = act.detach()

            return hook

        hooks = [(name, keep(name)) for name in wanted if name in model.hook_dict]
        self.block_tuple_len = (
            0  # the form a block's own forward returns: 0 = a tensor (native bridges: 1-tuples)
        )

        def note_form(module: Any, args: Any, output: Any) -> None:
            self.block_tuple_len = len(output) if isinstance(output, tuple) else 0

        self.kv: Optional[list[tuple[Tensor, Tensor]]] = None
        self.kv_reason: Optional[str] = None
        blocks = list(getattr(model, "blocks", []))
        form = blocks[0].original_component.register_forward_hook(note_form) if blocks else None
        try:
            cache = self._run(hooks)
        finally:
            if form is not None:
                form.remove()
        if cache is not None:
            layers = getattr(cache, "layers", None) or []
            kv = [(layer.keys, layer.values) for layer in layers if getattr(layer, "keys", None) is not None]
            if len(kv) == n_layers and all(
                k.shape[-2] == n_pos and k.shape[0] == tokens.shape[0] for k, _ in kv
            ):
                self.kv = [(k.detach(), v.detach()) for k, v in kv]
            else:
                self.kv_reason = (
                    f"the model's attention layers left the key/value cache unfilled ({len(kv)} of "
                    f"{n_layers} layers hold keys)"
                )

    def _run(self, hooks: list) -> Any:
        """The corrupted forward: sets ``logits`` and ``acts``, returns the filled key/value cache (or
        ``None`` if the model takes none)."""
        model = self.model
        with torch.no_grad():
            try:
                cache = _new_cache()
                with _cache_kwarg_shim(model), model.hooks(fwd_hooks=hooks):
                    self.logits = model(self.tokens, past_key_values=cache)
                return cache
            except Exception as err:  # noqa: BLE001 - no key/value cache on this model: no position start
                self.acts.clear()
                self.kv_reason = f"the model takes no key/value cache ({type(err).__name__}: {_short(err)})"
                with model.hooks(fwd_hooks=hooks):
                    self.logits = model(self.tokens)
                return None

    def past(self, p0: int, copies: Sequence[int]) -> Any:
        """A key/value cache of positions ``0..p0-1`` holding, at layer ``l``, ``copies[l]`` copies of the
        batch, in the row order of ``tokens.repeat(copies[l], 1)`` (copy ``c`` is rows
        ``c * batch .. (c + 1) * batch - 1``)."""
        assert self.kv is not None
        cache = _new_cache()
        for layer, (k, v) in enumerate(self.kv):
            n = copies[layer]
            cache.update(k[..., :p0, :].repeat(n, 1, 1, 1), v[..., :p0, :].repeat(n, 1, 1, 1), layer)
        return cache

    @contextmanager
    def _joining(self, joins: Sequence[int], p0: int) -> Iterator[None]:
        """While open, copy ``c`` of a resumed forward joins the batch at block ``joins[c]`` (``joins``
        ascending). The model's layer loop passes every block the arguments it built for the rows it
        started with; a forward pre-hook on each block from the first later join on appends the rows of
        the copies joining there (the corrupted residual, positions ``p0..``) and repeats each per-row
        argument (masks, position embeddings, position ids: the same for every copy, at least 2-D with
        the loop's row count first) to the rows active at that block. Arguments with one row broadcast
        and are left alone."""
        b, model = self.tokens.shape[0], self.model
        loop_rows = joins.count(joins[0]) * b
        handles = []

        def grow_at(layer: int, total: int) -> Any:
            def grow(x: Any) -> Any:
                if isinstance(x, Tensor) and x.ndim >= 2 and x.shape[0] == loop_rows > 1:
                    return x[:b].repeat(total, *([1] * (x.ndim - 1)))
                return tuple(grow(y) for y in x) if isinstance(x, tuple) else x

            def pre(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                hidden = args[0] if args else kwargs["hidden_states"]
                joining = total - hidden.shape[0] // b
                if joining > 0:
                    extra = self.acts[f"blocks.{layer}.hook_resid_pre"][:, p0:].repeat(joining, 1, 1)
                    hidden = torch.cat([hidden, extra.to(hidden.dtype)], dim=0)
                kwargs = {k: grow(v) for k, v in kwargs.items() if k != "hidden_states"}
                if args:
                    return (hidden, *(grow(a) for a in args[1:])), kwargs
                return args, {**kwargs, "hidden_states": hidden}

            return pre

        later = [j for j in joins if j != joins[0]]
        try:
            for layer in range(later[0], int(model.cfg.n_layers)) if later else ():
                total = sum(1 for j in joins if j <= layer)
                handles.append(
                    model.blocks[layer].register_forward_pre_hook(grow_at(layer, total), with_kwargs=True)
                )
            yield
        finally:
            for handle in handles:
                handle.remove()

    def forward(
        self,
        copies: int,
        l0: int,
        p0: int,
        hooks: Sequence[tuple[str, Any]],
        last_only: bool = False,
        joins: Optional[Sequence[int]] = None,
    ) -> Float[Tensor, "rows pos d_vocab"]:
        """Logits ``[copies * batch, pos - p0, d_vocab]`` of ``copies`` copies of the corrupted batch run
        with ``hooks``, starting at block ``l0`` (from the corrupted residual) and position ``p0`` (from
        the corrupted keys and values); ``l0 = p0 = 0`` is a plain forward. ``last_only``: only the last
        position's logits, ``[copies * batch, 1, d_vocab]``. ``joins``: copy ``c`` joins at block
        ``joins[c]`` instead (ascending, ``joins[0] == l0``; see :meth:`_joining`)."""
        model = self.model
        extra = {"logits_to_keep": 1} if last_only else {}
        joins = list(joins) if joins is not None else [l0] * copies
        if len(joins) != copies or joins != sorted(joins) or joins[0] != l0:
            raise ValueError(f"joins must be {copies} ascending blocks starting at l0={l0}, got {joins}")
        growing = joins[-1] != l0
        with torch.no_grad():
            if l0 == 0 and p0 == 0 and not last_only and not growing:
                return model.run_with_hooks(self.tokens.repeat(copies, 1), fwd_hooks=list(hooks))
            first = joins.count(l0)
            resid = self.acts[f"blocks.{l0}.hook_resid_pre"][:, p0:].repeat(first, 1, 1)
            n_layers = int(model.cfg.n_layers)
            # rows per layer; the skipped blocks below l0 hold the first copies too (the model reads the
            # cache's length from layer 0)
            at = [sum(1 for j in joins if j <= max(layer, l0)) for layer in range(n_layers)]
            past = self.past(p0, at) if p0 > 0 else None
            with (
                _skip_blocks(model, l0, self.block_tuple_len),
                _cache_kwarg_shim(model),
                self._joining(joins, p0),
            ):
                out = model.run_with_hooks(
                    resid, fwd_hooks=list(hooks), start_at_layer=l0, past_key_values=past, **extra
                )
        return out[:, -1:] if last_only else out  # native bridges ignore logits_to_keep


def _short(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------
# The per-call decision
# --------------------------------------------------------------------------------------------------


def _agrees(
    run: CorruptedRun, l0: int, p0: int, last_only: bool = False, joins: Optional[list[int]] = None
) -> tuple[bool, str]:
    """Whether the forward resumed at ``(l0, p0)`` (with copies joining at ``joins``) gives the plain
    corrupted run's logits."""
    copies = 1 if joins is None else len(joins)
    try:
        out = run.forward(copies, l0, p0, [], last_only=last_only, joins=joins)
    except Exception as err:  # noqa: BLE001 - any failure means: this start is off
        return False, f"{type(err).__name__}: {_short(err)}"
    want = (run.logits[:, -1:] if last_only else run.logits[:, p0:]).repeat(copies, 1, 1)
    if out.shape != want.shape:
        return False, f"it gave logits of shape {tuple(out.shape)}, expected {tuple(want.shape)}"
    diff = float((out - want).abs().max())
    return (diff <= TOLERANCE, f"its logits differ from the plain run by {diff:.2g} (> {TOLERANCE:g})")


_CHECKED_OFF: weakref.WeakSet[Any] = weakref.WeakSet()
"""Models on which a check has found a start that does not reproduce the plain run: later calls check
first instead of assuming the fast path."""


def _static(model: Any, run: CorruptedRun) -> tuple[bool, dict[str, str]]:
    """Whether the position start is possible at all for this call, and the reasons why a start is off
    that need no forward: no key/value cache, a prompt longer than the sliding attention window."""
    n_pos, window = run.tokens.shape[1], _sliding_window(model)
    reasons: dict[str, str] = {}  # kind -> text; a kind is warned about once per model
    if run.kv is None:
        reasons["no-cache"] = f"position start off: {run.kv_reason}"
    elif window is not None and n_pos > window:
        reasons["window"] = (
            f"position start off for prompts longer than the sliding attention window of "
            f"{window} tokens (this one has {n_pos})"
        )
    return n_pos >= 2 and not reasons, reasons


def _outside_level() -> int:
    """The ``stacklevel`` of the first caller outside this package, for ``warnings.warn`` called by the
    caller of this function."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame: Optional[FrameType] = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def record(model: Any, status: FastPathStatus, reasons: dict[str, str], warn: bool) -> FastPathStatus:
    """Record ``status`` for :func:`last_status` and, with ``warn``, report each reason once per model."""
    _LAST[model] = status
    if warn:
        warned = _WARNED.setdefault(model, set())
        name = getattr(model.cfg, "model_name", None) or type(model).__name__
        for kind, text in reasons.items():
            if kind not in warned:
                warned.add(kind)
                warnings.warn(
                    f"minterp_tl.patching fast path on {name}: {text}. Values are unaffected; the "
                    "sweep recomputes more. patching.fast_path_status(model) shows the decision.",
                    RuntimeWarning,
                    stacklevel=_outside_level(),
                )  # the user's line that called into minterp_tl
    return status


def assume(model: Any, run: CorruptedRun, *, warn: bool = True) -> FastPathStatus:
    """The fast path a patching call starts with, before any forward: every start that nothing rules out
    (:func:`_static`) -- or, on a model where a check has turned a start off before, :func:`check`'s
    decision. The patching engine verifies each chunk it runs with unpatched copies riding along, and
    calls :func:`check` when one of them does not reproduce the corrupted run."""
    if model in _CHECKED_OFF:
        return check(model, run, warn=warn)
    positions, reasons = _static(model, run)
    blocks = hasattr(model, "blocks")
    if not blocks:
        reasons = {"layers": "layer start off: the model has no blocks stack"}
    status = FastPathStatus(blocks, blocks and positions, blocks, "; ".join(reasons.values()) or None, blocks)
    return record(model, status, reasons, warn)


def _join_tries(n_layers: int) -> list[tuple[list[int], bool]]:
    """Resumed forwards (copies' joining blocks, last position only) that together exercise what a real
    chunk can ask of the model: skipped blocks below the start, per-row arguments grown from two copies
    and from one (where they may broadcast), full and last-position logits."""
    top, start = n_layers - 1, 1 if n_layers >= 3 else n_layers - 1
    tries = [([start, start, top], False), ([0, top], True)]
    return tries + ([([0, 0, 1], False)] if n_layers == 2 else [])


def check(model: Any, run: CorruptedRun, *, warn: bool = True) -> FastPathStatus:
    """Decide, for this call's corrupted tokens, which starts reproduce the plain corrupted run.

    First what rules a start out without a forward (:func:`_static`). Then a few resumed forwards of a
    handful of copies that together use every start (:func:`_join_tries`, at the middle position) are
    compared with the corrupted logits; when they all agree the fast path is on. When one fails or
    disagrees, each start is tried on its own (at the middle block and position) and what fails is off
    for this call. With ``warn``, each reason is reported once per model with ``warnings.warn``. The
    decision is recorded for :func:`last_status`.
    """
    n_layers, n_pos = model.cfg.n_layers, run.tokens.shape[1]
    l0 = n_layers // 2
    positions, reasons = _static(model, run)
    if not hasattr(model, "blocks"):
        reasons = {"layers": "layer start off: the model has no blocks stack"}
        layers = positions = last_only = per_layer = False
    elif all(
        _agrees(run, joins[0], n_pos // 2 if positions else 0, last_only=last, joins=joins)[0]
        for joins, last in _join_tries(n_layers)
    ):
        layers = last_only = per_layer = True
    else:  # find which part fails
        _CHECKED_OFF.add(model)
        layers, why = _agrees(run, l0, 0)
        if not layers:
            reasons["layers"] = (
                f"layer start off: resuming at block {l0} from the corrupted residual failed ({why})"
            )
            positions = False
        if positions:
            positions, why = _agrees(run, l0, n_pos // 2)
            if not positions:
                reasons["positions"] = (
                    f"position start off: resuming at block {l0}, position {n_pos // 2} from "
                    f"the corrupted key/value cache failed ({why})"
                )
        last_only = per_layer = False
        if layers:
            last_only, why = _agrees(run, l0, n_pos // 2 if positions else 0, last_only=True)
            if not last_only:
                reasons["last_only"] = f"last-position logits off: logits_to_keep=1 failed ({why})"
            for joins, _ in _join_tries(n_layers):
                per_layer, why = _agrees(run, joins[0], n_pos // 2 if positions else 0, joins=joins)
                if not per_layer:
                    reasons["per_layer"] = (
                        f"per-layer joins off: copies joining at later blocks failed ({why})"
                    )
                    break
    status = FastPathStatus(layers, positions, last_only, "; ".join(reasons.values()) or None, per_layer)
    return record(model, status, reasons, warn)


__all__ = [
    "CorruptedRun",
    "assume",
    "FastPathStatus",
    "TOLERANCE",
    "check",
    "last_status",
    "record",
]
