"""Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP tokens average-pooled to a fixed grid
(256 at full scale), then an RMS norm and a linear map.

Selection acts on the pooled tokens (the LM-facing grid, so N = ``mm_tokens_per_image``); the
norm and linear map run on the kept ones. Gemma 3 lets the tokens of one image attend to each
other both ways (``token_type_ids`` marks them); the kept tokens stay one contiguous block, so
``token_type_ids`` is pruned with the placeholders and the block stays bidirectional. Positions
follow the position policy like LLaVA-1.5.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from autoselect.backbones.base import BackboneAdapter
from autoselect.backbones.registry import register_backbone


@register_backbone
class Gemma3Adapter(BackboneAdapter):
    model_types = ("gemma3",)
    token_input_names = ("token_type_ids",)

    @property
    def _projector(self):
        return self.vlm.model.multi_modal_projector

    @property
    def vision_width(self) -> int:
        return int(self.vlm.config.vision_config.hidden_size)

    @property
    def image_token_id(self) -> int:
        return int(self.vlm.config.image_token_id)

    def visual_tokens(self, pixel_values: torch.Tensor, **_: Any) -> torch.Tensor:
        """The projector's pooled grid, before its norm: ``[num_images, mm_tokens_per_image, width]``."""
        tower = self.vlm.model.vision_tower
        hidden = tower(pixel_values=pixel_values.to(tower.dtype)).last_hidden_state
        side = self._projector.patches_per_image
        grid = hidden.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[2], side, side)
        return self._projector.avg_pool(grid.contiguous()).flatten(2).transpose(1, 2)

    def token_counts(self, pixel_values: torch.Tensor, **_: Any) -> list[int]:
        return [int(self.vlm.config.mm_tokens_per_image)] * len(pixel_values)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        projector = self._projector
        return torch.matmul(projector.mm_soft_emb_norm(tokens), projector.mm_input_projection_weight).type_as(tokens)

    def encoder_outputs(self, projected) -> dict[str, Any]:
        # Gemma 3 reads one tensor here (not a list per image)
        tokens = projected if isinstance(projected, torch.Tensor) else torch.cat(list(projected))
        return {"image": BaseModelOutputWithPooling(pooler_output=tokens)}
