"""Write a matplotlib figure to a PNG atomically (a temporary file in the same folder, then rename)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Union


def save_png(fig: Any, path: Union[str, Path], dpi: int = 120) -> Path:
    """Save ``fig`` to ``path`` as a PNG and close it; the file is never left half-written."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
