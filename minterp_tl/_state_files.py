"""StateManager on disk: the folder format of :meth:`minterp_tl.state.StateManager.write` / ``read``.

A folder is a :class:`minterp_tl.store.StateStore`. Each state's tensor is stored under its display key
(``"name"`` or ``"tag/name"``), its per-prompt positions (if any) under a key no state has
(``key + "#positions"``); tags, heads, axes and token strings go into the store's metadata as JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Union

from torch import Tensor

from minterp_tl.store import SaveReport, StateStore


def format_key(tag: str, name: str) -> str:
    """The display form of a state's key ``(tag, name)``: ``"name"`` or ``"tag/name"``."""
    return f"{tag}/{name}" if tag else name


def write_states(states: Sequence[Any], path: Union[str, os.PathLike]) -> SaveReport:
    """Write ``states`` (:class:`~minterp_tl.state.SavedState` objects) to the store at ``path``; returns
    the store's :class:`~minterp_tl.store.SaveReport`.

    Raises:
        ValueError: If two states have the same display key (a tag containing ``"/"``).
    """
    tensors: dict[str, Tensor] = {}
    entries: list[dict[str, Any]] = []
    state_keys = {format_key(*state.key) for state in states}
    for state in states:
        key = format_key(*state.key)
        if key in tensors:
            raise ValueError(
                f"Cannot save states {state.key!r} and another key to one store: both are named {key!r} "
                "(a tag containing '/'); rename the tag."
            )
        tensors[key] = state.tensor
        positions_key = None
        if state.positions is not None:  # a key no state has (a state may be named "x#positions")
            positions_key = key + "#positions"
            while positions_key in state_keys or positions_key in tensors:
                positions_key += "#"
            tensors[positions_key] = state.positions
        entries.append(
            {
                "key": key,
                "positions_key": positions_key,
                "tag": state.tag,
                "name": state.name,
                "positions": state.positions is not None,
                "heads": None if state.heads is None else list(state.heads),
                "pos_axis": state.pos_axis,
                "head_axis": state.head_axis,
                "str_tokens": None if state.str_tokens is None else [list(t) for t in state.str_tokens],
            }
        )
    metadata = {"minterp_tl.kind": "StateManager", "minterp_tl.states": json.dumps(entries)}
    return StateStore(path).save(tensors, metadata)


def read_states(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """The states written at ``path`` by :func:`write_states` (each as the keyword arguments of a
    :class:`~minterp_tl.state.SavedState`), every tensor verified against its hash.

    Raises:
        ValueError: If ``path`` holds no store, a store not written by ``StateManager.write``, or a
            damaged or malformed file.
    """
    store = StateStore(path)
    tensors = store.load()
    metadata = store.metadata
    if metadata.get("minterp_tl.kind") != "StateManager":
        raise ValueError(
            f"The store at {str(path)!r} was not written by StateManager.write (its metadata has no "
            "'minterp_tl.kind': 'StateManager')."
        )
    states = []
    try:
        for e in json.loads(metadata["minterp_tl.states"]):
            positions_key = e.get("positions_key") or e["key"] + "#positions"
            states.append(
                dict(
                    tensor=tensors[e["key"]],
                    name=e["name"],
                    tag=e["tag"],
                    positions=tensors[positions_key] if e["positions"] else None,
                    heads=None if e["heads"] is None else tuple(int(h) for h in e["heads"]),
                    pos_axis=e["pos_axis"],
                    head_axis=e["head_axis"],
                    str_tokens=None if e["str_tokens"] is None else tuple(tuple(t) for t in e["str_tokens"]),
                )
            )
    except (KeyError, TypeError, AttributeError, ValueError, RecursionError) as err:
        raise ValueError(
            f"The states saved at {str(path)!r} have a malformed description "
            f"({type(err).__name__}: {str(err)[:120]})."
        ) from None
    return states


__all__ = ["format_key", "read_states", "write_states"]
