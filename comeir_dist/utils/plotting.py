"""Matplotlib without a display, figures written atomically (a reader never sees a half-written PNG)."""
from __future__ import annotations

import os


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no screen on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write ``fig`` as PNG to ``path`` through a temp file + rename, then free it."""
    from comeir_dist.utils.atomic import atomic_file

    try:
        fig.tight_layout()
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        pyplot().close(fig)
