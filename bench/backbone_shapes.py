"""Each supported VLM family at its real visual-token geometry, with a reduced random LM.

The vision side keeps the family's real patch size, image size, merge/pool/shuffle and view
layout (so N and the placeholder layout are those of the released 7B-class checkpoints) but has
one narrow layer, since only its output shape matters here. The LM is every family's own text
model at a reduced size (hidden 2048, 2 layers) that fits a CPU: the full/pruned prefill ratio
depends on the sequence lengths, which are real, not on the depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

IMAGE_TOKEN_ID = 31000
VOCAB = 32000
LM = {"vocab_size": VOCAB, "hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 2,
      "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 8192}
VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4}
MROPE = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}


@dataclass
class Shape:
    """A model plus one image's inputs; ``placeholders`` image tokens go into the prompt."""

    name: str
    vlm: torch.nn.Module
    image_inputs: dict[str, torch.Tensor]
    placeholders: int
    note: str
    token_type_key: str | None = None  # per-token tensor the family needs beside input_ids


def _llava() -> Shape:
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION, image_size=336, patch_size=14), text_config=LlamaConfig(**LM),
                         image_token_index=IMAGE_TOKEN_ID, vision_feature_select_strategy="default", vision_feature_layer=-1)
    return Shape("llava", LlavaForConditionalGeneration(config), {"pixel_values": torch.randn(1, 3, 336, 336)}, 576,
                 "LLaVA-1.5: 336 px, patch 14")


def _llava_next() -> Shape:
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    config = LlavaNextConfig(vision_config=CLIPVisionConfig(**VISION, image_size=336, patch_size=14), text_config=LlamaConfig(**LM),
                             image_token_index=IMAGE_TOKEN_ID, image_grid_pinpoints=pinpoints,
                             vision_feature_select_strategy="default", vision_feature_layer=-1)
    vlm = LlavaNextForConditionalGeneration(config)
    inputs = {"pixel_values": torch.randn(1, 5, 3, 336, 336), "image_sizes": torch.tensor([[672, 672]])}
    from autoselect.backbones import get_adapter

    adapter = get_adapter(vlm)
    with torch.no_grad():
        n = len(adapter.visual_tokens(**inputs)[0])
    (layout,) = adapter._layouts(inputs["image_sizes"])
    if int((~layout).sum()) != n:
        raise ValueError(f"LLaVA-NeXT layout has {int((~layout).sum())} patch slots for {n} visual tokens")
    placeholders = len(layout)
    return Shape("llava_next", vlm, inputs, placeholders, "LLaVA-NeXT AnyRes: 672 x 672 = base + 2 x 2 crops of 336 px, row newlines")


def _qwen2_5_vl() -> Shape:
    vision = {"depth": 1, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "out_hidden_size": 2048, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [0]}
    config = Qwen2_5_VLConfig(vision_config=vision, text_config={**LM, "rope_parameters": MROPE}, image_token_id=IMAGE_TOKEN_ID,
                              video_token_id=IMAGE_TOKEN_ID + 1, vision_start_token_id=IMAGE_TOKEN_ID + 2)
    grid = torch.tensor([[1, 64, 64]])
    inputs = {"pixel_values": torch.randn(64 * 64, 3 * 2 * 14 * 14), "image_grid_thw": grid}
    return Shape("qwen2_5_vl", Qwen2_5_VLForConditionalGeneration(config), inputs, 1024,
                 "Qwen2.5-VL: 896 x 896 at patch 14, 2 x 2 merge units", "mm_token_type_ids")


def _qwen3_vl() -> Shape:
    vision = {"depth": 1, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "out_hidden_size": 2048, "patch_size": 16,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 2304, "deepstack_visual_indexes": [0]}
    text = {**LM, "head_dim": 128, "rope_parameters": {**MROPE, "mrope_interleaved": True}}
    config = Qwen3VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                           video_token_id=IMAGE_TOKEN_ID + 1, vision_start_token_id=IMAGE_TOKEN_ID + 2)
    inputs = {"pixel_values": torch.randn(64 * 64, 3 * 2 * 16 * 16), "image_grid_thw": torch.tensor([[1, 64, 64]])}
    return Shape("qwen3_vl", Qwen3VLForConditionalGeneration(config), inputs, 1024,
                 "Qwen3-VL: 1024 x 1024 at patch 16, 2 x 2 merge units, DeepStack", "mm_token_type_ids")


def _gemma3() -> Shape:
    vision = {**VISION, "image_size": 896, "patch_size": 14, "vision_use_head": False}
    text = {**LM, "head_dim": 128, "sliding_window": 1024, "query_pre_attn_scalar": 128}
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=256, image_token_id=IMAGE_TOKEN_ID,
                          boi_token_id=IMAGE_TOKEN_ID + 1, eoi_token_id=IMAGE_TOKEN_ID + 2)
    vlm = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():
        vlm.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.02)
    return Shape("gemma3", vlm, {"pixel_values": torch.randn(1, 3, 896, 896)}, 256,
                 "Gemma 3: 896 px SigLIP pooled to 256", "token_type_ids")


def _idefics3() -> Shape:
    vision = {**VISION, "image_size": 364, "patch_size": 14}
    config = Idefics3Config(vision_config=vision, text_config=LlamaConfig(**LM).to_dict(), scale_factor=2, image_token_id=IMAGE_TOKEN_ID)
    views = 5
    return Shape("idefics3", Idefics3ForConditionalGeneration(config), {"pixel_values": torch.randn(1, views, 3, 364, 364)},
                 views * 169, "Idefics3: 2 x 2 crops + global view of 364 px, 169 tokens each")


SHAPES: dict[str, Callable[[], Shape]] = {
    "llava": _llava, "llava_next": _llava_next, "qwen2_5_vl": _qwen2_5_vl, "qwen3_vl": _qwen3_vl,
    "gemma3": _gemma3, "idefics3": _idefics3,
}


def prompt(shape: Shape, text_tokens: int) -> dict[str, Any]:
    """``input_ids`` (and the per-token tensor) for one image amid ``text_tokens`` text tokens."""
    before = text_tokens // 10
    generator = torch.Generator().manual_seed(0)
    ids = torch.cat([
        torch.randint(0, IMAGE_TOKEN_ID, (1, before), generator=generator),
        torch.full((1, shape.placeholders), IMAGE_TOKEN_ID),
        torch.randint(0, IMAGE_TOKEN_ID, (1, text_tokens - before), generator=generator),
    ], dim=1)
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if shape.token_type_key:
        text[shape.token_type_key] = (ids == IMAGE_TOKEN_ID).long()
    return text
