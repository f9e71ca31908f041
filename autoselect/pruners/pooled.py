"""Pooled grid: average-pool the patch grid down to K tokens (no paper of its own: the plain
downsampling that recent benchmarks find hard to beat at low budgets).

Acts BEFORE the LLM and ignores the image content, like `UniformPruner`, but instead of keeping
K patches it keeps K NEW tokens: the K evenly spread lattice points of ``grid_indices`` are cell
centres of even cells (bands of rows split into even runs of columns), and each kept token is
the mean of its cell's pre-projector tokens. For K = a² on a grid divisible by ``a`` the cells are the a x a blocks of
``adaptive_avg_pool2d``; for any other K the cells are as even as the lattice. Each pooled token
takes its centre's slot (and, with ``position_policy="original"``, its position).
"""

from __future__ import annotations

from typing import Any

import torch

from autoselect.pruned import Selection
from autoselect.pruners.uniform import UniformPruner, grid_indices, lattice_counts


def cell_assignment(k: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(centres [K], cell [N])``: the lattice's patch indices and, for every patch, the index
    (0..K-1) of the `lattice_counts` cell it lies in (the cell whose centre ``grid_indices`` keeps)."""
    counts = lattice_counts(k, rows, cols)
    first = torch.tensor([0, *counts]).cumsum(0)  # index of each band's first cell
    row, col = torch.arange(rows)[:, None], torch.arange(cols)[None, :]
    # a patch joins the band / cell that holds its centre (patch c spans [c, c + 1) of the grid)
    band = (2 * row + 1) * len(counts) // (2 * rows)  # [rows, 1]
    per_band = torch.tensor(counts)[band]
    cell = first[band] + (2 * col + 1) * per_band // (2 * cols)  # [rows, cols]
    return grid_indices(k, rows, cols), cell.reshape(-1)


class PooledGrid(UniformPruner):
    """The mean of each of K even cells of the patch grid, in the cells' centre slots."""

    def choose(self, tokens: torch.Tensor, k: int, image_inputs: dict[str, Any]) -> Selection:
        centres, cell = cell_assignment(k, *self.grid_shape(tokens.shape[1]))
        centres, cell = centres.to(tokens.device), cell.to(tokens.device)
        members = torch.nn.functional.one_hot(cell, k).to(tokens.dtype)  # [N, K]
        pooled = torch.einsum("bnd,nk->bkd", tokens, members) / members.sum(0)[None, :, None]
        return Selection(indices=centres.expand(tokens.shape[0], -1), num_tokens=tokens.shape[1], tokens=pooled)
