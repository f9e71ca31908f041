"""Uniform spatial grid: K patches spread evenly over the 2-D patch grid (no paper: the
pooling-style baseline, e.g. a stride-2 lattice for K = N / 4).

Acts BEFORE the LLM and ignores the image content. Exactly K for any K: the kept patches lie on
``a`` evenly spaced rows with ``K // a`` or ``K // a + 1`` evenly spaced patches each, each point at
the centre of its cell. For a square K = a² on a grid divisible by ``a`` this is strided pooling's
lattice (N = 576, K = 144: every second row and column).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from autoselect.pruned import PrunedVLM, Selection


def square_side(num_tokens: int, needed_by: str) -> int:
    """The side of a square patch grid of ``num_tokens``; a ``ValueError`` naming ``needed_by``
    and the count when they are not one (e.g. LLaVA-NeXT's or Qwen-VL's token layouts)."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{needed_by} needs a square patch grid; {num_tokens} visual tokens are not one")
    return side


def lattice_counts(k: int, rows: int, cols: int) -> list[int]:
    """How many of ``k`` lattice points each lattice row holds: the lattice splits the grid into
    ``len(counts)`` even bands of rows, band ``i`` into ``counts[i]`` even cells."""
    if not 1 <= k <= rows * cols:
        raise ValueError(f"budget K={k} must be between 1 and the {rows * cols} visual tokens")
    # Enough lattice rows for k points (ceil) but no more than the grid has; near-square cells.
    lattice_rows = max(math.ceil(k / cols), min(rows, k, round(math.sqrt(k * rows / cols))))
    base, extra = divmod(k, lattice_rows)
    return [base + (i + 1) * extra // lattice_rows - i * extra // lattice_rows for i in range(lattice_rows)]  # extras spread


def grid_indices(k: int, rows: int, cols: int) -> torch.Tensor:
    """Sorted indices (row-major) of ``k`` patches spread evenly over a ``rows x cols`` grid: the
    centres of the `lattice_counts` cells."""
    counts = lattice_counts(k, rows, cols)
    picked = []
    for i, count in enumerate(counts):
        row = (2 * i + 1) * rows // (2 * len(counts))  # cell centres, in exact integer arithmetic
        picked.extend(row * cols + (2 * j + 1) * cols // (2 * count) for j in range(count))
    return torch.tensor(picked, dtype=torch.long)


class UniformPruner(PrunedVLM):
    """The same evenly spread K patches for every image."""

    def __init__(self, vlm: nn.Module, budget: int | float, grid: tuple[int, int] | None = None, **kwargs: Any):
        super().__init__(vlm, budget, **kwargs)
        self.grid = grid  # (rows, cols) of the patch grid; None: square, side sqrt(N)

    def grid_shape(self, num_tokens: int) -> tuple[int, int]:
        if self.grid is not None:
            if self.grid[0] * self.grid[1] != num_tokens:
                raise ValueError(f"grid {self.grid} does not hold the {num_tokens} visual tokens")
            return self.grid
        side = square_side(num_tokens, "the uniform pruner without grid=(rows, cols)")
        return side, side

    def choose(self, tokens: torch.Tensor, k: int, image_inputs: dict[str, Any]) -> Selection:
        indices = grid_indices(k, *self.grid_shape(tokens.shape[1])).to(tokens.device)
        return Selection(indices=indices.expand(tokens.shape[0], -1), num_tokens=tokens.shape[1])
