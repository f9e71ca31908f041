"""A real-weight mini-LLaVA: DINOv2 ViT-S/14 -> fresh 2-layer MLP projector -> SmolLM2-135M-Instruct.

Assembled as a stock ``LlavaForConditionalGeneration`` + ``LlavaProcessor`` from the converted
parts, so everything downstream (AutoSelect, serving, ``from_pretrained``) sees a normal HF
LLaVA. The projector is untrained: alignment training is a separate step.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitImageProcessorPil,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from minillava import dinov2_onnx, smollm2_gguf
from minillava.assets import source_sha256
from minillava.cache import Built, cached_build
from autoselect.data import conversation_segments

IMAGE_TOKEN = "<image>"
DEFAULT_CACHE_DIR = Path(".cache/backbones")
DEFAULT_OUT_NAME = "mini-llava"
# DINOv2 prepends one CLS token (ViT-S/14 has no register tokens); the "default" strategy drops it.
_CLS_TOKENS = 1
_CONTENT = "message['content']"
_RENDER_CONTENT = (
    "{% macro render_content(content) %}"
    "{% if content is string %}{{ content }}"
    "{% else %}{% for part in content %}"
    "{% if part['type'] == 'image' %}" + IMAGE_TOKEN + "\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endmacro %}"
)


@dataclass(frozen=True)
class MiniLlavaSettings:
    image_size: int = 224  # 16 x 16 = 256 visual tokens with patch 14
    vision_feature_layer: int = -1
    seed: int = 0  # projector init and the new <image> embedding row


def multimodal_chat_template(text_template: str) -> str:
    """The LM's own chat template, with content allowed to be a list of image/text parts.

    An image part renders ``<image>`` + newline once (the processor expands it to the visual
    tokens); text-only conversations render exactly as with the LM's template, so assistant
    turns still end with the LM's end-of-turn/EOS token.
    """
    if _CONTENT not in text_template:
        raise ValueError(f"the LM chat template does not use {_CONTENT}; cannot add image parts to it")
    return _RENDER_CONTENT + text_template.replace(_CONTENT, f"render_content({_CONTENT})")


def build_processor(lm_dir: str | Path, patch_size: int, settings: MiniLlavaSettings) -> LlavaProcessor:
    """DINOv2 preprocessing (bicubic, ImageNet mean/std) at ``image_size`` + the LM tokenizer with
    an ``<image>`` special token, left padding for batched generation."""
    tokenizer = AutoTokenizer.from_pretrained(
        lm_dir, extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="left"
    )
    side = settings.image_size
    image_processor = BitImageProcessorPil(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=_CLS_TOKENS,
        chat_template=multimodal_chat_template(tokenizer.chat_template),
    )
    _check_prefix_stable(processor)
    return processor


def _check_prefix_stable(processor: LlavaProcessor) -> None:
    """``autoselect.data`` labels answers by rendering growing prefixes; fail at build time if it can't."""
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q1"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a1"}]},
        {"role": "user", "content": [{"type": "text", "text": "q2"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a2"}]},
    ]
    conversation_segments(processor, conversation)


def assemble_mini_llava(
    dinov2_dir: str | Path, lm_dir: str | Path, settings: MiniLlavaSettings = MiniLlavaSettings()
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Converted DINOv2 + converted LM + a freshly initialised projector, in eval mode."""
    vision = dinov2_onnx.load_dinov2(dinov2_dir)
    processor = build_processor(lm_dir, vision.config.patch_size, settings)
    tokenizer = processor.tokenizer
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    with torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        lm.resize_token_embeddings(len(tokenizer))  # the <image> row is never read: visual tokens replace it
        config = LlavaConfig(
            vision_config=vision.config,
            text_config=lm.config,
            image_token_id=tokenizer.image_token_id,
            vision_feature_select_strategy="default",
            vision_feature_layer=settings.vision_feature_layer,
            image_seq_length=(settings.image_size // vision.config.patch_size) ** 2,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=lm.config.tie_word_embeddings,
        )
        vlm = LlavaForConditionalGeneration(config)
    vlm.model.vision_tower.load_state_dict(vision.state_dict())
    vlm.model.language_model.load_state_dict(lm.model.state_dict())
    vlm.lm_head.load_state_dict(lm.lm_head.state_dict())
    vlm.generation_config = lm.generation_config
    return vlm.eval(), processor


def _save_mini_llava(dinov2_dir: Path, lm_dir: Path, settings: MiniLlavaSettings, out_dir: Path) -> None:
    vlm, processor = assemble_mini_llava(dinov2_dir, lm_dir, settings)
    vlm.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def build_mini_llava(
    out_dir: str | Path | None = None,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    settings: MiniLlavaSettings = MiniLlavaSettings(),
    force: bool = False,
) -> dict[str, Built]:
    """Convert the parts into ``cache_dir`` and assemble the VLM into ``out_dir``, each step
    skipped when its manifest shows the same inputs (wheel file hashes, converter code,
    transformers version, settings)."""
    cache_dir = Path(cache_dir)
    out_dir = Path(out_dir) if out_dir is not None else cache_dir / DEFAULT_OUT_NAME
    dinov2 = cached_build(
        cache_dir / "dinov2-vits14",
        dinov2_onnx.fingerprint(),
        lambda d: dinov2_onnx.convert_dinov2_onnx(dinov2_onnx.locate_onnx(), d),
        force,
    )
    smollm2 = cached_build(
        cache_dir / "smollm2-135m-instruct",
        smollm2_gguf.fingerprint(),
        lambda d: smollm2_gguf.convert_smollm2_gguf(smollm2_gguf.locate_gguf(), d),
        force,
    )
    inputs = {
        "dinov2": dinov2.inputs,
        "smollm2": smollm2.inputs,
        "assembler_sha256": source_sha256(sys.modules[__name__]),
        "settings": asdict(settings),
    }
    llava = cached_build(out_dir, inputs, lambda d: _save_mini_llava(dinov2.path, smollm2.path, settings, d), force)
    return {"dinov2": dinov2, "smollm2": smollm2, "mini_llava": llava}
