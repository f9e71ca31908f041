"""The oracle: keep the K visual tokens that overlap the answer's box most (evaluation only).

It reads where the answer is (`Example.boxes`), which no real selector may, so it is the ceiling
any selector can reach at a budget on tasks that know their boxes, and a check that a task can
show selection at all: if the oracle does not clear random by a wide margin, selection cannot
matter on that task. Patches are scored by the share of their area inside the boxes; ties (the
patches wholly inside, or outside) go to the patch whose centre is nearest a box's centre, so for
K above the box's patches the oracle keeps the box's surroundings, not arbitrary background.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from autoselect.pruned import PrunedVLM, Selection
from autoselect.pruners.uniform import square_side
from autoselect.selection import topk_indices

ORACLE = "oracle"
Box = tuple[float, float, float, float]


def box_scores(boxes: Sequence[Box], rows: int, cols: int) -> torch.Tensor:
    """``[rows * cols]`` row-major: each patch's area share inside ``boxes`` (in [0, 1]), plus a
    tie-breaker below the smallest share step that prefers patches near a box's centre."""
    y0 = torch.arange(rows, dtype=torch.float64)[:, None] / rows
    x0 = torch.arange(cols, dtype=torch.float64)[None, :] / cols
    inside = torch.zeros(rows, cols, dtype=torch.float64)
    nearest = torch.full((rows, cols), math.inf, dtype=torch.float64)
    for bx0, by0, bx1, by1 in boxes:
        width = ((x0 + 1 / cols).clamp(max=bx1) - x0.clamp(min=bx0)).clamp(min=0) * cols
        height = ((y0 + 1 / rows).clamp(max=by1) - y0.clamp(min=by0)).clamp(min=0) * rows
        inside = torch.maximum(inside, width * height)
        centre = torch.hypot(x0 + 0.5 / cols - (bx0 + bx1) / 2, y0 + 0.5 / rows - (by0 + by1) / 2)
        nearest = torch.minimum(nearest, centre)
    return (inside - 1e-6 * nearest / math.sqrt(2)).reshape(-1).float()


class OraclePruner(PrunedVLM):
    """K tokens by their overlap with the current examples' answer boxes (`prepare` sets them)."""

    def __init__(self, vlm: nn.Module, budget: int | float, **kwargs: Any) -> None:
        super().__init__(vlm, budget, **kwargs)
        self.boxes: list[Sequence[Box]] | None = None  # one list of boxes per image of the next call

    def prepare(self, examples: Sequence) -> None:
        """The boxes of the examples whose images the next call sees, in order."""
        missing = [e.id for e in examples if not e.boxes]
        if missing:
            raise ValueError(f"the oracle needs answer boxes; examples {missing[:3]} have none")
        self.boxes = [e.boxes for e in examples]

    def choose(self, tokens: torch.Tensor, k: int, image_inputs: dict[str, Any]) -> Selection:
        if self.boxes is None or len(self.boxes) != tokens.shape[0]:
            raise ValueError(f"the oracle was prepared for {0 if self.boxes is None else len(self.boxes)} "
                             f"images but sees {tokens.shape[0]}: call prepare(examples) first")
        side = square_side(tokens.shape[1], "the oracle")
        scores = torch.stack([box_scores(b, side, side) for b in self.boxes]).to(tokens.device)
        return Selection(indices=topk_indices(scores, k), num_tokens=tokens.shape[1], scores=scores)
