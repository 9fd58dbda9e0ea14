"""Write a matplotlib figure to a PNG atomically (a temporary file in the same folder, then rename)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Union


def save_png(fig: Any, path: Union[str, Path], dpi: int = 120) -> Path:
    """Save ``fig`` (a ``matplotlib.figure.Figure``) to ``path`` as a PNG; the file is never left
    half-written. Figures made with ``Figure(...)`` need no pyplot, so plotting never changes the
    caller's matplotlib backend (inline figures in notebooks keep working)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
