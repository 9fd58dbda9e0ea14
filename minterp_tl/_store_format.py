"""The bytes of a state store: dtype names, content hashes, and the checks of what a store reads.

Used by :mod:`minterp_tl.store` (which re-exports :func:`tensor_hash`) and by the model cache. Nothing here
knows about a store's folder, its lock or its saves: only how a tensor is named, hashed and checked.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch
import xxhash
from safetensors.torch import load as _st_load
from torch import Tensor

OBJECTS = "objects"
TMP_MARK = ".tmp-"  # a temporary file: TMP_MARK + 16 hex digits + "-" + the name it will be renamed to
TENSOR_KEY = "tensor"
HASH_RE = re.compile(r"[0-9a-f]{64}")
_XXH3 = re.compile(r"[0-9a-f]{32}")
_HASH_PREFIX = b"minterp_tl.tensor_hash.v1"

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype, what: str = "tensor") -> str:
    name = DTYPE_NAMES.get(dtype)
    if name is None:
        raise ValueError(
            f"{what} has dtype {dtype}, which the store cannot hold; supported dtypes: {sorted(DTYPES)}."
        )
    return name


def _raw_bytes(t: Tensor) -> Any:
    """The bytes of ``t`` in memory order as a flat uint8 numpy array (no copy for a contiguous CPU
    tensor)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def tensor_hash(t: Tensor) -> str:
    """The content hash of a tensor: blake2b (32-byte digest, hex) of its dtype, shape and raw bytes.

    Two tensors have the same hash exactly when they have the same dtype, shape and bytes (so
    ``-0.0`` and ``0.0`` differ, and NaNs with the same bit pattern are equal). Device, strides,
    ``requires_grad`` and views do not matter: the tensor is hashed as a contiguous CPU copy.

    Args:
        t: Any tensor of a supported dtype (float64/32/16, bfloat16, int64/32/16/8, uint8, bool).

    Returns:
        64 hex characters.

    Raises:
        ValueError: If ``t`` is not a tensor or has an unsupported dtype.
    """
    if not isinstance(t, Tensor):
        raise ValueError(f"tensor_hash needs a torch.Tensor, got {type(t).__name__}.")
    h = hashlib.blake2b(digest_size=32)
    h.update(_HASH_PREFIX)
    h.update(json.dumps([dtype_name(t.dtype), list(t.shape)]).encode())
    h.update(_raw_bytes(t))
    return h.hexdigest()


def tensor_fingerprint(t: Tensor) -> str:
    """A fast content fingerprint (xxh3-128 of dtype, shape and raw bytes; about 20x faster than
    blake2b here), used only by :meth:`StateStore.save` to see which tensors are unchanged."""
    h = xxhash.xxh3_128()
    h.update(json.dumps([dtype_name(t.dtype), list(t.shape)]).encode())
    h.update(_raw_bytes(t))
    return h.hexdigest()


def open_regular(path: Path) -> int:
    """A read-only descriptor of the regular file ``path``: a symbolic link (``OSError`` with ``ELOOP``)
    is never followed, and a FIFO or device is refused (``OSError``) rather than blocked on."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


def read_no_follow(path: Path) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_regular`)."""
    with os.fdopen(open_regular(path), "rb") as f:
        return f.read()


def check_manifest(manifest: dict[str, Any], where: str) -> None:
    """Every field of a manifest has the type and form the store writes; anything else is a ValueError
    that says what is wrong (never a KeyError, a TypeError or a path outside the store)."""
    metadata, tensors = manifest.get("metadata"), manifest.get("tensors")
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError(f"State store manifest {where!r}: 'metadata' must map strings to strings.")
    if not isinstance(tensors, dict):
        raise ValueError(f"State store manifest {where!r}: 'tensors' must be a mapping of names to entries.")
    for name, e in tensors.items():
        bad = None
        if not isinstance(e, dict):
            bad = "is not a mapping"
        elif not isinstance(e.get("hash"), str) or not HASH_RE.fullmatch(e["hash"]):
            bad = "has a hash that is not 64 hex digits"
        elif e.get("file") != f"{OBJECTS}/{e['hash']}.safetensors":
            bad = "names a file other than its hash's object"
        elif e.get("dtype") not in DTYPES:
            bad = f"has an unknown dtype {e.get('dtype')!r}"
        elif not isinstance(e.get("shape"), list) or not all(type(d) is int and d >= 0 for d in e["shape"]):
            bad = "has a shape that is not a list of non-negative integers"
        elif not all(type(e.get(k)) is int and e[k] >= 0 for k in ("file_bytes", "nbytes")):
            bad = "has file_bytes / nbytes that are not non-negative integers"
        elif "xxh3" in e and not (isinstance(e["xxh3"], str) and _XXH3.fullmatch(e["xxh3"])):
            bad = "has a malformed xxh3 fingerprint"
        if bad:
            raise ValueError(f"State store manifest {where!r}: the entry of tensor {str(name)[:80]!r} {bad}.")


def check_metadata(metadata: Optional[Mapping[str, str]]) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError(f"metadata must be a mapping of str to str, got {metadata!r}.")
    return dict(metadata)


def decode_object(data: bytes, entry: Mapping[str, Any], where: str) -> Tensor:
    """The tensor in an object file's bytes, checked against its manifest ``entry`` (size, shape, dtype and
    :func:`tensor_hash`); a ``ValueError`` starting with ``where`` says what does not match."""
    expected_bytes = entry.get("file_bytes")
    if expected_bytes is not None and len(data) != expected_bytes:
        raise ValueError(
            f"{where} is truncated or altered: {len(data)} bytes on disk, {expected_bytes} in the manifest."
        )
    try:
        tensor = _st_load(data)[TENSOR_KEY]
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{where} is damaged: {err}.") from None
    if list(tensor.shape) != list(entry["shape"]) or DTYPE_NAMES.get(tensor.dtype) != entry["dtype"]:
        raise ValueError(
            f"{where} holds a {tensor.dtype} tensor of shape {tuple(tensor.shape)}, the manifest says "
            f"{entry['dtype']} {tuple(entry['shape'])}."
        )
    if tensor_hash(tensor) != entry["hash"]:
        raise ValueError(
            f"{where} fails its integrity check: the content hash does not match the manifest (the file "
            "was altered or corrupted)."
        )
    return tensor


def write_atomic(path: Path, data: Union[bytes, memoryview]) -> int:
    """Write ``data`` to a fresh temporary file beside ``path``, fsync it and rename it over ``path``;
    returns the bytes written."""
    tmp = path.with_name(f"{TMP_MARK}{secrets.token_hex(8)}-{path.name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(data)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "HASH_RE",
    "OBJECTS",
    "TENSOR_KEY",
    "TMP_MARK",
    "check_manifest",
    "check_metadata",
    "decode_object",
    "dtype_name",
    "fsync_dir",
    "open_regular",
    "read_no_follow",
    "tensor_fingerprint",
    "tensor_hash",
    "write_atomic",
]
