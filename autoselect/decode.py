"""From scorer logits to the K kept tokens at inference, as a scorer's ``InferenceOptions`` say.

One function so every caller decodes alike: ``AutoSelectModel`` on its VLM, and the registered
MLflow pyfunc (``mlops.registry``), which holds the scorer alone.
"""

from __future__ import annotations

import torch

from autoselect.config import InferenceOptions
from autoselect.pruners.uniform import grid_indices, square_side
from autoselect.selection import dpp_indices, seeded_ranking, topk_dpp_indices, topk_indices


def ranking(scores: torch.Tensor, options: InferenceOptions) -> torch.Tensor:
    """What the top-K decode keeps the top K of: the logits, or with ``noise`` a seeded sample."""
    return seeded_ranking(scores, options.noise, options.seed)


def decode_among(scores: torch.Tensor, tokens: torch.Tensor, k: int, options: InferenceOptions) -> torch.Tensor:
    """The decode itself (top-K, DPP, or top-K then DPP) over the tokens given."""
    if options.decode == "dpp":
        return dpp_indices(scores, tokens, k, options.dpp_quality_scale)
    if options.decode == "topk_dpp":
        return topk_dpp_indices(scores, tokens, k, options.dpp_share, options.dpp_quality_scale, options.dpp_head_quality_scale)
    return topk_indices(ranking(scores, options), k)


def kept_indices(scores: torch.Tensor, tokens: torch.Tensor, k: int, options: InferenceOptions) -> torch.Tensor:
    """The ``k`` kept indices ``[num_images, k]`` (sorted) of ``tokens [num_images, N, D]`` given
    their logits ``scores``: the top K of `ranking`, or with ``decode="dpp"`` the greedy DPP-MAP
    over the tokens' cosine kernel weighted by the logits, or with ``decode="topk_dpp"`` the top
    of the logits for part of K and that DPP for the rest; with ``grid_reserve`` an even grid of
    that share of K first (the uniform baseline's lattice), the decode choosing the rest among the
    other tokens."""
    reserve = round(options.grid_reserve * k)
    if not reserve:
        return decode_among(scores, tokens, k, options)
    n = tokens.shape[1]
    side = square_side(n, "inference.grid_reserve")
    fixed = grid_indices(reserve, side, side).to(scores.device)
    if reserve == k:
        return fixed.expand(scores.shape[0], -1).clone()
    others = torch.ones(n, dtype=torch.bool, device=scores.device)
    others[fixed] = False
    others = others.nonzero()[:, 0]
    picked = others[decode_among(scores[:, others], tokens[:, others], k - reserve, options)]
    return torch.cat([fixed.expand(scores.shape[0], -1), picked], dim=1).sort(-1).values
