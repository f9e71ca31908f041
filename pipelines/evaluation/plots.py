"""Two figures: average retention vs budget per method, and the patches each method keeps on one
image (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from autoselect.pruners.uniform import square_side
from pipelines.evaluation.methods import AUTOSELECT, FULL


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def retention_plot(report: dict[str, Any], path: Path) -> Path:
    """Average retention % against K, one line per method, all tokens at 100 %."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    n = report["visual_tokens_per_image"]
    for method, by_budget in report["results"].items():
        if method == FULL:
            continue
        points = sorted((row["k"], row["average_retention"]) for row in by_budget.values() if row["average_retention"] is not None)
        if points:
            ax.plot(*zip(*points), marker="o", label=method, linewidth=2.5 if method == AUTOSELECT else 1.5)
    ax.axhline(100.0, color="grey", linestyle="--", linewidth=1, label=f"all {n} tokens")
    ax.set_xlabel(f"visual tokens kept per image (K of N = {n})")
    ax.set_ylabel("average retention (%)")
    ax.set_title(f"{report['model']}\n{', '.join(report['tasks']) or 'no tasks'}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def processed_image(pixel_values: torch.Tensor, processor) -> np.ndarray:
    """The ``[3, H, W]`` image the vision tower saw, un-normalised to ``[H, W, 3]`` in [0, 1]."""
    image_processor = processor.image_processor
    mean = np.asarray(image_processor.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(image_processor.image_std, dtype=np.float32)[:, None, None]
    return np.clip(pixel_values.float().cpu().numpy() * std + mean, 0, 1).transpose(1, 2, 0)


def kept_patches_plot(
    image: np.ndarray, num_tokens: int, panels: Sequence[tuple[str, torch.Tensor | None]], path: Path, title: str
) -> Path:
    """``image`` once per panel with the patches outside ``indices`` darkened (None: all kept)."""
    side = square_side(num_tokens, "the kept-patches plot")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(2.8 * len(panels), 3.2), squeeze=False)
    height, width = image.shape[:2]
    for ax, (name, indices) in zip(axes[0], panels):
        kept = np.ones(num_tokens, dtype=bool)
        if indices is not None:
            kept[:] = False
            kept[indices.cpu().numpy()] = True
        shade = np.zeros((side, side, 4), dtype=np.float32)
        shade[..., 3] = np.where(kept.reshape(side, side), 0.0, 0.72)
        ax.imshow(image, interpolation="nearest", extent=(0, width, height, 0))
        ax.imshow(shade, interpolation="nearest", extent=(0, width, height, 0))
        ax.set_title(f"{name}\n{int(kept.sum())} of {num_tokens} kept", fontsize=8)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
