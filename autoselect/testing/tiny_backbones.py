"""Tiny random models of every supported VLM family, built from configs with offline processors.

Each builder returns ``(model, processor)`` with the processor's chat template set, so tests and
benchmarks drive every backbone the same way: ``processor.apply_chat_template`` then
``processor(images=..., text=...)``. Sizes are minimal but keep each family's structure
(merge units, AnyRes crops, pixel shuffle, pooling) so the adapters are exercised for real.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from autoselect.processing import ImageOnlyQwenVLProcessor
from autoselect.testing.tiny import CHAT_TEMPLATE, build_tiny_llava, build_tiny_tokenizer

QWEN_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def _text_config(tokenizer, **overrides) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **overrides,
    }


def _finish(model, tokenizer, seed: int):
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_tiny_qwen_vl(version: str = "2.5", seed: int = 0, max_pixels: int = 48 * 48):
    """Qwen2-VL (``version="2"``), Qwen2.5-VL or Qwen3-VL (``"3"``, DeepStack at vision layer 0): patch 4, merge 2 (4 patches per visual token), so a
    32 x 32 image gives 16 visual tokens and other sizes give other counts."""
    template = CHAT_TEMPLATE.replace("<image>\n", "<|vision_start|><|image_pad|><|vision_end|>\n")
    tokenizer = build_tiny_tokenizer(
        special_tokens=QWEN_TOKENS, chat_template=template, image_token="<|image_pad|>", video_token="<|video_pad|>"
    )
    qwen2, qwen3 = version == "2", version == "3"
    vision = {
        "depth": 2, "embed_dim": 32, "hidden_size": 64 if qwen2 else 32, "out_hidden_size": 64, "num_heads": 4,
        "intermediate_size": 64, "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "in_chans": 3, "in_channels": 3, "window_size": 16, "fullatt_block_indexes": [1],
    }
    text = _text_config(tokenizer, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4})
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>")]}
    classes = {"2": (Qwen2VLConfig, Qwen2VLForConditionalGeneration), "2.5": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
               "3": (Qwen3VLConfig, Qwen3VLForConditionalGeneration)}
    config_cls, model_cls = classes[version]
    if qwen3:
        vision.update(hidden_size=32, deepstack_visual_indexes=[0], num_position_embeddings=64)
        text["head_dim"] = 16
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4, "mrope_interleaved": True}
    torch.manual_seed(seed)
    model = model_cls(config_cls(vision_config=vision, text_config=text, pad_token_id=tokenizer.pad_token_id, **ids))
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=max_pixels
    )
    processor = ImageOnlyQwenVLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
    return _finish(model, tokenizer, seed), processor


def build_tiny_llava_next(seed: int = 0):
    """LLaVA-NeXT with AnyRes: 16 px views (patch 4: 16 tokens each, CLS dropped), crops on a
    32 x 32, 16 x 32 or 32 x 16 canvas plus the base view, then unpad and row newlines."""
    tokenizer = build_tiny_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4
    )
    text = LlamaConfig(**_text_config(tokenizer))
    pinpoints = [[16, 32], [32, 16], [32, 32]]
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id, image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default", vision_feature_layer=-2, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    with torch.no_grad():  # a random newline of real scale (the config init leaves it near zero)
        model.model.image_newline.normal_()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_grid_pinpoints=pinpoints,
        do_center_crop=True,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=4, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=tokenizer.chat_template,
    )
    return _finish(model, tokenizer, seed), processor


GEMMA3_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")


def build_tiny_gemma3(seed: int = 0):
    """Gemma 3: SigLIP at 32 px, patch 4 (64 patches), pooled to 16 visual tokens per image."""
    template = CHAT_TEMPLATE.replace("<image>\n", "<start_of_image>")
    tokenizer = build_tiny_tokenizer(
        special_tokens=GEMMA3_TOKENS, chat_template=template, image_token="<image_soft_token>",
        boi_token="<start_of_image>", eoi_token="<end_of_image>",
    )
    vision = {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "image_size": 32, "patch_size": 4, "vision_use_head": False,
    }
    text = _text_config(tokenizer, head_dim=16, sliding_window=64, query_pre_attn_scalar=16)
    ids = {name: tokenizer.convert_tokens_to_ids(t) for name, t in
           [("boi_token_id", "<start_of_image>"), ("eoi_token_id", "<end_of_image>"), ("image_token_id", "<image_soft_token>")]}
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=16, pad_token_id=tokenizer.pad_token_id, **ids)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # the config init leaves the projection at zero: images would carry nothing
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.2)
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template, image_seq_length=16)
    return _finish(model, tokenizer, seed), processor


IDEFICS3_TOKENS = (
    "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)


def build_tiny_idefics3(seed: int = 0):
    """Idefics3 / SmolVLM: 32 px views (patch 4: 64 patches), pixel shuffle x2 -> 16 tokens per
    view; a 64 px canvas splits a non-square image into crops plus the global view."""
    tokenizer = build_tiny_tokenizer(special_tokens=IDEFICS3_TOKENS)
    vision = {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "image_size": 32, "patch_size": 4,
    }
    text = _text_config(tokenizer)
    config = Idefics3Config(
        vision_config=vision, text_config=text, scale_factor=2, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=16, chat_template=tokenizer.chat_template
    )
    return _finish(model, tokenizer, seed), processor


def _llava(seed: int = 0):
    model, processor = build_tiny_llava(seed=seed)
    processor.chat_template = processor.tokenizer.chat_template
    return model, processor


#: name -> builder, for tests and benchmarks that cover every backbone
TINY_BACKBONES: dict[str, Callable] = {
    "llava": _llava,
    "llava_next": build_tiny_llava_next,
    "gemma3": build_tiny_gemma3,
    "idefics3": build_tiny_idefics3,
    "qwen2_vl": lambda seed=0: build_tiny_qwen_vl("2", seed),
    "qwen2_5_vl": lambda seed=0: build_tiny_qwen_vl("2.5", seed),
    "qwen3_vl": lambda seed=0: build_tiny_qwen_vl("3", seed),
}
