"""Idefics3 / SmolVLM (``Idefics3ForConditionalGeneration``; SmolVLM uses the same class).

An image is split into square views (a grid of crops plus a downscaled global view), each
encoded by SigLIP and pixel-shuffled: ``scale_factor^2`` neighbouring patches become one visual
token (width ``scale_factor^2 x vision width``). Each view has its own run of ``image_seq_len``
placeholders between ``<fake_token_around_image>`` markers and row/column tags.

Budget policy: per view. Every view (crop or global) keeps K of its N tokens, so N is fixed and
the selector batches over views; the markers and tags stay. Selection acts after the pixel
shuffle and before the projection, which runs on the kept tokens. Positions follow the
position policy like LLaVA-1.5.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from autoselect.backbones.base import BackboneAdapter
from autoselect.backbones.registry import register_backbone


@register_backbone
class Idefics3Adapter(BackboneAdapter):
    model_types = ("idefics3", "smolvlm")
    image_input_names = ("pixel_values", "pixel_attention_mask")

    @property
    def _connector(self):
        return self.vlm.model.connector

    @property
    def vision_width(self) -> int:
        return int(self.vlm.config.vision_config.hidden_size * self.vlm.config.scale_factor**2)

    @property
    def image_token_id(self) -> int:
        return int(self.vlm.config.image_token_id)

    def visual_tokens(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        """Pixel-shuffled tokens of every real view, batch-major: ``[views, N, width]``."""
        vision = self.vlm.model.vision_model
        views = pixel_values.to(vision.dtype).flatten(0, 1)
        real = _real_views(views)
        views = views[real]
        if pixel_attention_mask is None:
            pixel_mask = torch.ones(views.shape[0], *views.shape[2:], dtype=torch.bool, device=views.device)
        else:
            pixel_mask = pixel_attention_mask.flatten(0, 1)[real].bool()
        size = self.vlm.config.vision_config.patch_size
        patch_mask = pixel_mask.unfold(1, size, size).unfold(2, size, size).sum(dim=(-1, -2)) > 0
        hidden = vision(pixel_values=views, patch_attention_mask=patch_mask).last_hidden_state
        return self._connector.pixel_shuffle(hidden, self._connector.scale_factor)

    def token_counts(self, pixel_values: torch.Tensor, **_: Any) -> list[int]:
        """One entry per real view (the unit the budget applies to): its patches over ``scale_factor^2``."""
        patch, scale = int(self.vlm.config.vision_config.patch_size), int(self.vlm.config.scale_factor)
        height, width = pixel_values.shape[-2:]
        per_view = (height // patch) * (width // patch) // scale**2
        return [per_view] * int(_real_views(pixel_values.flatten(0, 1)).sum())

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._connector.modality_projection(tokens)

    def encoder_outputs(self, projected) -> dict[str, Any]:
        return {"image": BaseModelOutputWithPooling(pooler_output=list(projected))}


def _real_views(views: torch.Tensor) -> torch.Tensor:
    """``[views]`` bool: the views that are not padding (the processor pads view lists with all-zero images)."""
    return (views != 0).flatten(1).any(-1)
