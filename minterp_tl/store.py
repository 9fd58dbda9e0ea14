"""A state store on disk: named tensors as content-addressed safetensors files, with a hashed manifest.

Saved activations, steering vectors and masks grow into gigabytes; a :class:`StateStore` keeps them in
a directory so that saving again after a small change rewrites only what changed, loading verifies
every byte, and comparing a saved state with a fresh one reads nothing from disk (the idea of
git-theta's lazy arrays, with an exact hash).

Layout of a store directory::

    root/
      manifest.json            # the commit point: metadata + one entry per tensor
      objects/<hash>.safetensors   # one tensor per file (key "tensor"), named by its content hash
      .lock                    # fcntl.flock: exclusive for writers, shared for readers

``manifest.json`` holds ``{"format": "minterp_tl.store", "version": 1, "metadata": {str: str},
"tensors": {name: {"shape": [...], "dtype": "float32", "hash": <blake2b hex>, "xxh3": <xxh3-128 hex>,
"file": "objects/<hash>.safetensors", "file_bytes": int, "nbytes": int}}}``.

- :func:`tensor_hash` -- blake2b (32-byte digest) of a tensor's dtype, shape and raw bytes (bfloat16
  and bool included: the bytes are hashed, not the values, so ``-0.0`` and ``0.0`` differ).
- :class:`StateStore` -- :meth:`~StateStore.save` a ``{name: tensor}`` dict (the store then holds
  exactly it; tensors whose hash is already stored are not rewritten), :meth:`~StateStore.load`
  (every tensor checked against its manifest hash), :meth:`~StateStore.lazy` (one
  :class:`LazyTensor` per name, nothing read but the manifest), :meth:`~StateStore.diff`.
- :class:`LazyTensor` -- shape, dtype and hash of a stored tensor; ``lazy == tensor`` hashes
  ``tensor`` and compares hashes without opening the tensor's file; :meth:`LazyTensor.allclose` for
  float noise; :meth:`LazyTensor.load` to read it.
- :class:`SaveReport` -- what a save wrote, kept and removed, and how many bytes it wrote.

Safety. Each object file and the manifest are written to a temporary file in the same directory,
flushed to disk (``fsync``) and renamed over their final name (``os.replace``); the manifest's rename
is the commit point. A writer killed at any moment leaves the previous manifest and every file it
names intact, so the store still loads its previous version. Writers hold an exclusive ``flock`` on
``root/.lock`` for the whole save (two processes saving to one store take turns; the last one to
commit wins, whole); readers hold a shared lock while they read the manifest and files, so a writer's
clean-up never deletes a file under a reader. After each commit the writer deletes object files the
new manifest does not name and temporary files left by killed writers.

Loading is all-or-nothing: a missing, truncated or altered file (hash mismatch) raises a
``ValueError`` naming the tensor and the file, and nothing is returned.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import Tensor

from minterp_tl._checks import did_you_mean
from minterp_tl._store_format import (
    DTYPE_NAMES,
    DTYPES,
    HASH_RE,
    OBJECTS,
    TENSOR_KEY,
    TMP_MARK,
    check_manifest,
    check_metadata,
    decode_object,
    dtype_name,
    fsync_dir,
    read_no_follow,
    tensor_fingerprint,
    tensor_hash,
    write_atomic,
)

FORMAT = "minterp_tl.store"
VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
# The only temporary names a store creates (and so the only ones it deletes): ".tmp-<16 hex>-" + the final
# name (the manifest or an object) or "pending.json" (a writer's list of the objects it is adding).
_TMP_NAME = re.compile(r"\.tmp-[0-9a-f]{16}-(?:manifest\.json|pending\.json|[0-9a-f]{64}\.safetensors)")
_PENDING = "pending.json"

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------------------------------
# Reports and lazy tensors
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaveReport:
    """What one :meth:`StateStore.save` did.

    Attributes:
        written: Names whose tensor changed (or is new) and was stored, in the order given.
        unchanged: Names whose tensor has the hash already stored under that name (not rewritten).
        removed: Names the store held before and the save did not give (dropped from the store).
        bytes_written: Bytes written to disk: new object files plus the manifest. A written name whose
            content is already stored under another name costs no object bytes.
        bytes_total: Bytes of the store after the save (object files plus manifest).
        seconds: Wall time of the save, lock wait included.
    """

    written: list[str]
    unchanged: list[str]
    removed: list[str]
    bytes_written: int
    bytes_total: int
    seconds: float

    def __str__(self) -> str:
        return (
            f"SaveReport: {len(self.written)} written, {len(self.unchanged)} unchanged, "
            f"{len(self.removed)} removed; {self.bytes_written:,} of {self.bytes_total:,} bytes "
            f"written in {self.seconds:.3f} s"
        )


@dataclass(frozen=True, eq=False)
class LazyTensor:
    """A stored tensor that has not been read: its shape, dtype and content hash, and a way to load it.

    ``lazy == other`` is ``True`` exactly when ``other`` (a ``Tensor`` or a ``LazyTensor``) has the same
    shape, dtype and bytes: a tensor is hashed with :func:`tensor_hash` (only if its shape and dtype
    match), and the tensor's file is never opened. The result is one ``bool``, not an elementwise
    tensor. Use :meth:`allclose` to forgive float noise.

    Attributes:
        name: The name in the store.
        shape: The tensor's shape.
        dtype: The tensor's dtype.
        hash: Its :func:`tensor_hash`.
        nbytes: Bytes of the tensor's data.
        store: The store it lives in (for :meth:`load`).
    """

    name: str
    shape: torch.Size
    dtype: torch.dtype
    hash: str
    nbytes: int
    store: StateStore = field(repr=False)

    def load(self) -> Tensor:
        """Read the tensor from the store, verified against :attr:`hash`.

        Raises:
            ValueError: If the file is missing (the store was saved again since, without this
                content), truncated or altered.
        """
        with self.store._locked(shared=True):
            entry = {"shape": list(self.shape), "dtype": DTYPE_NAMES[self.dtype], "hash": self.hash}
            return self.store._read_object(self.name, entry)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LazyTensor):
            return self.shape == other.shape and self.dtype == other.dtype and self.hash == other.hash
        if isinstance(other, Tensor):
            if other.shape != self.shape or other.dtype != self.dtype:
                return False
            return tensor_hash(other) == self.hash
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    def __hash__(self) -> int:
        return hash((self.hash, self.dtype, tuple(self.shape)))

    def allclose(self, other: Union[Tensor, LazyTensor], rtol: float = 1e-5, atol: float = 1e-8) -> bool:
        """``torch.allclose(self.load(), other, rtol, atol)``, without loading when it need not.

        Different shapes give ``False`` and equal hashes ``True`` without reading the file; otherwise
        both are loaded and compared in float64 (bool and integer tensors compare exactly when
        ``rtol`` and ``atol`` are 0, else as numbers). NaNs are never close.

        Args:
            other: A tensor or another lazy tensor.
            rtol: Relative tolerance.
            atol: Absolute tolerance.
        """
        if not isinstance(other, (Tensor, LazyTensor)):
            raise ValueError(f"allclose needs a Tensor or LazyTensor, got {type(other).__name__}.")
        if tuple(other.shape) != tuple(self.shape):
            return False
        if self == other:
            return True
        theirs = other.load() if isinstance(other, LazyTensor) else other.detach().to("cpu")
        return bool(torch.allclose(self.load().double(), theirs.double(), rtol=rtol, atol=atol))

    def __repr__(self) -> str:
        dtype = DTYPE_NAMES[self.dtype]
        return (
            f"LazyTensor({self.name!r}, shape={tuple(self.shape)}, dtype={dtype}, hash={self.hash[:12]}...)"
        )


# --------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------


class StateStore:
    """Named tensors in a directory, saved incrementally, loaded with verification.

    Args:
        root: The store's directory; created (with parents) on the first :meth:`save`.

    Attributes:
        root: The directory, as a ``Path``.
        files_read: How many object files this instance has read (a counter for checking that lazy
            comparisons read nothing).

    Example::

        store = StateStore("runs/clean")
        store.save({"blocks.3.hook_resid_pre": x, "steer": v}, metadata={"model": "smollm2-135m"})
        lazy = store.lazy()
        lazy["steer"] == v          # True, without reading the file
        store.save({"blocks.3.hook_resid_pre": x, "steer": 2 * v}).written   # ["steer"]
        store.load(["steer"])       # {"steer": 2 * v}, verified
    """

    def __init__(self, root: PathLike) -> None:
        if not isinstance(root, (str, os.PathLike)):
            raise ValueError(f"StateStore root must be a path (str or os.PathLike), got {root!r}.")
        self.root = Path(root)
        self.files_read = 0

    # ---- paths and locking ------------------------------------------------------------------------
    @property
    def _manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def _objects(self) -> Path:
        return self.root / OBJECTS

    @contextmanager
    def _locked(self, shared: bool) -> Iterator[None]:
        """Hold ``flock`` on ``root/.lock``: shared for readers, exclusive for writers. A reader of a
        store it cannot write to (read-only copy) reads without the lock."""
        self._refuse_links()
        if not shared:
            self._objects.mkdir(parents=True, exist_ok=True)
            self._refuse_links()
        try:
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise ValueError(
                    f"State store {str(self.root)!r}: {LOCK} is a symbolic link; a store never "
                    "follows links inside its folder."
                ) from None
            if not shared:
                raise
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _refuse_links(self) -> None:
        """A store stays inside its folder: its manifest, objects folder and lock file must not be
        symbolic links (the folder itself may be one: it is what the user named)."""
        for name in (MANIFEST, OBJECTS, LOCK):
            if (self.root / name).is_symlink():
                raise ValueError(
                    f"State store {str(self.root)!r}: {name} is a symbolic link; a store never "
                    "follows links inside its folder. Remove it, or use another folder."
                )

    # ---- reading ------------------------------------------------------------------------------------
    def exists(self) -> bool:
        """Whether a store has been saved at :attr:`root`."""
        return self._manifest_path.is_file()

    def _read_manifest(self) -> dict[str, Any]:
        path = self._manifest_path
        if not path.is_file():
            raise ValueError(
                f"No state store at {str(self.root)!r}: {MANIFEST} not found. Save one first "
                "(StateStore(root).save({...}))."
            )
        self._refuse_links()
        try:
            manifest = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
            raise ValueError(
                f"State store manifest {str(path)!r} is unreadable: {type(err).__name__}."
            ) from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not a minterp_tl state store manifest.")
        if manifest.get("version") != VERSION:
            raise ValueError(
                f"State store {str(self.root)!r} has format version {manifest.get('version')!r}; this "
                f"minterp_tl reads version {VERSION}."
            )
        check_manifest(manifest, str(path))
        return manifest

    def _manifest(self) -> dict[str, Any]:
        with self._locked(shared=True):
            return self._read_manifest()

    @property
    def metadata(self) -> dict[str, str]:
        """The ``{str: str}`` metadata of the last save."""
        return dict(self._manifest()["metadata"])

    def names(self) -> list[str]:
        """The stored names, in the order they were saved."""
        return list(self._manifest()["tensors"])

    def __contains__(self, name: object) -> bool:
        return self.exists() and name in self._manifest()["tensors"]

    def __len__(self) -> int:
        return len(self._manifest()["tensors"]) if self.exists() else 0

    def _check_names(self, names: Iterable[str], known: Mapping[str, Any]) -> list[str]:
        if isinstance(names, str):
            names = [names]
        names = list(names)
        for name in names:
            if name not in known:
                raise ValueError(
                    f"No tensor {name!r}{did_you_mean(name, known, n=5, cutoff=0.5)} in state store "
                    f"{str(self.root)!r}. It holds {len(known)} tensor(s)"
                    + (f", e.g. {list(known)[:5]}." if known else ".")
                )
        return names

    def _read_object(self, name: str, entry: Mapping[str, Any]) -> Tensor:
        """Read one object file and verify it against ``entry``; every problem names ``name``."""
        if not HASH_RE.fullmatch(str(entry["hash"])):
            raise ValueError(
                f"State store {str(self.root)!r}: tensor {name!r} has a malformed hash in the manifest."
            )
        rel = f"{OBJECTS}/{entry['hash']}.safetensors"
        path = self.root / rel
        where = f"tensor {name!r} (file {str(path)!r})"
        try:
            data = read_no_follow(path)
        except FileNotFoundError:
            raise ValueError(
                f"State store {str(self.root)!r}: {where} is missing; the store was saved again without "
                "this content, or the file was deleted."
            ) from None
        except OSError as err:
            raise ValueError(
                f"State store {str(self.root)!r}: {where} cannot be read ({err.strerror}; a symbolic "
                "link inside a store is never followed)."
            ) from None
        self.files_read += 1
        return decode_object(data, entry, f"State store {str(self.root)!r}: {where}")

    def load(self, names: Optional[Iterable[str]] = None) -> dict[str, Tensor]:
        """Read tensors, each verified against its manifest hash; all or nothing.

        Args:
            names: The names to read (``None``: every name, in saved order).

        Returns:
            ``{name: tensor}`` on the CPU, in the order asked.

        Raises:
            ValueError: If there is no store, a name is unknown (the message lists the closest), or a
                file is missing, truncated or altered (the message names the tensor and the file).
        """
        with self._locked(shared=True):
            tensors = self._read_manifest()["tensors"]
            wanted = list(tensors) if names is None else self._check_names(names, tensors)
            return {name: self._read_object(name, tensors[name]) for name in wanted}

    def lazy(self) -> dict[str, LazyTensor]:
        """One :class:`LazyTensor` per stored name (only the manifest is read)."""
        tensors = self._manifest()["tensors"]
        return {
            name: LazyTensor(
                name=name,
                shape=torch.Size(entry["shape"]),
                dtype=DTYPES[entry["dtype"]],
                hash=entry["hash"],
                nbytes=int(entry["nbytes"]),
                store=self,
            )
            for name, entry in tensors.items()
        }

    def diff(self, tensors: Mapping[str, Tensor]) -> dict[str, list[str]]:
        """Compare ``tensors`` with the store by hash, reading no object file.

        Returns:
            ``{"changed": [...], "added": [...], "removed": [...], "unchanged": [...]}``: names whose
            tensor differs from the stored one, names not stored, stored names not given, and names
            whose tensor equals the stored one. A missing store counts every name as added.
        """
        lazy = self.lazy() if self.exists() else {}
        out: dict[str, list[str]] = {"changed": [], "added": [], "removed": [], "unchanged": []}
        for name, t in _check_tensors(tensors).items():
            if name not in lazy:
                out["added"].append(name)
            else:
                out["unchanged" if lazy[name] == t else "changed"].append(name)
        out["removed"] = [n for n in lazy if n not in tensors]
        return out

    # ---- writing ------------------------------------------------------------------------------------
    def save(
        self,
        tensors: Mapping[str, Union[Tensor, LazyTensor]],
        metadata: Optional[Mapping[str, str]] = None,
    ) -> SaveReport:
        """Make the store hold exactly ``tensors`` and ``metadata``, rewriting only what changed.

        Each tensor is fingerprinted (xxh3-128, fast); one whose fingerprint the store already holds
        takes that entry's blake2b hash without hashing again, the others are hashed
        (:func:`tensor_hash`). A tensor whose content is already in the store (under its name or any
        other) is not written again. (xxh3 is not a cryptographic hash: two different tensors with
        the same fingerprint, which no accident produces (chance about 2**-128) but a deliberate
        collision could, would be taken as unchanged; :meth:`load` always verifies the blake2b hash.)
        A :class:`LazyTensor` of this store counts as its hash, unread and unhashed:
        ``d = store.lazy(); d["x"] = new_x; store.save(d)`` hashes and writes only ``new_x`` (a lazy
        tensor of another store is loaded and stored). New content goes to
        ``objects/<hash>.safetensors`` (temporary file, fsync, rename), then the manifest is replaced
        in one rename -- the commit -- and files no longer named are deleted. The whole save holds the
        store's exclusive lock.

        Args:
            tensors: ``{name: tensor or LazyTensor}``; names are non-empty strings; tensors of any
                supported dtype, on any device (stored from a contiguous CPU copy). Names held before
                and not given are removed.
            metadata: ``{str: str}`` saved with the tensors (``None``: none); replaces the previous
                metadata.

        Returns:
            A :class:`SaveReport`.

        Raises:
            ValueError: If a name is not a non-empty str, a value is not a tensor or has an unsupported
                dtype, or ``metadata`` is not ``{str: str}``.
        """
        start = time.perf_counter()
        tensors = _check_tensors(tensors)
        meta = check_metadata(metadata)
        here = self.root.resolve()
        # a lazy tensor of this store is its hash; one of another store is read (outside our lock)
        tensors = {
            name: t.load() if isinstance(t, LazyTensor) and t.store.root.resolve() != here else t
            for name, t in tensors.items()
        }
        prints = {n: None if isinstance(t, LazyTensor) else tensor_fingerprint(t) for n, t in tensors.items()}
        with self._locked(shared=False):
            old = self._read_manifest()["tensors"] if self.exists() else {}
            since = self._manifest_path.stat().st_mtime_ns if old else 0
            # content already stored: hash -> file size, trusted only once its file is checked (see _intact)
            present = {e["hash"]: e["file_bytes"] for e in old.values()}
            checked: dict[str, bool] = {}
            known = {e["xxh3"]: e["hash"] for e in old.values() if "xxh3" in e}  # fingerprint -> hash
            fingerprints = {h: fp for fp, h in known.items()}  # hash -> fingerprint (for lazy tensors)
            hashes = {
                name: t.hash if isinstance(t, LazyTensor) else known.get(prints[name]) or tensor_hash(t)
                for name, t in tensors.items()
            }

            def intact(h: str) -> bool:
                if h not in checked:
                    checked[h] = h in present and self._intact(h, present[h], since)
                return checked[h]

            new = sorted({h for name, h in hashes.items() if not intact(h)})
            if new:  # a journal of what this save adds, so a later save can remove it if this one dies
                self._write_journal(new)
            written, unchanged, bytes_written = [], [], 0
            entries: dict[str, dict[str, Any]] = {}
            for name, t in tensors.items():
                h = hashes[name]
                entry = {
                    "shape": list(t.shape),
                    "dtype": dtype_name(t.dtype),
                    "hash": h,
                    "file": f"{OBJECTS}/{h}.safetensors",
                    "nbytes": t.nbytes if isinstance(t, LazyTensor) else t.numel() * t.element_size(),
                }
                fingerprint = prints[name] or fingerprints.get(h)
                if fingerprint is not None:
                    entry["xxh3"] = fingerprint
                if name in old and old[name]["hash"] == h and intact(h):
                    unchanged.append(name)
                    entry["file_bytes"] = old[name]["file_bytes"]
                else:
                    written.append(name)
                    if intact(h):
                        entry["file_bytes"] = present[h]
                    elif isinstance(t, LazyTensor):
                        raise ValueError(
                            f"tensors[{name!r}] is a LazyTensor of this store whose content is no longer "
                            "stored intact (the store was saved again without it, or its file was deleted or "
                            "damaged); load it before that, or give the tensor itself."
                        )
                    else:
                        data = _st_save({TENSOR_KEY: t.detach().to("cpu").contiguous()})
                        size = write_atomic(self._objects / f"{h}.safetensors", data)
                        entry["file_bytes"] = size
                        bytes_written += size
                        present[h], checked[h] = size, True
                entries[name] = entry
            removed = [n for n in old if n not in tensors]
            manifest = {"format": FORMAT, "version": VERSION, "metadata": meta, "tensors": entries}
            text = json.dumps(manifest, indent=1).encode()
            if written:
                fsync_dir(self._objects)
            bytes_written += write_atomic(self._manifest_path, text)
            fsync_dir(self.root)
            self._collect_garbage({e["hash"] for e in entries.values()}, {e["hash"] for e in old.values()})
            total = len(text) + sum({e["hash"]: e["file_bytes"] for e in entries.values()}.values())
        return SaveReport(written, unchanged, removed, bytes_written, total, time.perf_counter() - start)

    def _intact(self, h: str, file_bytes: int, since: int) -> bool:
        """Whether the stored object ``h`` can be trusted on a re-save: a regular file (not a link) of the
        manifest's size, and, if it changed after the manifest was written, of the right content."""
        path = self._objects / f"{h}.safetensors"
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != file_bytes:
            return False
        if st.st_mtime_ns <= since:
            return True
        try:
            return tensor_hash(_st_load(read_no_follow(path))[TENSOR_KEY]) == h
        except Exception:  # noqa: BLE001 - unreadable or not safetensors: not intact
            return False

    def _write_journal(self, hashes: list[str]) -> None:
        """Record the objects this save is about to add (``.tmp-<hex>-pending.json``, fsynced)."""
        path = self.root / f"{TMP_MARK}{secrets.token_hex(8)}-{_PENDING}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        try:
            os.write(fd, json.dumps({"objects": hashes}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def _collect_garbage(self, keep: set[str], previous: set[str]) -> None:
        """Delete what this store made and no longer needs (called under the exclusive lock, after the
        commit, so no live writer owns a temporary file): objects the previous manifest or a writer's
        journal named that the new manifest does not, and the store's own temporary files. Files it did
        not create (any other name, or an object no manifest or journal of this store named) stay."""
        ours = set(previous)
        journals = [
            e for e in os.scandir(self.root) if _TMP_NAME.fullmatch(e.name) and e.name.endswith(_PENDING)
        ]
        for journal in journals:
            try:
                listed = json.loads(read_no_follow(Path(journal.path)))["objects"]
                ours.update(h for h in listed if isinstance(h, str) and HASH_RE.fullmatch(h))
            except Exception:  # noqa: BLE001 - a journal cut short by a kill: nothing to learn from it
                pass
        for h in ours - keep:
            path = self._objects / f"{h}.safetensors"
            if path.is_file() and not path.is_symlink():
                os.unlink(path)
        for directory in (self.root, self._objects):
            for entry in os.scandir(directory):
                if _TMP_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)

    def __repr__(self) -> str:
        if not self.exists():
            return f"StateStore({str(self.root)!r}, empty)"
        return f"StateStore({str(self.root)!r}, {len(self)} tensors)"


def _check_tensors(tensors: Mapping[str, Union[Tensor, LazyTensor]]) -> dict[str, Union[Tensor, LazyTensor]]:
    if not isinstance(tensors, Mapping):
        raise ValueError(f"tensors must be a mapping {{name: tensor}}, got {type(tensors).__name__}.")
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}.")
        if not isinstance(t, (Tensor, LazyTensor)):
            raise ValueError(
                f"tensors[{name!r}] must be a torch.Tensor (or LazyTensor), got {type(t).__name__}."
            )
        dtype_name(t.dtype, f"tensors[{name!r}]")
    return dict(tensors)


__all__ = ["LazyTensor", "SaveReport", "StateStore", "tensor_hash"]
