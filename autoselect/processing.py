"""Processors that work without torchvision.

transformers 5 builds every Qwen-VL processor with a video processor, and video processors need
torchvision, which has no build next to the CPU torch this project pins. Images never need it:
`ImageOnlyQwenVLProcessor` is the stock processor minus its video half (same placeholder
expansion, same ``mm_token_type_ids``), and `load_processor` falls back to it only when the stock
class cannot be built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoProcessor, ProcessorMixin, Qwen2VLProcessor


class ImageOnlyQwenVLProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` (also right for Qwen2.5-VL) for images and text only."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs: Any) -> None:
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, images=None, text=None, videos=None, **kwargs: Any):
        if videos is not None:
            raise ValueError("this Qwen-VL processor was built without a video processor (torchvision is not installed)")
        return super().__call__(images=images, text=text, **kwargs)


QWEN_VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def load_processor(path: str | Path) -> ProcessorMixin:
    """``AutoProcessor.from_pretrained(path)``, or the image-only Qwen-VL processor where the stock
    one cannot be built (no torchvision for its video processor)."""
    try:
        processor = AutoProcessor.from_pretrained(path)
    except Exception:  # the video-processor lookup fails (AttributeError/ImportError) without torchvision
        if _model_type(path) not in QWEN_VL_MODEL_TYPES:
            raise
        return ImageOnlyQwenVLProcessor.from_pretrained(path)
    if not isinstance(processor, ProcessorMixin) and _model_type(path) in QWEN_VL_MODEL_TYPES:
        return ImageOnlyQwenVLProcessor.from_pretrained(path)  # AutoProcessor fell back to the bare tokenizer
    return processor


def _model_type(path: str | Path) -> str | None:
    config = Path(path) / "config.json"
    return json.loads(config.read_text()).get("model_type") if config.is_file() else None
