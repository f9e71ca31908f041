"""LLaVA-1.5 (``LlavaForConditionalGeneration``): N patch tokens per image (CLS dropped by the
``default`` feature strategy), a 2-layer MLP projector applied after selection."""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from autoselect.backbones.base import BackboneAdapter
from autoselect.backbones.registry import register_backbone


@register_backbone
class LlavaAdapter(BackboneAdapter):
    model_types = ("llava",)

    @property
    def _core(self):
        return self.vlm.model

    @property
    def vision_width(self) -> int:
        layers = self.vlm.config.vision_feature_layer
        per_layer = self.vlm.config.vision_config.hidden_size
        return per_layer * (1 if isinstance(layers, int) else len(layers))

    @property
    def image_token_id(self) -> int:
        return int(self.vlm.config.image_token_id)

    def visual_tokens(self, pixel_values: torch.Tensor, **_: Any) -> torch.Tensor:
        """The projector's input in ``LlavaModel.get_image_features``: the chosen vision layer(s),
        CLS dropped for the ``default`` strategy."""
        config = self.vlm.config
        layers = config.vision_feature_layer
        outputs = self._core.vision_tower(
            pixel_values.to(self._core.vision_tower.dtype), output_hidden_states=True, return_dict=True
        )
        chosen = [layers] if isinstance(layers, int) else list(layers)
        hidden = [outputs.hidden_states[i] for i in chosen]
        if config.vision_feature_select_strategy == "default":
            hidden = [h[:, 1:] for h in hidden]
        return torch.cat(hidden, dim=-1)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._core.multi_modal_projector(tokens)

    def encoder_outputs(self, projected: torch.Tensor) -> dict[str, Any]:
        return {"image": BaseModelOutputWithPooling(pooler_output=list(projected))}
