"""Direct-path (edge) patching, batched: TransformerLens's ``get_act_patch_direct_path`` and
``get_act_patch_direct_path_all_sources`` on the patching engine.

The edge from head A (layer ``sl``) into head B's query, key or value input (layer ``dl > sl``) is
patched as Wang et al. (2022) do and as TransformerLens does: A's clean-minus-corrupted residual write
``z_A @ W_O[A]`` (clean and corrupted each multiplied out, then subtracted) is added, at every position,
to B's own copy of the residual before its ``ln1`` (the per-head ``hook_{q,k,v}_input`` fork of
``use_split_qkv_input``); every other reader still sees A's corrupted output. Each (source, destination)
pair is one patched copy, so many edges share a forward, and each copy joins the batch at B's block.
Used by :mod:`minterp_tl.patching`; private.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache

from minterp_tl._checks import index, token_ids
from minterp_tl._patch_engine import Patch, check_sizes, run_patched
from minterp_tl.hooks import n_heads
from minterp_tl.metrics import reads_last_position_only

COMPONENTS = ("q", "k", "v")


@contextmanager
def _split_qkv_input(model: Any) -> Iterator[None]:
    """Turn on the per-head ``hook_{q,k,v}_input`` forks (``use_attn_in`` off: the two exclude each
    other), restoring the caller's flags on exit."""
    split = bool(getattr(model.cfg, "use_split_qkv_input", False))
    attn_in = bool(getattr(model.cfg, "use_attn_in", False))
    try:
        if attn_in:
            model.set_use_attn_in(False)
        if not split:
            try:
                model.set_use_split_qkv_input(True)
            except NotImplementedError as err:
                raise NotImplementedError(
                    "direct path patching needs each head's own query/key/value input "
                    "(TransformerLens's use_split_qkv_input), which this model's attention bridges do "
                    f"not offer (GPT-J and OPT among the tested families): {err}"
                ) from None
        yield
    finally:
        model.set_use_split_qkv_input(split)
        if attn_in:
            model.set_use_attn_in(True)


def _refuse_unsupported(model: Any, component: str) -> None:
    """Clear errors, before any compute, for what the edge intervention is not defined on here."""
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {list(COMPONENTS)}, got {component!r}")
    if any(module.training for module in model.modules()):
        raise ValueError(
            "direct path patching needs the model in eval mode (dropout is on): call model.eval()"
        )
    if not hasattr(model, "blocks") or any(getattr(block, "attn", None) is None for block in model.blocks):
        raise ValueError("direct path patching needs an attention component in every block")
    if "blocks.0.ln1_post.hook_scale" in model.hook_dict:
        raise ValueError(
            "direct path patching is not supported on post-norm blocks (Gemma-2/3, OLMo-2): a head's "
            "residual write is normalised with the whole attention output, so it is not z @ W_O alone"
        )


def _write_delta(
    model: Any,
    clean_cache: ActivationCache,
    corrupted_cache: ActivationCache,
    layer: int,
    head: int,
    shape: tuple[int, int],
) -> Float[Tensor, "batch pos d_model"]:
    """Head ``(layer, head)``'s clean minus corrupted residual write, ``z @ W_O`` (as TransformerLens);
    both caches must hold its ``hook_z`` for ``shape`` = the corrupted tokens' ``(batch, pos)``."""
    name = f"blocks.{layer}.attn.hook_z"
    for what, cache in (("clean_cache", clean_cache), ("corrupted_cache", corrupted_cache)):
        if name not in cache.cache_dict:
            raise ValueError(f"{what} has no {name!r}; run that pass with a names_filter that includes it")
        if tuple(cache[name].shape[:2]) != shape:
            raise ValueError(
                f"{what} holds {name!r} for [batch, pos] = {list(cache[name].shape[:2])}, but "
                f"corrupted_tokens is {list(shape)}: both caches must come from runs on prompts of that shape"
            )
    w_o = model.blocks[layer].attn.W_O[head]
    return clean_cache[name][:, :, head] @ w_o - corrupted_cache[name][:, :, head] @ w_o


def _add_to_head(
    fork: Float[Tensor, "batch pos heads d_model"], index: Sequence[int], delta: Tensor
) -> Float[Tensor, "batch pos heads d_model"]:
    """The patch setter: add the source's write to one destination head's fork input."""
    fork[:, :, index[0]] += delta
    return fork


def direct_path(
    model: Any,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache: ActivationCache,
    corrupted_cache: ActivationCache,
    patching_metric: Callable[[Tensor], Tensor],
    sources: Sequence[tuple[int, int]],
    component: str,
    *,
    verbose: bool,
    max_batch: Optional[int],
    memory_budget: Optional[int],
) -> Float[Tensor, "n_sources n_layers dst_heads"]:
    """The metric with each edge from a source head in ``sources`` (``(layer, head)`` pairs) into each
    later head's ``component`` input patched alone; 0.0 where the destination layer is not after the
    source's. On GQA/MQA models the key and value inputs are per key/value head, so ``dst_heads`` is
    ``n_key_value_heads`` for ``"k"`` / ``"v"`` (``n_heads`` otherwise)."""
    token_ids(model, corrupted_tokens, "corrupted_tokens")
    check_sizes(max_batch, memory_budget)
    _refuse_unsupported(model, component)
    n_layers = int(model.cfg.n_layers)
    readers = n_heads(model, f"attn.hook_{component}")
    results = torch.zeros(len(sources), n_layers, readers, device=model.cfg.device)
    shape = (int(corrupted_tokens.shape[0]), int(corrupted_tokens.shape[1]))
    patches: list[Patch] = []
    cells: list[tuple[int, int, int]] = []
    for s, (src_layer, src_head) in enumerate(sources):
        delta = _write_delta(model, clean_cache, corrupted_cache, src_layer, src_head, shape)
        for dst_layer in range(src_layer + 1, n_layers):
            name = f"blocks.{dst_layer}.attn.hook_{component}_input"
            for dst_head in range(readers):
                patches.append(Patch(name, _add_to_head, (dst_head,), delta, dst_layer))
                cells.append((s, dst_layer, dst_head))

    def evaluate(logits: Tensor) -> Tensor:
        value = torch.as_tensor(patching_metric(logits))
        if value.numel() != 1:
            raise ValueError(f"patching_metric must return a scalar, got shape {tuple(value.shape)}")
        return value.detach().reshape(())

    with _split_qkv_input(model):
        values = run_patched(
            model,
            corrupted_tokens,
            patches,
            evaluate,
            max_batch=max_batch,
            memory_budget=memory_budget,
            progress=verbose,
            last_only=reads_last_position_only(patching_metric),
        )
    for cell, value in zip(cells, values):
        results[cell] = value
    return results


def source_index(model: Any, src_layer: Any, src_head: Any) -> tuple[int, int]:
    """``(src_layer, src_head)`` checked against the model (negatives count from the end)."""
    layer = index(src_layer, int(model.cfg.n_layers), "src_layer")
    return layer, index(src_head, n_heads(model, "attn.hook_z"), "src_head")


__all__ = ["COMPONENTS", "direct_path", "source_index"]
