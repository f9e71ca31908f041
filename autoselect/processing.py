"""Processors that work without torchvision.

transformers 5 builds every Qwen-VL processor with a video processor, and video processors need
torchvision, which has no build next to the CPU torch this project pins. Images never need it:
`ImageOnlyQwenVLProcessor` is the stock processor minus its video half (same placeholder
expansion, same ``mm_token_type_ids``), and `load_processor` falls back to it only when the stock
class cannot be built.
"""

from __future__ import annotations

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


def load_processor(path: str | Path) -> ProcessorMixin:
    """``AutoProcessor.from_pretrained(path)``, or the image-only Qwen-VL processor where the stock
    one needs torchvision."""
    try:
        return AutoProcessor.from_pretrained(path)
    except (AttributeError, ImportError, ValueError) as error:
        if "qwen" not in str(Path(path).joinpath("processor_config.json").read_text() if Path(path, "processor_config.json").is_file() else "").lower() and "video" not in str(error).lower() and "_extra_content" not in str(error):
            raise
        return ImageOnlyQwenVLProcessor.from_pretrained(path)
