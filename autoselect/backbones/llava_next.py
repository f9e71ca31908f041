"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): AnyRes.

An image becomes a base view plus a grid of high-resolution crops; the crops' patch tokens are
stitched into one feature map, the padding the resize added is cut away ("unpad"), and the
model appends a learned ``image_newline`` embedding after every row. N therefore depends on
the image's size and aspect ratio (2880 for a 672 x 672 image at 7B scale).

Budget policy: one global top-K over all patch tokens of an image (base view and crops
together), in the order the model lays them out. The newline embeddings are not visual tokens
(they carry no image content, only the row structure) and are always kept, so K = N reproduces
the unmodified model exactly. Positions follow the position policy like LLaVA-1.5.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from autoselect.backbones.base import VisionAttention
from autoselect.backbones.llava import LlavaAdapter
from autoselect.backbones.registry import register_backbone


@register_backbone
class LlavaNextAdapter(LlavaAdapter):
    model_types = ("llava_next",)
    image_input_names = ("pixel_values", "image_sizes")

    def _views(self, image_sizes: torch.Tensor) -> list[int]:
        """Views (base + crops) per image, as the model counts them."""
        config = self.vlm.config
        return [
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            for size in image_sizes
        ]

    def _crop_tokens(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """Per image, the projector's input for each view: ``[views, tokens per view, width]``."""
        views = self._views(image_sizes)
        if pixel_values.dim() == 5:  # [images, max views, C, H, W], padded
            pixel_values = torch.cat([p[:v] for p, v in zip(pixel_values, views)])
        return list(super().visual_tokens(pixel_values).split(views))

    def _pack(self, features: list[torch.Tensor], image_sizes: torch.Tensor, newline: torch.Tensor | None) -> list[torch.Tensor]:
        """The model's own stitching/unpadding, image by image."""
        strategy = self.vlm.config.vision_feature_select_strategy
        return [
            self._core.pack_image_features([f], image_sizes[i : i + 1], strategy, image_newline=newline)[0][0]
            for i, f in enumerate(features)
        ]

    def visual_tokens(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor, **_: Any) -> list[torch.Tensor]:
        """All patch tokens of each image, base view first, newlines left out: ``[N_i, width]``."""
        return self._pack(self._crop_tokens(pixel_values, image_sizes), image_sizes, newline=None)

    def _layouts(self, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """Per image, a bool mask over its placeholders marking the newline slots. The model's
        packing run on a one-channel map of zeros with a newline of one finds them."""
        config = self.vlm.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        per_view = side * side + (config.vision_feature_select_strategy == "full")
        zeros = [torch.zeros(v, per_view, 1) for v in self._views(image_sizes)]
        marks = self._pack(zeros, image_sizes.cpu(), newline=torch.ones(1))
        return [m[:, 0].bool() for m in marks]

    def token_counts(self, image_sizes: torch.Tensor, **_: Any) -> list[int]:
        """Patch slots of each image's layout: its placeholders less the row newlines."""
        return [int((~layout).sum()) for layout in self._layouts(image_sizes)]

    def place(self, image_inputs: dict[str, Any], selection, projected):
        """Kept patch tokens at their slots, plus every newline slot with the model's newline."""
        newline = self._core.image_newline
        layouts = self._layouts(image_inputs["image_sizes"])
        for layout, n in zip(layouts, selection.counts()):
            if int((~layout).sum()) != n:
                raise ValueError(f"LLaVA-NeXT layout has {int((~layout).sum())} patch slots for {n} visual tokens")
        slots, embeddings = [], []
        for is_newline, keep, tokens in zip(layouts, selection.per_image(), projected):
            patch_slots = (~is_newline).nonzero()[:, 0].to(keep.device)
            newline_slots = is_newline.nonzero()[:, 0].to(keep.device)
            chosen = torch.cat([patch_slots[keep], newline_slots])
            filled = torch.cat([tokens, newline.to(tokens).expand(len(newline_slots), -1)])
            order = chosen.argsort()
            slots.append(chosen[order])
            embeddings.append(filled[order])
        return slots, embeddings, [len(layout) for layout in layouts]

    def vision_attention(self, **_: Any) -> VisionAttention:
        raise NotImplementedError("LLaVA-NeXT's AnyRes views have no single CLS attention map per image")
