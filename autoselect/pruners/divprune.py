"""DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
Models", CVPR 2025, arXiv 2503.02175).

Acts BEFORE the LLM (on its input, layer 0): keeps the K tokens of each image that greedily solve
the max-min diversity problem on cosine distance. As in the official code the first token is the
one farthest from its nearest neighbour, then each step adds the token farthest from everything
kept so far. The official code measures distance between the projected tokens (the LLM's input
embeddings); ``space="vision"`` uses the pre-projector features instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autoselect.pruned import PrunedVLM, Selection
from autoselect.selection import cosine_kernel

SPACES = ("projected", "vision")


def max_min_diverse(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diverse subset of ``features [B, N, D]`` under cosine distance: ``[B, k]`` sorted."""
    batch, n = features.shape[:2]
    if not 1 <= k <= n:
        raise ValueError(f"budget K={k} must be between 1 and the {n} visual tokens")
    distance = 1.0 - cosine_kernel(features)  # [B, N, N]
    rows = torch.arange(batch, device=features.device)
    self_pairs = torch.eye(n, dtype=torch.bool, device=features.device)
    chosen = torch.empty(batch, k, dtype=torch.long, device=features.device)
    chosen[:, 0] = distance.masked_fill(self_pairs, float("inf")).amin(-1).argmax(-1)
    to_chosen = distance[rows, chosen[:, 0]]  # [B, N]: distance to the nearest kept token
    taken = torch.zeros(batch, n, dtype=torch.bool, device=features.device)
    for i in range(1, k):
        taken[rows, chosen[:, i - 1]] = True  # never re-pick (duplicates would tie at distance 0)
        chosen[:, i] = to_chosen.masked_fill(taken, -float("inf")).argmax(-1)
        to_chosen = torch.minimum(to_chosen, distance[rows, chosen[:, i]])
    return chosen.sort(-1).values


class DivPrune(PrunedVLM):
    """Max-min diversity selection per image."""

    def __init__(self, vlm: nn.Module, budget: int | float, space: str = "projected", **kwargs: Any) -> None:
        super().__init__(vlm, budget, **kwargs)
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        self.space = space

    def choose(self, tokens: torch.Tensor, k: int, image_inputs: dict[str, Any]) -> Selection:
        features = self.adapter.project(tokens) if self.space == "projected" else tokens
        return Selection(indices=max_min_diverse(features, k), num_tokens=tokens.shape[1])
