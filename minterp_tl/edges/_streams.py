"""Where the edge graph's writers and readers live on a bridge, and the hooks that read or change them.

Writers: the embeddings are the residual stream entering block 0 (``blocks.0.hook_resid_pre``, with any
position embedding, which clean and corrupted runs share); a head writes ``z @ W_O`` (its ``hook_z``
times its rows of ``W_O``; the output bias belongs to no head); an MLP writes ``hook_mlp_out``.

Readers: a head's query/key/value input and an MLP's input are reached in one of two ways, chosen per
model and verified on its own run before any result is used:

- a *fork*: the per-head ``attn.hook_{q,k,v}_input`` of ``use_split_qkv_input`` and ``hook_mlp_in`` of
  ``use_hook_mlp_in``, copies of the residual stream that feed only that reader;
- a *virtual fork*, where a bridge has no fork: the reader's input ``x`` (``hook_resid_pre``, or
  ``hook_resid_mid`` before a sequential MLP) and the reader's own first activation ``y = f(x)`` (a head's
  ``hook_q/k/v`` = ``ln1(x) @ W + b``; an MLP's ``mlp.hook_in`` = ``ln(x)``). Changing the input by
  ``delta`` adds ``f(x + delta) - f(x)`` to ``y``; its gradient is ``f``'s vector-Jacobian product.

The logits read ``blocks.{n_layers - 1}.hook_resid_post``. Used by :mod:`minterp_tl.edges`; private.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from minterp_tl.edges.graph import EdgeGraph, _Group

_ATTN = {"q_input": "q", "k_input": "k", "v_input": "v"}
_VERIFY = 1e-4


def refuse_unsupported(model: Any) -> None:
    """Clear errors, before any compute, for models the edge graph is not exact on."""
    if any(module.training for module in model.modules()):
        raise ValueError(
            "edge scores and edge patching need the model in eval mode (dropout is on): call model.eval()"
        )
    if "blocks.0.ln1_post.hook_scale" in model.hook_dict or "blocks.0.ln2_post.hook_scale" in model.hook_dict:
        raise ValueError(
            "edges are not defined on post-norm blocks (Gemma-2/3, OLMo-2): a head's or MLP's residual write "
            "is normalised together with the rest of its sublayer, so the stream is not a sum of writes"
        )


@contextmanager
def switches(model: Any) -> Iterator[None]:
    """Turn on the forks the bridge offers (``use_split_qkv_input``, ``use_hook_mlp_in``; ``use_attn_in``
    off, as the two exclude each other), restoring the caller's flags on exit."""
    cfg = model.cfg
    saved = {
        k: bool(getattr(cfg, k, False)) for k in ("use_split_qkv_input", "use_hook_mlp_in", "use_attn_in")
    }
    try:
        if saved["use_attn_in"]:
            model.set_use_attn_in(False)
        for flag in ("use_split_qkv_input", "use_hook_mlp_in"):
            try:
                getattr(model, f"set_{flag}")(True)
            except NotImplementedError:
                pass  # no fork on this bridge: the virtual fork is used
        yield
    finally:
        for flag in ("use_split_qkv_input", "use_hook_mlp_in"):
            try:
                getattr(model, f"set_{flag}")(saved[flag])
            except NotImplementedError:
                pass
        if saved["use_attn_in"]:
            model.set_use_attn_in(True)


@dataclass(frozen=True)
class Reader:
    """How one reader group is reached: ``hook`` is changed (a fork holds the input itself; a virtual fork
    holds ``f(x)``, with ``x`` at ``source``); ``f`` maps ``[..., heads, d_model]`` inputs to ``hook``'s
    per-head values (``None`` for a fork)."""

    group: _Group
    hook: str
    source: Optional[str] = None
    f: Optional[Callable[[Tensor], Tensor]] = None


