"""The plotting pieces the report and the MoE usage share: an annotated heatmap of shares, a figure as PNG."""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def share_heatmap(
    fig: Any, ax: Any, values: np.ndarray, rows: list[str], columns: list[str], title: str, fontsize: int
) -> None:
    """Shares in [0, 1] as an annotated heatmap (routing weights, MoE expert usage)."""
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xticks(range(len(columns)), columns, fontsize=7)
    for (i, j), w in np.ndenumerate(values):
        ax.text(j, i, f"{w:.2f}", ha="center", va="center", fontsize=fontsize, color="w" if w < 0.6 else "k")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)


def png_bytes(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
