"""Atomic writes: whole files with the usual permissions, nothing left behind by a failed write."""

from __future__ import annotations

import os

import pytest
from matplotlib.figure import Figure

from minterp_tl._files import atomic_write, save_png


def test_atomic_write_gives_umask_permissions_and_replaces_whole(tmp_path):
    mask = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "a.bin", lambda fh: fh.write(b"first"))
        assert path.read_bytes() == b"first"
        assert os.stat(path).st_mode & 0o777 == 0o644  # not mkstemp's 0600
        atomic_write(path, lambda fh: fh.write(b"second"))
        assert path.read_bytes() == b"second" and os.listdir(tmp_path) == ["a.bin"]
    finally:
        os.umask(mask)


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic_write(tmp_path / "a.bin", lambda fh: fh.write(b"old"))

    def broken(fh):
        fh.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]


def test_save_png_writes_a_png(tmp_path):
    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])
    path = save_png(fig, tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.listdir(tmp_path) == ["p.png"]