class Streams:
    """The writer and reader hooks of ``model`` for ``graph`` (call inside :func:`switches`)."""

    def __init__(self, model: Any, graph: EdgeGraph, fired: set[str]) -> None:
        self.model, self.graph, self._fired = model, graph, fired
        self.readers: list[Reader] = [self._reader(g) for g in graph.groups]

    def _reader(self, g: _Group) -> Reader:
        model, fired = self.model, self._fired
        block = model.blocks[g.layer]
        if g.kind == "logits":
            return Reader(g, f"blocks.{g.layer}.hook_resid_post")
        if g.kind in _ATTN:
            c = _ATTN[g.kind]
            if f"blocks.{g.layer}.attn.hook_{c}_input" in self._fired:
                return Reader(g, f"blocks.{g.layer}.attn.hook_{c}_input")
            target, source = f"blocks.{g.layer}.attn.hook_{c}", f"blocks.{g.layer}.hook_resid_pre"
            if target not in fired or source not in fired:
                raise NotImplementedError(
                    f"block {g.layer}'s heads' {c} inputs cannot be reached on this bridge (no "
                    f"hook_{c}_input fork, and {target} or {source} does not run): edges into attention "
                    "heads are not supported for this model"
                )
            weight = getattr(block.attn, f"W_{c.upper()}")
            ln = block.ln1 if model.cfg.normalization_type is not None else None

            def attn(x: Tensor, weight: Tensor = weight, ln: Any = ln) -> Tensor:
                return torch.einsum("...hd,hde->...he", x if ln is None else ln(x), weight)

            return Reader(g, target, source, attn)
        if f"blocks.{g.layer}.hook_mlp_in" in fired:
            return Reader(g, f"blocks.{g.layer}.hook_mlp_in")
        source = "hook_resid_pre" if self.graph.parallel else "hook_resid_mid"
        if f"blocks.{g.layer}.mlp.hook_in" not in fired or f"blocks.{g.layer}.{source}" not in fired:
            raise NotImplementedError(
                f"block {g.layer}'s MLP input cannot be reached on this bridge (no hook_mlp_in fork and no "
                f"mlp.hook_in / {source}): edges into MLPs are not supported for this model"
            )
        return Reader(g, f"blocks.{g.layer}.mlp.hook_in", f"blocks.{g.layer}.{source}", None)

    # -- verification of virtual forks ------------------------------------------------------------------

    def verify(self, acts: dict[str, Tensor]) -> None:
        """Check each virtual fork on a run's activations ``acts`` (its ``hook`` and ``source``): ``f(x)``
        must equal the hook's value up to a constant (the bias); otherwise refuse the model clearly."""
        with torch.no_grad():
            self._verify(acts)

    def _verify(self, acts: dict[str, Tensor]) -> None:
        for r in self.readers:
            if r.source is None:
                continue
            x, y = acts[r.source], acts[r.hook]
            if r.f is None:  # an MLP's input: find which of the block's norms makes it
                self._mlp_norm(r, x, y)
                continue
            pred = r.f(x.unsqueeze(-2).expand(*x.shape[:-1], y.shape[-2], x.shape[-1]))
            self._same(r, pred, y)

    def _mlp_norm(self, r: Reader, x: Tensor, y: Tensor) -> None:
        """Replace ``r`` by the reader whose ``f`` is the block norm that maps ``x`` to ``y``."""
        block = self.model.blocks[r.group.layer]
        for name in ("ln2", "ln1"):
            ln = getattr(block, name, None)
            if ln is None:
                continue
            pred = ln(x)
            if pred.shape == y.shape and float((pred - y).abs().max()) <= _VERIFY * (
                1 + float(y.abs().max())
            ):
                self.readers[self.readers.index(r)] = Reader(r.group, r.hook, r.source, ln)
                return
        raise NotImplementedError(
            f"block {r.group.layer}'s MLP input is not ln2 or ln1 of {r.source} on this bridge: edges into "
            "MLPs are not supported for this model"
        )

    def _same(self, r: Reader, pred: Tensor, y: Tensor) -> None:
        if pred.shape == y.shape:
            diff = pred - y
            diff = diff - diff.mean(dim=(0, 1), keepdim=True)
            if float(diff.abs().max()) <= _VERIFY * (1 + float(y.abs().max())):
                return
        raise NotImplementedError(
            f"{r.hook} is not a per-head projection of {r.source} on this bridge (and it has no "
            "use_split_qkv_input fork): edges into attention heads are not supported for this model"
        )

    # -- hooks ------------------------------------------------------------------------------------------

    @staticmethod
    def writer_names(graph: EdgeGraph) -> list[str]:
        """The hooks :meth:`writes` reads."""
        names = ["blocks.0.hook_resid_pre"]
        for layer in range(graph.n_layers):
            names.append(f"blocks.{layer}.attn.hook_z")
            if graph.has_mlp:
                names.append(f"blocks.{layer}.hook_mlp_out")
        return names

    def writes(self, acts: dict[str, Tensor]) -> Float[Tensor, "batch pos writers d_model"]:
        """Every writer's residual write from a run's activations ``acts`` (of :meth:`writer_names`)."""
        parts = [acts["blocks.0.hook_resid_pre"].unsqueeze(2)]
        for layer in range(self.graph.n_layers):
            parts.append(self.head_writes(layer, acts[f"blocks.{layer}.attn.hook_z"]))
            if self.graph.has_mlp:
                parts.append(acts[f"blocks.{layer}.hook_mlp_out"].unsqueeze(2))
        return torch.cat(parts, dim=2)

    def head_writes(
        self, layer: int, z: Float[Tensor, "batch pos heads d_head"], heads: Optional[Tensor] = None
    ) -> Float[Tensor, "batch pos heads d_model"]:
        """``z @ W_O`` per head (of ``heads`` only, when given)."""
        w_o = self.model.blocks[layer].attn.W_O
        if heads is not None:
            return torch.einsum("bphe,hed->bphd", z[:, :, heads], w_o[heads])
        return torch.einsum("bphe,hed->bphd", z, w_o)


