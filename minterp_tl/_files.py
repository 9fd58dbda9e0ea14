"""Atomic file writes: a temporary file in the target folder, flushed to disk, then renamed over the
target, so a reader never sees a half-written file. The result gets the usual permissions (0666 less
the umask), not ``mkstemp``'s private 0600."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Union

from minterp_tl import distributed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Union[str, os.PathLike[str]], write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it and rename it to ``path``.

    Args:
        path: The file to write; its folder must exist.
        write: Writes the content to the binary file object it is given.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir() or not folder.is_dir():  # before anything is computed into the file
        what = "is a folder" if path.is_dir() else f"is in {str(folder)!r}, which is not an existing folder"
        raise ValueError(f"cannot write {str(path)!r}: it {what}; give a file path in an existing folder")
    fd, tmp = tempfile.mkstemp(
        dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_png(fig: Any, path: Union[str, os.PathLike[str]], dpi: int = 120) -> Path:
    """Save ``fig`` (a ``matplotlib.figure.Figure``) to ``path`` as a PNG, atomically. Figures made
    with ``Figure(...)`` need no pyplot, so plotting never changes the caller's matplotlib backend
    (inline figures in notebooks keep working). Under ``torchrun`` only rank 0 writes (every rank
    returns the path)."""
    if not distributed.world().main:
        return Path(path)
    return atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=dpi))


__all__ = ["atomic_write", "save_png"]
