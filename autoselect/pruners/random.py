"""Random selection: the floor every visual-token pruning paper reports (no paper of its own).

Acts BEFORE the LLM: K of each image's N visual tokens, drawn uniformly without replacement from a
seeded ``torch.Generator`` owned by the pruner, so a run is reproducible under its seed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autoselect.pruned import PrunedVLM, Selection
from autoselect.selection import topk_indices


class RandomPruner(PrunedVLM):
    """Uniformly random K-subset per image; the draws advance one seeded generator call by call."""

    def __init__(self, vlm: nn.Module, budget: int | float, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(vlm, budget, **kwargs)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)  # CPU: same draws on every device

    def choose(self, tokens: torch.Tensor, k: int, image_inputs: dict[str, Any]) -> Selection:
        # The top K of i.i.d. uniform scores is a uniform K-subset.
        scores = torch.rand(tokens.shape[:2], generator=self.generator).to(tokens.device)
        return Selection(indices=topk_indices(scores, k), num_tokens=tokens.shape[1], scores=scores)