def candidates(model: Any, graph: EdgeGraph) -> list[str]:
    """Every hook a reader may be reached at (forks and virtual forks' sources and targets)."""
    split = bool(getattr(model.cfg, "use_split_qkv_input", False))  # the forks exist only when switched on
    mlp_in = bool(getattr(model.cfg, "use_hook_mlp_in", False))
    names = []
    for layer in range(graph.n_layers):
        names += [f"blocks.{layer}.attn.hook_{c}" for c in "qkv"]
        names += [f"blocks.{layer}.attn.hook_{c}_input" for c in "qkv" if split]
        names += [f"blocks.{layer}.hook_resid_pre"]
        if graph.has_mlp:
            names += [f"blocks.{layer}.{n}" for n in ("mlp.hook_in", "hook_resid_mid")]
            names += [f"blocks.{layer}.hook_mlp_in"] if mlp_in else []
    return [n for n in names if n in model.hook_dict]


def open_streams(model: Any, graph: EdgeGraph, tokens: Tensor) -> tuple[Streams, Tensor, dict[str, Tensor]]:
    """:class:`Streams` for ``model`` (inside :func:`switches`), chosen from the hooks its run on ``tokens``
    fires and verified on that run; also the run's ``(logits, activations)``."""
    writers = Streams.writer_names(graph)
    logits, acts = record(model, tokens, writers + candidates(model, graph))
    streams = Streams(model, graph, set(acts))
    streams.verify(acts)
    return streams, logits, {n: acts[n] for n in writers}


def record(model: Any, tokens: Tensor, names: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """A no-grad forward on ``tokens`` keeping the activations at ``names``: ``(logits, acts)``."""
    acts: dict[str, Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(act: Tensor, hook: Any) -> None:
            acts[name] = act.detach().clone()

        return hook

    with torch.no_grad(), model.hooks(fwd_hooks=[(n, keep(n)) for n in dict.fromkeys(names)]):
        logits = model(tokens)
    return logits, acts


__all__ = ["Reader", "Streams", "candidates", "open_streams", "record", "refuse_unsupported", "switches"]
