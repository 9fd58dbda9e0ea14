"""The batched patching engine: many patched copies of a corrupted batch per forward pass.

Each patched copy of the corrupted batch is patched by its own setter, called as TransformerLens's patch
setters are: ``setter(corrupted_activation, index, clean_activation)``. Copies are stacked along the batch
so one forward pass runs many patches; a chunk fits the memory budget. With the fast path
(:mod:`minterp_tl.fast_path`) each copy joins at its patched block and a chunk starts at its first
changed position, from the corrupted run's residual and key/value cache, so work a patch cannot change
is not recomputed; unpatched sentinel copies in every resumed chunk verify it. Used by
:mod:`minterp_tl.patching`; private.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from minterp_tl import distributed
from minterp_tl._checks import positive_int
from minterp_tl.fast_path import TOLERANCE, CorruptedRun, FastPathStatus, assume, check, record
from minterp_tl.hooks import hook_layout

# --------------------------------------------------------------------------------------------------
# The batched engine
# --------------------------------------------------------------------------------------------------


def _free_memory(device: torch.device) -> int:
    """Free memory on ``device`` in bytes (CUDA: ``mem_get_info``; CPU: ``MemAvailable``)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def _bytes_per_sequence(model: Any, n_pos: int, positions: Optional[int] = None) -> int:
    """A generous estimate of the memory one sequence of ``n_pos`` tokens takes in a forward pass that
    computes its last ``positions`` of them (default all): their logits plus the largest transient
    activations (MLP hidden, attention scores and pattern) and the key/value cache."""
    cfg = model.cfg
    q = n_pos if positions is None else positions
    d_mlp = getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
    floats = q * (cfg.d_vocab + 12 * cfg.d_model + 3 * d_mlp) + 3 * cfg.n_heads * q * n_pos
    return 4 * (floats + 2 * cfg.n_layers * n_pos * cfg.d_model)


def check_sizes(max_batch: Optional[int], memory_budget: Optional[int]) -> None:
    """``max_batch`` and ``memory_budget`` are ``None`` or positive integers (checked before any compute)."""
    if max_batch is not None:
        positive_int(max_batch, "max_batch")
    if memory_budget is not None:
        positive_int(memory_budget, "memory_budget")


def agreed_budget(model: Any, memory_budget: Optional[int]) -> Optional[int]:
    """``memory_budget``, or under ``torchrun`` (when it is ``None``) one budget all ranks agree on: a
    quarter of the free memory, shared among the ranks on one device (:meth:`World.memory_budget`), so
    every rank plans the same chunks and ranks on one host do not overcommit it."""
    world = distributed.world()
    if world.size == 1 or memory_budget is not None:
        return memory_budget
    return world.memory_budget(_free_memory, torch.device(model.cfg.device))


