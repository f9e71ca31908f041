"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): Qwen2.5-VL's layout plus DeepStack.

Besides the final merger, DeepStack mergers turn the hidden states of a few intermediate vision
layers into extra embeddings that are added to the first LLM layers at the image positions. A
pruned token must drop out of all of them at once, so a visual token here is one merge unit
with the final and the DeepStack layers' features side by side (width ``4 x vision width x
(1 + DeepStack layers)``): the scorer sees all of it, and each merger runs on its slice of the
kept units. Positions: M-RoPE on the full sequence, gathered (see ``qwen_vl``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from autoselect.backbones.qwen_vl import QwenVLAdapter
from autoselect.backbones.registry import register_backbone


@register_backbone
class Qwen3VLAdapter(QwenVLAdapter):
    model_types = ("qwen3_vl",)

    @property
    def _patch_width(self) -> int:
        return int(self.vlm.config.vision_config.hidden_size)

    @property
    def _unit_width(self) -> int:
        return self._patch_width * self._unit

    @property
    def _mergers(self) -> list[torch.nn.Module]:
        return [self._visual.merger, *self._visual.deepstack_merger_list]

    @property
    def vision_width(self) -> int:
        return self._unit_width * len(self._mergers)

    def visual_tokens(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, **_: Any) -> list[torch.Tensor]:
        """Each merge unit's final and DeepStack-layer features, concatenated: ``[N_i, width]`` per image."""
        visual = self._visual
        taps: list[torch.Tensor] = []
        hooks = [m.register_forward_pre_hook(lambda _m, args: taps.append(args[0])) for m in visual.deepstack_merger_list]
        try:
            final = visual(pixel_values.to(visual.dtype), grid_thw=image_grid_thw).last_hidden_state
        finally:
            for hook in hooks:
                hook.remove()
        units = torch.cat([h.reshape(-1, self._unit_width) for h in (final, *taps)], dim=-1)
        return list(units.split((image_grid_thw.prod(-1) // self._unit).tolist()))

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Every merger on its slice; outputs side by side ``[..., hidden x (1 + DeepStack layers)]``."""
        lead = tokens.shape[:-1]
        outputs = []
        for merger, part in zip(self._mergers, tokens.split(self._unit_width, dim=-1)):
            flat = part.reshape(-1, self._unit_width)
            if not merger.use_postshuffle_norm:  # the final merger normalises each patch before fusing
                flat = flat.reshape(-1, self._patch_width)
            outputs.append(merger(flat).reshape(*lead, -1))
        return torch.cat(outputs, dim=-1)

    def encoder_outputs(self, projected) -> dict[str, Any]:
        per_image = [p.chunk(len(self._mergers), dim=-1) for p in projected]
        return {
            "image": BaseModelOutputWithDeepstackFeatures(
                pooler_output=[parts[0] for parts in per_image],
                deepstack_features=[[parts[i] for parts in per_image] for i in range(1, len(self._mergers))],
            )
        }
