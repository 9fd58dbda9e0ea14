"""Hook layout: the one place that knows the axes of each hook's activation and how to cut them.

Every module that selects positions, heads or neurons of an activation asks here:

- :func:`hook_layout` -- ``(position axis, head axis)`` of a hook's activation;
- :func:`n_heads` -- how many heads a hook has (with grouped-query attention, ``k`` / ``v`` / ``rot_k``
  have ``n_key_value_heads``, every other head hook ``n_heads``);
- :func:`gather` / :func:`scatter` -- read / write the region of an activation selected by per-prompt
  positions and by units of one more axis (heads, or the neurons of the last axis);
- :data:`SWITCHES` -- hook points that exist on a bridge but run only when a switch is on;
- :func:`layer_of` -- the block a canonical hook name belongs to;
- :func:`firing_order` -- the order one forward pass reaches the hook points.

Layouts (TransformerLens's): ``pattern`` / ``attn_scores`` are ``[batch, head, query_pos, key_pos]``;
``q``, ``k``, ``v``, ``z``, ``result``, ``rot_q``, ``rot_k`` are ``[batch, pos, head, d_head]``; every other
hook with at least two axes is ``[batch, pos, ...]``.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, Literal, Optional

import torch
from jaxtyping import Int
from torch import Tensor

WriteMode = Literal["set", "add"]
"""How :func:`scatter` writes: ``"set"`` the region to the value, or ``"add"`` the value to it."""

_HEAD_FIRST = ("attn.hook_pattern", "attn.hook_attn_scores")
_HEAD_SECOND = (
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_z",
    "attn.hook_result",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
)
_KEY_VALUE = ("attn.hook_k", "attn.hook_v", "attn.hook_rot_k")

SWITCHES: dict[str, str] = {
    "attn.hook_result": "model.set_use_attn_result(True)",
    "hook_attn_in": "model.set_use_attn_in(True)",
    "hook_q_input": "model.set_use_split_qkv_input(True)",
    "hook_k_input": "model.set_use_split_qkv_input(True)",
    "hook_v_input": "model.set_use_split_qkv_input(True)",
    "hook_mlp_in": "model.set_use_hook_mlp_in(True)",
}
"""``{hook suffix: the call that makes it run}`` for hook points that are silent by default."""


def hook_layout(name: str, ndim: int) -> tuple[Optional[int], Optional[int]]:
    """``(position axis, head axis)`` of the activation at hook ``name`` with ``ndim`` axes (``None``
    where absent). For ``pattern`` / ``attn_scores`` the position axis is the query axis."""
    if name.endswith(_HEAD_FIRST):
        return 2, 1
    if name.endswith(_HEAD_SECOND):
        return 1, 2
    return (1, None) if ndim >= 2 else (None, None)


def has_heads(name: str) -> bool:
    """Whether the activation at hook ``name`` has a head axis."""
    return name.endswith(_HEAD_FIRST + _HEAD_SECOND)


def n_heads(model: Any, name: str) -> int:
    """The number of heads of the activation at hook ``name`` on ``model`` (a model or its ``cfg``):
    ``n_key_value_heads`` for ``k``, ``v`` and ``rot_k`` under grouped-query attention, else ``n_heads``."""
    cfg = getattr(model, "cfg", model)
    kv = getattr(cfg, "n_key_value_heads", None)
    if kv and name.endswith(_KEY_VALUE):
        return int(kv)
    return int(cfg.n_heads)


def _axis(axis: Optional[int], what: str) -> int:
    if axis is None:
        raise ValueError(f"this activation has no {what} axis to select on")
    return axis


def layer_of(name: str) -> Optional[int]:
    """The block index of a canonical hook name (``blocks.3.hook_resid_pre`` -> 3), or ``None``."""
    parts = name.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return None


def gather(
    x: Tensor,
    pos_axis: Optional[int],
    unit_axis: Optional[int],
    positions: Optional[Int[Tensor, "batch k"]],
    units: Optional[Sequence[int]],
) -> Tensor:
    """A detached copy of ``x`` restricted to per-prompt ``positions`` and to ``units`` of ``unit_axis``.

    Args:
        x: The activation, ``[batch, ...]``.
        pos_axis: Its position axis (see :func:`hook_layout`).
        unit_axis: The axis ``units`` index: the head axis, or the last axis for neurons.
        positions: ``[batch, k]`` positions for each batch item, or ``None`` for all.
        units: Indices along ``unit_axis``, or ``None`` for all.

    Returns:
        ``x`` with the position axis cut to ``k`` and the unit axis to ``len(units)``, same axis order.
    """
    x = x.detach()
    if units is not None:
        x = x.index_select(_axis(unit_axis, "unit"), torch.as_tensor(list(units), device=x.device))
    if positions is not None:
        positions = positions.to(x.device)
        moved = x.movedim(_axis(pos_axis, "position"), 1)
        if bool((positions == positions[:1]).all()):
            moved = moved.index_select(1, positions[0])
        else:
            moved = moved[torch.arange(moved.shape[0], device=x.device)[:, None], positions]
        x = moved.movedim(1, _axis(pos_axis, "position"))
    if units is None and positions is None:
        x = x.clone()
    return x.contiguous()


def scatter(
    x: Tensor,
    value: Tensor,
    pos_axis: Optional[int],
    unit_axis: Optional[int],
    positions: Optional[Int[Tensor, "batch k"]],
    units: Optional[Sequence[int]],
    mode: WriteMode = "set",
    what: str = "state",
) -> Tensor:
    """A copy of ``x`` with the region selected as in :func:`gather` replaced by (``mode="add"``:
    increased by) ``value``, which must broadcast to the region's shape.

    Raises:
        ValueError: If ``value`` does not broadcast to the region (the message names ``what`` and
            both shapes).
    """
    b = x.shape[0]
    region = list(x.shape)
    axes: list[int] = []
    if positions is not None:
        axes.append(_axis(pos_axis, "position"))
        region[axes[-1]] = positions.shape[1]
    if units is not None:
        axes.append(_axis(unit_axis, "unit"))
        region[axes[-1]] = len(units)
    try:
        value = torch.broadcast_to(value.to(device=x.device, dtype=x.dtype), region)
    except RuntimeError:
        raise ValueError(
            f"Cannot load {what}: value of shape {tuple(value.shape)} does not fit the selected region "
            f"of shape {tuple(region)} (activation {tuple(x.shape)}). A saved batch must equal this "
            "run's batch or be 1 (MeanOverBatch() makes it 1), and the number of saved positions / "
            "heads must equal the number selected here or be 1."
        ) from None
    out = x.clone()
    if not axes:
        if mode == "add":
            out += value
        else:
            out.copy_(value)
        return out
    moved = out.movedim(axes, list(range(1, len(axes) + 1)))
    val = value.movedim(axes, list(range(1, len(axes) + 1)))
    index: list[Tensor] = [torch.arange(b, device=x.device).view(b, *([1] * len(axes)))]
    for i, axis in enumerate(axes):
        shape = [1] * (len(axes) + 1)
        if axis == pos_axis and positions is not None:
            shape[0], shape[i + 1] = b, positions.shape[1]
            index.append(positions.to(x.device).view(shape))
        else:
            shape[i + 1] = len(units or ())
            index.append(torch.as_tensor(list(units or ()), device=x.device).view(shape))
    if mode == "add":
        moved[tuple(index)] = moved[tuple(index)] + val
    else:
        moved[tuple(index)] = val
    return out


_FIRING_ORDER: weakref.WeakKeyDictionary[Any, dict[int, int]] = weakref.WeakKeyDictionary()


def firing_order(model: Any) -> dict[int, int]:
    """``{id(hook point): rank}`` in the order one forward pass reaches them (measured once per model
    on a two-token input; hook points that did not fire rank after, in registration order)."""
    order = _FIRING_ORDER.get(model)
    if order is not None:
        return order
    fired: list[int] = []
    points = {id(hp): hp for hp in model.hook_dict.values()}
    handles = [(hp, hp.add_hook(lambda x, hook: fired.append(id(hook)), dir="fwd")) for hp in points.values()]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 2, dtype=torch.long, device=model.cfg.device), return_type=None)
    finally:
        for hp, handle in handles:
            handle.hook.remove()
            if handle in hp.fwd_hooks:
                hp.fwd_hooks.remove(handle)
    order = {}
    for key in fired + list(points):
        order.setdefault(key, len(order))
    _FIRING_ORDER[model] = order
    return order


__all__ = [
    "SWITCHES",
    "WriteMode",
    "firing_order",
    "gather",
    "has_heads",
    "hook_layout",
    "layer_of",
    "n_heads",
    "scatter",
]
