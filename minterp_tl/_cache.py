"""The on-disk model cache shared by the loaders in :mod:`minterp_tl.models` and :mod:`minterp_tl.induction`.

One rule for every cache file: written atomically (temporary file, fsync, rename), read without following
a symbolic link, checked against the content hash recorded when it was written, and, when anything is
wrong, reported with a warning that names the file and rebuilt by the caller (never a crash, never
silently wrong weights).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from minterp_tl._files import atomic_write
from minterp_tl._store_format import open_regular, read_no_follow, tensor_hash

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

_CHUNK = 1 << 22


def default_cache_dir() -> Path:
    """Where trained and converted models are cached: ``$MINTERP_TL_CACHE`` or ``~/.cache/minterp_tl``."""
    return Path(os.environ.get("MINTERP_TL_CACHE", Path.home() / ".cache" / "minterp_tl"))


def package_version(name: str) -> str:
    """The installed version of distribution ``name`` (``"missing"`` when it is not installed)."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "missing"


def set_name(model: TransformerBridge, name: str) -> TransformerBridge:
    """Tag ``model`` with the name :func:`minterp_tl.models.model_info` reports."""
    # A plain attribute on the module (not a parameter or buffer).
    object.__setattr__(model, "_minterp_name", name)
    return model


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fh.write(data))


def read_buffer(path: Path) -> bytearray:
    """The bytes of the regular file ``path`` in a new (writable) ``bytearray``; a symbolic link is refused
    (``OSError``), never followed."""
    fd = open_regular(path)
    with os.fdopen(fd, "rb", buffering=0) as fh:
        buffer = bytearray(os.fstat(fd).st_size)
        view, done = memoryview(buffer), 0
        while done < len(buffer) and (n := fh.readinto(view[done:])):
            done += n
    if done != len(buffer):
        raise OSError(f"{path.name} changed size while it was read")
    return buffer


def file_sha256(path: Path) -> str:
    """sha256 (hex) of the regular file ``path``, read in chunks; a symbolic link is refused (``OSError``)."""
    h = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb", buffering=0) as fh:
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        while n := fh.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


def state_hash(state: dict[str, Tensor]) -> str:
    """One blake2b hash over every tensor's name and :func:`minterp_tl.store.tensor_hash`."""
    h = hashlib.blake2b(digest_size=32)
    for name in sorted(state):
        h.update(f"{name}={tensor_hash(state[name])};".encode())
    return h.hexdigest()


def warn_not_used(who: str, what: str, path: Path, problem: str, then: str, stacklevel: int = 3) -> None:
    """The warning for a cache entry that is not used: it names the caller, the file and the problem."""
    warnings.warn(
        f"{who}: {what} {str(path)!r} is not used: {problem}. {then}",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )


def read_cached_weights(path: Path, who: str, then: str) -> Optional[dict[str, Tensor]]:
    """The tensors of the safetensors file ``path`` if it is intact (readable, not a link, its
    ``content_hash`` metadata equal to :func:`state_hash` of its tensors), else ``None`` after a
    warning that names the file (``then`` says what the caller does instead)."""
    from safetensors.torch import load as st_load

    try:
        data = read_no_follow(path)
        state = st_load(data)
        recorded = _safetensors_metadata(data).get("content_hash")
        if recorded is None:
            problem = "it records no content hash (written by an older version)"
        elif recorded != state_hash(state):
            problem = "its content does not match its hash (the file was altered or corrupted)"
        else:
            return state
    except Exception as err:  # noqa: BLE001 - any unreadable cache file is rebuilt
        problem = f"it cannot be read ({type(err).__name__}: {err})"
    warn_not_used(who, "the cached model", path, problem, then)
    return None


def safetensors_views(buffer: bytearray) -> dict[str, Tensor]:
    """The tensors of a safetensors file's bytes as views into ``buffer`` (no copy; they keep it alive).

    Raises:
        ValueError: The header is not a safetensors header of tensors that fit in ``buffer``.
    """
    dtypes = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }
    size = int.from_bytes(buffer[:8], "little")
    start = 8 + size
    if len(buffer) < start:
        raise ValueError("the header is longer than the file")
    header = json.loads(bytes(buffer[8:start]))
    out: dict[str, Tensor] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = dtypes[spec["dtype"]], spec["shape"], spec["data_offsets"]
        numel = 1
        for dim in shape:
            numel *= int(dim)
        if not 0 <= begin <= end <= len(buffer) - start or end - begin != numel * dtype.itemsize:
            raise ValueError(f"tensor {name!r} does not fit in the file")
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        else:
            out[name] = torch.frombuffer(buffer, dtype=dtype, count=numel, offset=start + begin).view(shape)
    return out


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes (its header is checked by the loader)."""
    size = int.from_bytes(data[:8], "little")
    return dict(json.loads(data[8 : 8 + size]).get("__metadata__") or {})


__all__ = [
    "atomic_write_bytes",
    "default_cache_dir",
    "file_sha256",
    "package_version",
    "read_buffer",
    "read_cached_weights",
    "read_no_follow",
    "safetensors_views",
    "set_name",
    "state_hash",
    "warn_not_used",
]
