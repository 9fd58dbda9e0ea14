"""Sweeps over several processes: ``torch.distributed`` ranks, each with its own model replica.

Launch an unchanged script with ``torchrun --nproc_per_node N script.py``: the first sweep that runs
joins the process group torchrun describes (gloo; only small results travel between ranks), splits
its work over the ranks by the patching engine's cost model so they finish together, gathers the
results, and returns the same values on every rank. Plots and files are written by rank 0 only. A
script that is not launched by torchrun (no ``WORLD_SIZE`` above 1) never touches
``torch.distributed``.

What is split:

- activation patching (:mod:`minterp_tl.patching`'s drop-ins and :func:`~minterp_tl.sweeps.activation_patch`,
  the direct-path sweeps): the forward chunks, planned once by rank 0, dealt out by modelled cost;
- :func:`~minterp_tl.attribution.attribution_patch`: the prompts (rows of the batch);
- :func:`~minterp_tl.edges.edge_attribution`: the integration steps (EAP, one step, runs on every rank);
- :func:`~minterp_tl.edges.edge_patch`: the edge sets.

Every exchange between ranks carries each rank's error: when one rank raises, every rank raises (that
rank its own error, the others :class:`RankFailed` naming it). A rank that dies or hangs without a word
makes the others fail after the collective timeout (``MINTERP_TL_DIST_TIMEOUT`` seconds, default 1800,
or :func:`init`'s ``timeout``), never hang. A rank that finishes its share first also waits within that
timeout, so very long sweeps (hours per rank) need a longer one.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import math
import os
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 1800.0
"""Seconds a collective waits for the other ranks before failing (torch's own default for gloo)."""


class RankFailed(RuntimeError):
    """Another rank failed (its error is in the message), or did not answer within the timeout."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks: ``rank`` of ``size`` (``size == 1``: not distributed)."""

    rank: int = 0
    size: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S
    group: Any = None  # the gloo process group results travel over (None: the default group)

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the rank that prints, plots and writes."""
        return self.rank == 0

    def exchange(self, local: Callable[[], T]) -> list[T]:
        """Run ``local()`` here and gather every rank's result, in rank order.

        If ``local()`` raises on any rank, every rank raises: the failing rank its own error, the others
        :class:`RankFailed` naming the rank and its error. With ``size == 1`` this is ``[local()]``.
        """
        if self.size == 1:
            return [local()]
        error: Optional[BaseException] = None
        try:
            data = _encode(("ok", local()))
        except Exception as err:  # noqa: BLE001 - re-raised below, after the others have heard of it
            error, data = err, _encode(("error", f"{type(err).__name__}: {err}"))
        try:
            received = self._all_gather_bytes(data)
        except RuntimeError as err:  # gloo's timeout, or a closed connection
            if error is not None:
                raise error from None
            raise RankFailed(
                f"rank {self.rank}: no answer from the other ranks within {self.timeout_s:g} s, or a rank "
                f"closed its connection (it died or hangs): {err}"
            ) from None
        if error is not None:
            raise error
        parts = [_decode(raw, rank) for rank, raw in enumerate(received)]
        for rank, part in enumerate(parts):
            if not (isinstance(part, tuple) and len(part) == 2 and part[0] in ("ok", "error")):
                raise RankFailed(f"a malformed message from rank {rank}")
        failed = [(r, part[1]) for r, part in enumerate(parts) if part[0] == "error"]
        if failed:
            rank, message = failed[0]
            raise RankFailed(f"rank {rank} of {self.size} failed: {message}")
        return [part[1] for part in parts]

    def _all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order: two ``all_gather`` calls of byte tensors (lengths, then
        the padded bytes) over the gloo group."""
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=self.group)
        width = max(int(n) for n in sizes)
        mine = torch.zeros(width, dtype=torch.uint8)
        mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        parts = [torch.empty(width, dtype=torch.uint8) for _ in range(self.size)]
        dist.all_gather(parts, mine, group=self.group)
        return [part[: int(n)].numpy().tobytes() for part, n in zip(parts, sizes)]

    def share(self, costs: Sequence[float]) -> list[int]:
        """The items (indices into ``costs``) this rank runs: the longest first, each to the rank with
        the least modelled work so far, so the ranks finish together (the same on every rank)."""
        if self.size == 1:
            return list(range(len(costs)))
        load = [(0.0, r) for r in range(self.size)]
        mine = []
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            work, rank = heapq.heappop(load)
            if rank == self.rank:
                mine.append(i)
            heapq.heappush(load, (work + float(costs[i]), rank))
        return sorted(mine)

    def rows(self, n: int) -> slice:
        """This rank's share of ``n`` rows: consecutive, sizes differing by at most one."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def memory_budget(self, free: Callable[[torch.device], int], device: torch.device) -> Optional[int]:
        """One forward's memory budget agreed by all ranks: a quarter of each rank's free memory, shared
        among the ranks on the same host and device; the smallest over the ranks. ``None`` with one
        rank (the engine then takes its own default)."""
        if self.size == 1:
            return None
        where = self.exchange(lambda: (socket.gethostname(), str(device), free(device)))
        return min(f // 4 // sum(1 for h, d, _ in where if (h, d) == (host, dev)) for host, dev, f in where)


# --------------------------------------------------------------------------------------------------
# What travels between ranks: JSON and raw tensor bytes, never pickle (nothing received can run code)
# --------------------------------------------------------------------------------------------------

_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64)
} | {"bool": torch.bool}


def _encode(obj: Any) -> bytes:
    """``obj`` (``None``, bools, numbers, strings, tensors, and lists, tuples and dicts of them) as bytes:
    an 8-byte header length, a JSON header, then each tensor's raw bytes."""
    tensors: list[torch.Tensor] = []

    def walk(x: Any) -> Any:
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            if str(t.dtype).removeprefix("torch.") not in _DTYPES:
                raise TypeError(f"cannot send a {t.dtype} tensor between ranks")
            tensors.append(t)
            return {"t": [str(t.dtype).removeprefix("torch."), list(t.shape)]}
        if isinstance(x, (list, tuple)):
            return {"l" if isinstance(x, list) else "u": [walk(v) for v in x]}
        if isinstance(x, dict):
            return {"d": [[walk(k), walk(v)] for k, v in x.items()]}
        raise TypeError(f"cannot send a {type(x).__name__} between ranks")

    header = json.dumps(walk(obj)).encode()
    body = b"".join(t.reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors)
    return struct.pack("<Q", len(header)) + header + body


