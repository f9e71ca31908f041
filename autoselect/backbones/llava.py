"""LLaVA-1.5 (``LlavaForConditionalGeneration``): N patch tokens per image (CLS dropped by the
``default`` feature strategy), a 2-layer MLP projector applied after selection."""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from autoselect.backbones.base import BackboneAdapter, VisionAttention
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

    def _tokens_per_view(self, height: int, width: int) -> int:
        """Tokens `visual_tokens` keeps of one ``height x width`` view: its patches, plus the CLS
        token of towers that have one unless the ``default`` strategy drops the first token."""
        patch = int(self.vlm.config.vision_config.patch_size)
        tower = self._core.vision_tower
        has_cls = any(hasattr(m, "class_embedding") or hasattr(m, "cls_token") for m in tower.modules())
        dropped = self.vlm.config.vision_feature_select_strategy == "default"
        return (height // patch) * (width // patch) + int(has_cls) - int(dropped)

    def token_counts(self, pixel_values: torch.Tensor, **_: Any) -> list[int]:
        return [self._tokens_per_view(*pixel_values.shape[-2:])] * len(pixel_values)

    def vision_attention(self, pixel_values: torch.Tensor, **_: Any) -> VisionAttention:
        """One tower pass. The CLS attention row and the keys are rebuilt from the q/k projections of
        the (deepest) feature layer, so they come out under any attention implementation (sdpa, flash)."""
        attention = self._feature_layer_attention()
        captured: dict[str, torch.Tensor] = {}
        hooks = [
            getattr(attention, name).register_forward_hook(lambda _m, _i, out, name=name: captured.update({name: out}))
            for name in ("q_proj", "k_proj")
        ]
        try:
            tokens = self.visual_tokens(pixel_values)
        finally:
            for hook in hooks:
                hook.remove()
        heads = self.vlm.config.vision_config.num_attention_heads
        queries, keys = (captured[name].unflatten(-1, (heads, -1)) for name in ("q_proj", "k_proj"))  # [B, S, H, d]
        logits = torch.einsum("bhd,bshd->bhs", queries[:, 0].float(), keys.float()) * keys.shape[-1] ** -0.5
        first = 1 if self.vlm.config.vision_feature_select_strategy == "default" else 0
        return VisionAttention(tokens, logits.softmax(-1).mean(1)[:, first:], keys.mean(2)[:, first:])

    def _feature_layer_attention(self):
        """The attention module inside the layer whose output `visual_tokens` reads (CLS query at 0)."""
        tower = self._core.vision_tower
        if not any(hasattr(m, "class_embedding") or hasattr(m, "cls_token") for m in tower.modules()):
            raise NotImplementedError(f"{type(tower).__name__} has no CLS token to take attention from")
        attentions = [m for m in tower.modules() if hasattr(m, "q_proj") and hasattr(m, "k_proj")]
        layers = self.vlm.config.vision_feature_layer
        # hidden_states[0] is the embedding output, hidden_states[i] the output of layer i - 1
        index = max(i % (len(attentions) + 1) for i in ([layers] if isinstance(layers, int) else layers)) - 1
        if index < 0:
            raise ValueError("vision_feature_layer 0 (the embeddings) has no attention")
        return attentions[index]

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._core.multi_modal_projector(tokens)

    def encoder_outputs(self, projected: torch.Tensor) -> dict[str, Any]:
        return {"image": BaseModelOutputWithPooling(pooler_output=list(projected))}
