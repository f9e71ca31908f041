"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

Native resolution: an image of ``t x h x w`` patches gives ``t*h*w / merge^2`` visual tokens, so N
differs per image. A visual token is one merge unit: the ``merge^2`` (4) neighbouring patch
features the ``PatchMerger`` fuses, concatenated (width ``4 x vision width``). Selection acts on
these units before the merger (the projector), which then runs on the kept units only.

Positions: M-RoPE gives each visual token a (t, h, w) position. They are computed with the
model's own ``get_rope_index`` on the full sequence and gathered for the kept tokens, so a kept
token keeps its original position and the text after the image keeps its own (the
``original`` policy, whatever the config says); generation continues from them.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.vision_utils import get_vision_window_index

from autoselect.backbones.base import BackboneAdapter
from autoselect.backbones.registry import register_backbone


@register_backbone
class QwenVLAdapter(BackboneAdapter):
    model_types = ("qwen2_vl", "qwen2_5_vl")
    image_input_names = ("pixel_values", "image_grid_thw")
    token_input_names = ("mm_token_type_ids",)
    layout_positions = True

    @property
    def _visual(self):
        return self.vlm.model.visual

    @property
    def _unit(self) -> int:
        return self._visual.spatial_merge_size**2

    @property
    def _patch_width(self) -> int:
        return self._visual.merger.ln_q.weight.shape[0]

    @property
    def vision_width(self) -> int:
        return self._patch_width * self._unit

    @property
    def image_token_id(self) -> int:
        return int(self.vlm.config.image_token_id)

    def visual_tokens(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, **_: Any) -> list[torch.Tensor]:
        """The merger's input, one ``[N_i, 4 x width]`` per image in placeholder order."""
        visual = self._visual
        outputs = visual(pixel_values.to(visual.dtype), grid_thw=image_grid_thw)
        units = outputs.last_hidden_state.reshape(-1, self.vision_width)
        if hasattr(visual, "window_size"):  # Qwen2.5-VL runs (and merges) in window order; undo it
            window_index, _ = get_vision_window_index(
                image_grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
                patch_size=visual.patch_size, kwargs={},
            )
            units = units[torch.argsort(window_index)]
        return list(units.split((image_grid_thw.prod(-1) // self._unit).tolist()))

    def token_counts(self, image_grid_thw: torch.Tensor, **_: Any) -> list[int]:
        """``t*h*w`` patches per image, ``merge^2`` to a visual token."""
        return (image_grid_thw.prod(-1) // self._unit).tolist()

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """``PatchMerger`` on kept units: its norm per patch, then its MLP on the fused unit."""
        merger = self._visual.merger
        patches = tokens.unflatten(-1, (self._unit, self._patch_width))
        return merger.mlp(merger.ln_q(patches).flatten(-2))

    def encoder_outputs(self, projected) -> dict[str, Any]:
        return {"image": BaseModelOutputWithPooling(pooler_output=list(projected))}

    def position_ids(self, input_ids, attention_mask, image_inputs, text) -> torch.Tensor:
        """``[4, B, L]``: the text positions (row 0), then the model's M-RoPE (t, h, w) positions."""
        token_types = text.get("mm_token_type_ids")
        if token_types is None:
            token_types = (input_ids == self.image_token_id).int()
        mrope, _ = self.vlm.model.get_rope_index(
            input_ids, mm_token_type_ids=token_types, image_grid_thw=image_inputs["image_grid_thw"], attention_mask=attention_mask
        )
        return torch.cat([_text_positions(attention_mask, input_ids)[None], mrope])

    def finish_inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Row 0 (text positions, for the attention mask) counts the tokens that are left."""
        positions = kwargs.get("position_ids")
        if positions is not None and positions.dim() == 3 and positions.shape[0] == 4:
            row = _text_positions(kwargs.get("attention_mask"), kwargs["input_ids"]).to(positions)
            kwargs["position_ids"] = torch.cat([row[None], positions[1:]])
        return kwargs


def _text_positions(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
