"""Attention heatmaps per site (one PNG per layer's site, one panel per head)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def write_heatmaps(probs: dict[str, np.ndarray], sites, out_dir: str | Path, batch_row: int = 0) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attn_opt.core.io import atomic_path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for s in sites:
        if s.id not in probs:
            continue
        p = probs[s.id][min(batch_row, probs[s.id].shape[0] - 1)]  # [H, Tq, Tk]
        h = p.shape[0]
        cols = min(h, 4)
        rows = math.ceil(h / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i < h:
                ax.imshow(p[i], cmap="viridis", vmin=0, vmax=max(1e-9, float(p[i].max())))
                ax.set_title(f"head {i}", fontsize=9)
        fig.suptitle(f"{s.id} (layer {s.layer}, {s.kind}) {s.scope or ''}", fontsize=10)
        path = out_dir / f"{s.id}_layer{s.layer}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=80, format="png")
        plt.close(fig)
        written.append(path)
    return written
