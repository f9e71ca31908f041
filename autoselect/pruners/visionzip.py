"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language
Models", CVPR 2025, arXiv 2412.04467).

Acts BEFORE the LLM (on the vision encoder's output, text-agnostic). Of the K tokens per image:
- K_dominant: the patches the CLS token attends to most at the feature layer (mean over heads);
- K_contextual: NEW tokens. The remaining patches are split, in order, into evenly strided
  "targets" and the rest; each of the rest joins the target whose attention key (mean over heads)
  is most cosine-similar, and a contextual token is ``target + mean(joined tokens)``, as in the
  official code.
K_contextual = round(K * 10 / 64) by default (the paper's 54 + 10 split for 64 tokens; 108 + 20,
162 + 30). Two deviations, both so that exactly K tokens fill K placeholder slots: the CLS token
is not sent as a 65th token (the official code sends it: 54 + 10 + CLS), and each contextual token
takes its target's slot among the sorted indices instead of being appended after the dominant ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from autoselect.backbones import VisionAttention
from autoselect.pruned import PrunedVLM, Selection
from autoselect.selection import gather_tokens, topk_indices

CONTEXTUAL_RATIO = 10 / 64


def zip_tokens(seen: VisionAttention, k: int, contextual: int) -> Selection:
    """VisionZip's K = (k - contextual) dominant + ``contextual`` merged tokens per image."""
    tokens = seen.tokens
    batch, n, _ = tokens.shape
    if not 0 <= contextual <= k <= n:
        raise ValueError(f"need 0 <= contextual ({contextual}) <= K ({k}) <= N ({n})")
    dominant = topk_indices(seen.cls_attention, k - contextual) if k > contextual else tokens.new_zeros(batch, 0).long()
    if contextual == 0:
        return Selection(indices=dominant, num_tokens=n, scores=seen.cls_attention)

    rest_mask = torch.ones(batch, n, dtype=torch.bool, device=tokens.device).scatter(1, dominant, False)
    rest = rest_mask.nonzero()[:, 1].view(batch, n - dominant.shape[1])  # original order
    is_target = torch.zeros(rest.shape[1], dtype=torch.bool, device=tokens.device)
    is_target[torch.arange(0, rest.shape[1], max(1, rest.shape[1] // contextual))[:contextual]] = True
    targets, others = rest[:, is_target], rest[:, ~is_target]

    keys = F.normalize(seen.keys.float(), dim=-1)
    similarity = gather_tokens(keys, others) @ gather_tokens(keys, targets).transpose(1, 2)  # [B, R - c, c]
    assign = F.one_hot(similarity.argmax(-1), contextual).to(tokens.dtype)
    counts = assign.sum(1).clamp(min=1).unsqueeze(-1)
    merged = gather_tokens(tokens, targets) + assign.transpose(1, 2) @ gather_tokens(tokens, others) / counts

    sent = tokens.scatter(1, targets.unsqueeze(-1).expand_as(merged), merged)  # merged token in its target's slot
    indices = torch.cat([dominant, targets], dim=1).sort(-1).values
    return Selection(indices=indices, num_tokens=n, scores=seen.cls_attention, tokens=gather_tokens(sent, indices))


class VisionZip(PrunedVLM):
    """Dominant (CLS-attended) + contextual (merged) tokens; needs ``adapter.vision_attention``."""

    def __init__(
        self, vlm: nn.Module, budget: int | float, contextual_ratio: float = CONTEXTUAL_RATIO, **kwargs: Any
    ) -> None:
        super().__init__(vlm, budget, **kwargs)
        if not 0 <= contextual_ratio <= 1:
            raise ValueError(f"contextual_ratio must be in [0, 1], got {contextual_ratio}")
        self.contextual_ratio = contextual_ratio

    def contextual(self, k: int) -> int:
        return min(k, int(k * self.contextual_ratio + 0.5))

    def select(self, budget: int | float | None = None, **image_inputs: Any) -> tuple[Selection, torch.Tensor]:
        """One vision pass gives the tokens and the attention they are chosen by."""
        with torch.no_grad():
            seen = self.adapter.vision_attention(**image_inputs)
            k = self.resolve_budget(seen.tokens.shape[1], budget)
            selection = zip_tokens(seen, k, self.contextual(k))
        return selection, selection.kept_tokens(seen.tokens)

    def choose(self, tokens: torch.Tensor, k: int, image_inputs: dict[str, Any]) -> Selection:
        """For callers that hold ``tokens`` already (runs the vision tower again for its attention)."""
        seen = dataclasses.replace(self.adapter.vision_attention(**image_inputs), tokens=tokens)
        return zip_tokens(seen, k, self.contextual(k))