def _decode(data: bytes, rank: int) -> Any:
    """The object :func:`_encode` made on ``rank``; a malformed message is a :class:`RankFailed`."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        tree = json.loads(data[8 : 8 + length])
        offset = 8 + length

        def build(x: Any) -> Any:
            nonlocal offset
            if not isinstance(x, dict):
                return x
            (kind, value), *rest = x.items()
            if rest or kind not in ("t", "l", "u", "d"):
                raise ValueError(f"unknown entry {x!r}")
            if kind == "t":
                dtype, shape = _DTYPES[value[0]], [int(n) for n in value[1]]
                size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
                raw = bytearray(data[offset : offset + size])
                if len(raw) != size:
                    raise ValueError("truncated tensor")
                offset += size
                flat = torch.frombuffer(raw, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
                return flat.view(dtype).reshape(shape)
            if kind == "d":
                return {build(k): build(v) for k, v in value}
            items = [build(v) for v in value]
            return items if kind == "l" else tuple(items)

        return build(tree)
    except (ValueError, KeyError, TypeError, IndexError, struct.error) as err:
        raise RankFailed(f"a malformed message from rank {rank}: {err}") from None


_WORLD: Optional[World] = None


def _launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ


def _timeout_from_env() -> float:
    raw = os.environ.get("MINTERP_TL_DIST_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"MINTERP_TL_DIST_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return value


def init(timeout: Optional[float] = None) -> World:
    """Join the process group torchrun describes (``gloo``), or adopt one already initialised, and
    return this process's :class:`World`. Sweeps call this themselves; call it first only to set the
    collective ``timeout`` in seconds (default ``MINTERP_TL_DIST_TIMEOUT`` or 1800).

    Without torchrun's environment (``WORLD_SIZE`` above 1 and ``MASTER_ADDR``) and without an
    initialised group, this is the one-process world and nothing is initialised.
    """
    global _WORLD
    number = isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
    if timeout is not None and not (number and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    seconds = float(timeout) if timeout is not None else _timeout_from_env()
    if _WORLD is not None and _WORLD.size > 1:
        return _WORLD
    if not dist.is_available() or not (dist.is_initialized() or _launched_by_torchrun()):
        _WORLD = World()
        return _WORLD
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=seconds))
        group = None
    elif dist.get_backend() == "gloo":
        group = None
    else:  # the user's group (e.g. NCCL): results travel over a gloo group of the same ranks
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=seconds))
    _WORLD = World(dist.get_rank(), dist.get_world_size(), seconds, group)
    return _WORLD


_ALONE = 0  # depth of alone() blocks


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Within this block, this rank runs sweeps as one process would, exchanging nothing with the others:
    for work only some ranks do, such as a sweep under ``if distributed.world().main:`` (which would
    otherwise wait for the other ranks until the timeout)."""
    global _ALONE
    _ALONE += 1
    try:
        yield
    finally:
        _ALONE -= 1


def world() -> World:
    """This process's :class:`World` (joining torchrun's process group on first use, see :func:`init`);
    the one-process world inside :func:`alone`."""
    global _WORLD
    if _ALONE:
        return World()
    if _WORLD is not None and _WORLD.size > 1 and not dist.is_initialized():
        _WORLD = None  # the group was destroyed since
    if _WORLD is None or (_WORLD.size == 1 and dist.is_available() and dist.is_initialized()):
        return init()
    return _WORLD


def local_device() -> str:
    """The device for this rank's replica: ``cuda:LOCAL_RANK`` when there are GPUs (modulo their count:
    more ranks than GPUs on a host share them), else ``cpu``."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return "cpu"


def replica_gpus(per_replica: int, available: Optional[int] = None) -> list[int]:
    """The GPUs of this rank's replica when one model spans ``per_replica`` GPUs: local rank ``r`` gets
    ``r * per_replica .. (r + 1) * per_replica - 1`` (launch ``torchrun --nproc_per_node
    n_gpus // per_replica``). ``available``: the GPU count (default ``torch.cuda.device_count()``).

    Raises:
        ValueError: ``per_replica`` is not a positive integer, or the ranks on this host need more GPUs
            than there are.
    """
    if isinstance(per_replica, bool) or not isinstance(per_replica, int) or per_replica < 1:
        raise ValueError(f"per_replica must be a positive integer, got {per_replica!r}")
    count = torch.cuda.device_count() if available is None else available
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_size * per_replica > count:
        raise ValueError(
            f"{local_size} rank(s) on this host x {per_replica} GPU(s) per replica need "
            f"{local_size * per_replica} GPUs, but there are {count}; launch torchrun with "
            f"--nproc_per_node {max(1, count // per_replica)} or lower per_replica"
        )
    return list(range(local_rank * per_replica, (local_rank + 1) * per_replica))


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "RankFailed",
    "World",
    "alone",
    "init",
    "local_device",
    "replica_gpus",
    "world",
]
