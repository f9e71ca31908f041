"""Tiny random VLMs built from configs, with an offline tokenizer and processor (no hub access).

Used by the test suite, the ``tiny-llava`` pipeline config and the serving tests. Everything
is deterministic under ``seed``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
BOS_TOKEN = "<s>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% else %}ASSISTANT: {% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_CORPUS = [
    "USER: What is in the image? ASSISTANT: A red square on a grey background.",
    "USER: Which colour is the marker? ASSISTANT: red green blue yellow white black",
    "USER: Describe the picture. ASSISTANT: There is a small object near the corner.",
    "the quick brown fox jumps over the lazy dog",
    "left right top bottom centre middle corner edge object shape colour",
    "zero one two three four five six seven eight nine ten",
    "What colour is it? It is red. It is green. It is blue. It is yellow.",
    "a photo of a cat, a dog, a bird, a car, a tree, a house, a boat",
] * 4


def build_tiny_tokenizer(
    vocab_size: int = 320, special_tokens: tuple[str, ...] = (), chat_template: str = CHAT_TEMPLATE, **named: str
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in-process on a few sentences; ``special_tokens`` adds a
    backbone's own markers, ``named`` names some of them (``image_token="<|image_pad|>"``)."""
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, *special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN, **named},
        padding_side="left",
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_tiny_llava(
    image_size: int = 32,
    patch_size: int = 4,
    vision_width: int = 32,
    text_width: int = 64,
    text_layers: int = 2,
    seed: int = 0,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random LLaVA-1.5-shaped model: CLIP vision tower (CLS dropped) + Llama LM.

    N = (image_size / patch_size)^2 visual tokens per image (64 by default).
    """
    tokenizer = build_tiny_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=vision_width * 4,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_width,
        intermediate_size=text_width * 2,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def save_tiny_llava(directory: str | Path, **kwargs) -> Path:
    """Build a tiny LLaVA and save it as a normal HF folder (model + processor)."""
    directory = Path(directory)
    model, processor = build_tiny_llava(**kwargs)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