def copies_per_forward(
    model: Any,
    batch: int,
    n_pos: int,
    *,
    max_batch: Optional[int] = None,
    memory_budget: Optional[int] = None,
    positions: Optional[int] = None,
) -> int:
    """How many patched copies of a ``[batch, n_pos]`` corrupted batch run in one forward pass.

    Args:
        model: The model (its config sizes the estimate).
        batch: Sequences per copy (the corrupted batch size).
        n_pos: Tokens per sequence.
        max_batch: The most sequences in one forward. Default: as many tokens as 128 full sequences on
            CPU (512 on GPU), so a forward resumed at a later position (``positions``) takes more.
        memory_budget: Bytes a forward may use (default: a quarter of the free memory).
        positions: Positions each sequence computes (a forward resumed at position ``n_pos -
            positions``; default ``n_pos``).
    """
    check_sizes(max_batch, memory_budget)
    if positions is not None:
        positive_int(positions, "positions")
    q = n_pos if positions is None else min(positions, n_pos)
    device = torch.device(model.cfg.device)
    if max_batch is None:
        max_batch = (512 if device.type == "cuda" else 128) * n_pos // q
    memory_budget = _free_memory(device) // 4 if memory_budget is None else memory_budget
    by_memory = memory_budget // (batch * _bytes_per_sequence(model, n_pos, q))
    return int(max(1, min(max_batch // batch, by_memory)))


@dataclass(frozen=True, eq=False)
class Patch:
    """One patched copy: TL-style ``setter(corrupted, index, clean)`` at hook ``name`` of block ``layer``
    (nothing below that block can change)."""

    name: str
    setter: Callable
    index: Sequence[Any]  # TransformerLens's index (ints; the spec sweeps' may hold None for "all")
    clean: Tensor
    layer: int


def _first_change(patch: Patch, corrupted: CorruptedRun) -> Optional[int]:
    """The first position at which ``patch`` changes the corrupted activation, or ``None`` when it changes
    nothing (bit for bit).

    In its patched run a patch's hook sees the corrupted run's own activation (nothing upstream of it is
    patched), so this is exact for any setter, also one that writes before its index's position: by
    causality the patched run equals the corrupted run before the returned position.
    """
    act = corrupted.acts.get(patch.name)
    if act is None:
        return 0
    out = patch.setter(act.clone(), patch.index, patch.clean)
    if not isinstance(out, Tensor) or out.shape != act.shape:
        return 0  # an unusual setter: run it from position 0 (the hook then reports what it returned)
    changed = out != act
    if not bool(changed.any()):
        return None
    pos_axis, _ = hook_layout(patch.name, act.ndim)
    if pos_axis is None:
        return 0
    per_pos = changed.movedim(pos_axis, 0).reshape(act.shape[pos_axis], -1).any(dim=1)
    return int(per_pos.nonzero()[0, 0])


_FORWARD_OVERHEAD = 4.0
"""The fixed cost of one forward pass, in sequence-forwards (measured on SmolLM2, 2 CPU threads: a
batch-1 forward costs about as much as 4 sequences of a batch-64 one)."""


def _tiles(starts: Sequence[tuple[int, int]], per_forward: int, n_layers: int, n_pos: int) -> list[list[int]]:
    """Group patches, given as their ``(start layer, start position)``, into chunks of at most
    ``per_forward`` copies that share a high start layer and start position: tiles of the (layer, position)
    plane, of the shape that minimises the modelled cost
    ``sum over chunks of (overhead + sum over members of (n_layers - l0) (n_pos - p0) / (n_layers n_pos))``.
    """
    keys = list(starts)
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for key in keys:
        counts[key] += 1

    def cost(tile_l: int, tile_p: int) -> float:
        tiles: dict[tuple[int, int], int] = defaultdict(int)
        for (l, q), c in counts.items():
            tiles[(l // tile_l, q // tile_p)] += c
        total = 0.0
        for (tl_, tp_), c in tiles.items():
            work = (n_layers - tl_ * tile_l) * (n_pos - tp_ * tile_p) / (n_layers * n_pos)
            total += -(-c // per_forward) * _FORWARD_OVERHEAD + c * work
        return total

    sizes_l = sorted({max(1, n_layers // d) for d in range(1, n_layers + 1)})
    sizes_p = sorted({max(1, n_pos // d) for d in range(1, n_pos + 1)})
    tile_l, tile_p = min(((a, b) for a in sizes_l for b in sizes_p), key=lambda ab: cost(*ab))
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i in order:
        groups[(keys[i][0] // tile_l, keys[i][1] // tile_p)].append(i)
    chunks = []
    for key in sorted(groups):
        members = groups[key]
        chunks += [members[j : j + per_forward] for j in range(0, len(members), per_forward)]
    return chunks


def _position_chunks(
    starts: Sequence[tuple[int, int]], capacity: Callable[[int], int], n_layers: int, n_pos: int, batch: int
) -> list[list[int]]:
    """Group patches, given as their ``(layer, first changed position)``, into chunks for per-layer joins,
    where a copy costs only the layers from its own block up and a chunk starts at its lowest position
    ``p0`` and holds at most ``capacity(n_pos - p0)`` copies: the split of the list ordered by position
    (and, within a position, from the highest layer down, so a chunk that reaches into the next position
    takes its cheapest copies) into consecutive chunks that minimises the modelled cost ``sum over chunks
    of (overhead + sum over members of (n_layers - l) (n_pos - p0) / (n_layers n_pos))`` (exact, by
    dynamic programming)."""
    order = sorted(range(len(starts)), key=lambda i: (starts[i][1], -starts[i][0]))
    m = len(order)
    weight = np.array([(n_layers - starts[i][0]) / n_layers for i in order])
    span = np.array([(n_pos - starts[i][1]) / n_pos for i in order])
    room = np.array([max(1, capacity(n_pos - starts[i][1])) for i in order])  # if the chunk starts here
    prefix = np.concatenate([[0.0], np.cumsum(weight)])
    overhead = _FORWARD_OVERHEAD / batch  # in copies of the batch
    best = np.zeros(m + 1)
    cut = np.zeros(m + 1, dtype=np.int64)
    widest = int(room.max()) if m else 1
    for end in range(1, m + 1):
        begin = np.arange(max(0, end - widest), end)  # the chunk is order[begin:end]
        cost = best[begin] + overhead + span[begin] * (prefix[end] - prefix[begin])
        cost[end - begin > room[begin]] = np.inf
        k = int(cost.argmin())
        best[end], cut[end] = cost[k], begin[k]
    chunks, end = [], m
    while end > 0:
        chunks.append(order[cut[end] : end])
        end = int(cut[end])
    return chunks[::-1]


def _forward(
    run: CorruptedRun,
    copies: int,
    l0: int,
    p0: int,
    hooks: list,
    last_only: bool = False,
    joins: Optional[list[int]] = None,
) -> Float[Tensor, "rows pos d_vocab"]:
    """One chunk's forward (:meth:`CorruptedRun.forward`); the one place chunks run, so tests can count."""
    return run.forward(copies, l0, p0, hooks, last_only, joins)


class _SetterError(Exception):
    """An error raised inside a chunk's forward by a patch setter (or by the engine about one): re-raised
    to the caller as it is, never taken for a fast-path failure."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


def _patch_hook(
    name: str, items: list[tuple[int, Patch]], corrupted: CorruptedRun, p0: int
) -> Callable[..., Tensor]:
    """The forward hook at ``name`` that patches copy ``c`` (rows ``c * batch ..``) for each ``(c, patch)``
    of ``items``; with ``p0 > 0`` each setter gets the full-length activation (the corrupted prefix in
    front) and must leave that prefix as it is."""
    b = corrupted.tokens.shape[0]
    pos_axis = hook_layout(name, 4)[0]
    assert pos_axis is not None  # every four-axis hook has a position axis

    def hook(act: Tensor, hook: Any = None) -> Tensor:
        act = act.clone()
        prefix = corrupted.acts[name].narrow(pos_axis, 0, p0) if p0 > 0 else None
        for c, patch in items:
            part = act[c * b : (c + 1) * b]
            full = part if prefix is None else torch.cat([prefix, part], dim=pos_axis)
            try:
                out = patch.setter(full, patch.index, patch.clean)
            except Exception as err:  # noqa: BLE001 - the setter's own error, re-raised as it is
                raise _SetterError(err) from err
            if prefix is not None:
                if not torch.equal(out.narrow(pos_axis, 0, p0), prefix):
                    raise _SetterError(
                        RuntimeError(
                            f"the patch setter for {name} at index {list(patch.index)} changed positions "
                            f"before {p0} in the patched run, but not when it was called on the corrupted "
                            "activation beforehand: setters must be deterministic functions of "
                            "(activation, index, clean)."
                        )
                    )
                out = out.narrow(pos_axis, p0, out.shape[pos_axis] - p0)
            if out is not part:
                act[c * b : (c + 1) * b] = out
        return act

    return hook


def _run_chunk(
    corrupted: CorruptedRun,
    patches: Sequence[Patch],
    chunk: Sequence[int],
    first: dict[int, int],
    status: FastPathStatus,
    last_only: bool,
) -> Optional[dict[int, Tensor]]:
    """Run the patches ``chunk`` in one forward, as ``status`` allows; their logits by patch number
    (full length, or the last position with ``last_only``).

    A resumed forward carries *sentinels*: unpatched copies that join with the chunk's first copies and
    with its last ones. Their logits must reproduce the corrupted run's (to ``TOLERANCE``); when they do
    not, or the resumed forward fails, this returns ``None``: the fast path as configured is not exact
    on this chunk. A plain forward from the tokens needs no sentinel; a setter's error is re-raised.
    """
    b = corrupted.tokens.shape[0]
    chunk = sorted(chunk, key=lambda i: patches[i].layer) if status.per_layer else list(chunk)
    l0 = min(patches[i].layer for i in chunk) if status.layers else 0
    p0 = min(first[i] for i in chunk) if status.positions else 0
    joins = [patches[i].layer for i in chunk] if status.per_layer else [l0] * len(chunk)
    slots: list[Optional[int]] = list(chunk)  # patch number per copy; None: a sentinel
    plain = l0 == 0 and p0 == 0 and not last_only and joins[-1] == 0
    if not plain:
        k = joins.count(l0)
        slots.insert(k, None)
        joins.insert(k, l0)
        if joins[-1] != l0:
            slots.append(None)
            joins.append(joins[-1])
    by_name: dict[str, list[tuple[int, Patch]]] = defaultdict(list)
    for c, i in enumerate(slots):
        if i is not None:
            by_name[patches[i].name].append((c, patches[i]))
    hooks = [(name, _patch_hook(name, items, corrupted, p0)) for name, items in by_name.items()]
    try:
        logits = _forward(
            corrupted, len(slots), l0, p0, hooks, last_only, joins if status.per_layer else None
        )
    except _SetterError as err:
        raise err.original from None
    except Exception:  # noqa: BLE001 - the resumed forward failed on this chunk's shapes
        if plain:
            raise
        return None
    want = corrupted.logits[:, -1:] if last_only else corrupted.logits[:, p0:]
    out: dict[int, Tensor] = {}
    for c, i in enumerate(slots):
        part = logits[c * b : (c + 1) * b]
        if i is None:
            if part.shape != want.shape or float((part - want).abs().max()) > TOLERANCE:
                return None
        else:
            out[i] = torch.cat([corrupted.logits[:, :p0], part], dim=1) if p0 > 0 and not last_only else part
    return out


def _chunk_cost(
    starts: Sequence[tuple[int, int]], per_layer: bool, n_layers: int, n_pos: int, batch: int
) -> float:
    """The modelled cost, in sequence-forwards, of one chunk whose copies start at ``starts`` (``(layer,
    position)``): the fixed cost of a forward plus each sequence's share of the (layer, position) plane
    it computes (from its own block up with per-layer joins, else from the chunk's lowest)."""
    p0 = min(p for _, p in starts)
    l0 = min(l for l, _ in starts)
    layers = sum(n_layers - (l if per_layer else l0) for l, _ in starts) / n_layers
    return _FORWARD_OVERHEAD + batch * layers * (n_pos - p0) / n_pos


_CHUNKS_PER_RANK = 2
"""Under ``torchrun``, a plan with fewer chunks than this many per rank is cut finer (at most
``ceil(patches / (2 * ranks))`` copies per forward) so the cost model can balance the ranks; a larger plan is
kept as one process would run it, chunk for chunk."""


def _plan(
    model: Any,
    todo: Sequence[int],
    patches: Sequence[Patch],
    first: dict[int, int],
    status: FastPathStatus,
    sizes: dict[str, Optional[int]],
    batch: int,
    n_pos: int,
) -> tuple[list[list[int]], list[float]]:
    """The chunks (lists of patch numbers) the patches ``todo`` run in under ``status``, and their
    modelled costs."""
    n_layers = model.cfg.n_layers
    starts = [(patches[i].layer if status.layers else 0, first[i] if status.positions else 0) for i in todo]
    if status.per_layer:  # a copy's layers cost only from its own block up

        @functools.cache
        def capacity(q: int) -> int:
            return copies_per_forward(model, batch, n_pos, positions=q, **sizes)

        split = _position_chunks(starts, capacity, n_layers, n_pos, batch)
    else:
        per_forward = copies_per_forward(model, batch, n_pos, **sizes)
        split = _tiles(starts, per_forward, n_layers, n_pos)
    costs = [_chunk_cost([starts[j] for j in c], status.per_layer, n_layers, n_pos, batch) for c in split]
    return [[todo[j] for j in chunk] for chunk in split], costs


def run_patched(
    model: Any,
    corrupted_tokens: Int[Tensor, "batch pos"],
    patches: Sequence[Patch],
    evaluate: Callable[[Tensor], Tensor],
    *,
    max_batch: Optional[int],
    memory_budget: Optional[int],
    progress: bool,
    last_only: bool = False,
    skip_noops: bool = True,
) -> Float[Tensor, "n_patches ..."]:
    """Run every patch, many per forward pass; ``evaluate(logits)`` of each patched run, stacked in the
    order of ``patches``.

    With ``skip_noops``, a patch that leaves the corrupted activation bit-for-bit unchanged (clean and
    corrupted agree there -- e.g. every position before the first token where the prompts differ, by
    causality) runs no forward at all: its patched run is the corrupted run, whose logits it gets.

    Each patched copy of the corrupted batch is patched by its own setter, called as TL's patch
    setters are: ``setter(corrupted_activation, index, clean_activation)`` on the copy's own
    ``[batch, ...]`` slice. With the fast path (:mod:`minterp_tl.fast_path`) each copy joins the batch at
    its patched block, from the corrupted run's residual there, and a chunk starts at its lowest
    first-affected position, from the corrupted run's key/value cache: what a patch cannot change is not
    recomputed. Every resumed chunk is verified by unpatched sentinel copies (:func:`_run_chunk`); when
    one disagrees, :func:`minterp_tl.fast_path.check` decides what stays on (with a warning) and the
    chunk and the rest run again under that decision. The hooks see only positions ``p0..``; each setter
    still gets the full-length activation (the corrupted prefix is put in front), so any setter works
    unchanged. ``evaluate`` gets full-length logits ``[batch, pos, d_vocab]`` (the prefix from the
    corrupted run) -- or, with ``last_only`` on the skipping path, only the last position's
    ``[batch, 1, d_vocab]`` (for metrics that read nothing else) -- and returns a tensor of one shape.

    Under ``torchrun`` (:mod:`minterp_tl.distributed`) rank 0 plans the chunks (cut finer when there are
    fewer than two per rank), each rank runs the share the cost model deals it, and every rank returns
    all values.
    """
    b, n_pos = corrupted_tokens.shape
    world = distributed.world()
    sizes = dict(max_batch=max_batch, memory_budget=agreed_budget(model, memory_budget))
    unchanged: dict[int, Tensor] = {}  # patch number -> value, for patches that change nothing
    first: dict[int, int] = {}
    corrupted: Optional[CorruptedRun] = None
    status = FastPathStatus(False, False, False, "no patch needed a forward")

    def prepare() -> tuple[list[list[int]], list[float], Optional[int]]:
        """Rank 0's plan: the chunks, their modelled costs and the copies cap they were cut to (every rank
        finds its patches' first changes and its own fast-path status)."""
        nonlocal corrupted, status
        corrupted = CorruptedRun(model, corrupted_tokens, {p.name for p in patches})
        todo, value = [], None
        for i, patch in enumerate(patches):
            change = _first_change(patch, corrupted)
            if skip_noops and change is None:  # the patched run *is* the corrupted run
                value = evaluate(corrupted.logits).detach() if value is None else value
                unchanged[i] = value
            else:
                todo.append(i)
                first[i] = change or 0
        if not todo:
            record(model, status, {}, warn=False)
            return [], [], max_batch
        status = assume(model, corrupted)
        if not world.main:
            return [], [], max_batch
        chunks, costs = _plan(model, todo, patches, first, status, sizes, b, n_pos)
        if 1 < world.size and len(chunks) < _CHUNKS_PER_RANK * world.size:  # too few to share: cut finer
            cap = -(-len(todo) // (_CHUNKS_PER_RANK * world.size))
            sizes["max_batch"] = min(cap * b, max_batch or cap * b)
            chunks, costs = _plan(model, todo, patches, first, status, sizes, b, n_pos)
        return chunks, costs, sizes["max_batch"]

    chunks, costs, sizes["max_batch"] = world.exchange(prepare)[0]  # rank 0's plan
    chunks = [chunks[k] for k in world.share(costs)]  # this rank's share, by modelled cost

    def run_share() -> dict[int, Tensor]:
        assert corrupted is not None  # made by prepare()
        values: dict[int, Tensor] = {}
        bar = progress and world.main
        _run_chunks(model, corrupted, patches, chunks, first, status, sizes, evaluate, values, last_only, bar)
        return values

    values = dict(unchanged)
    for part in world.exchange(run_share):  # (another rank's values arrive on the CPU)
        values.update(part)
    if not values:
        return torch.empty(0)
    return torch.stack([values[i].to(model.cfg.device) for i in range(len(patches))])


def _run_chunks(
    model: Any,
    corrupted: CorruptedRun,
    patches: Sequence[Patch],
    chunks: list[list[int]],
    first: dict[int, int],
    status: FastPathStatus,
    sizes: dict[str, Optional[int]],
    evaluate: Callable[[Tensor], Tensor],
    values: dict[int, Tensor],
    last_only: bool,
    progress: bool,
) -> None:
    """Run ``chunks`` into ``values`` (patch number -> ``evaluate(logits)``); when a chunk's sentinels
    disagree, check the fast path once (:func:`minterp_tl.fast_path.check`) and plan the rest again."""
    b, n_pos = corrupted.tokens.shape
    checked = False
    with tqdm(total=sum(map(len, chunks)), desc="patching", unit="patch", disable=not progress) as bar:
        while chunks:
            for k, chunk in enumerate(chunks):
                results = _run_chunk(corrupted, patches, chunk, first, status, last_only and status.last_only)
                if results is None:  # not exact here: decide again, run this chunk and the rest again
                    if checked:
                        why = {
                            "chunk": "fast path off: a chunk's sentinel copies did not reproduce the "
                            "corrupted run although the check passed; full forwards from here"
                        }
                        status = record(
                            model, FastPathStatus(False, False, False, why["chunk"]), why, warn=True
                        )
                    else:
                        status, checked = check(model, corrupted), True
                    todo = [i for later in chunks[k:] for i in later]
                    chunks = _plan(model, todo, patches, first, status, sizes, b, n_pos)[0]
                    break
                for i, logits in results.items():
                    values[i] = evaluate(logits).detach()
                bar.update(len(chunk))
            else:
                chunks = []


__all__ = ["Patch", "agreed_budget", "check_sizes", "copies_per_forward", "run_patched"]
