"""Turn (images, chat messages) into model inputs with labels on the assistant tokens only.

Works with any HF processor that has a chat template: the conversation is rendered turn by
turn with the processor's own template, each piece goes through the processor (which expands
``<image>`` into the model's placeholder tokens), and only assistant answers get labels.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from autoselect.placeholders import IGNORE_INDEX

#: processor outputs with one value per text token: they follow ``input_ids`` (joined along the
#: sequence, padded like it) instead of being stacked like image tensors
TOKEN_KEYS = ("token_type_ids", "mm_token_type_ids")
#: processor outputs that are text, not image tensors
TEXT_KEYS = ("input_ids", "attention_mask", *TOKEN_KEYS)


def _render(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def conversation_segments(processor, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split the rendered conversation into ``(text, is_answer)`` pieces."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = _render(processor, messages[:i], add_generation_prompt=True)
            full = _render(processor, messages[: i + 1])
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise ValueError("the chat template is not prefix-stable; cannot locate the answer tokens")
            segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        else:
            full = _render(processor, messages[: i + 1])
            if not full.startswith(done):
                raise ValueError("the chat template is not prefix-stable; cannot locate the answer tokens")
            segments.append((full[len(done):], False))
        done = full
    return [(text, is_answer) for text, is_answer in segments if text]


def encode_example(processor, messages: list[dict], images: Sequence[Any] = ()) -> dict[str, torch.Tensor]:
    """``input_ids``/``labels`` (1-D) plus the processor's image tensors for one example."""
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant answer to learn from")
    image_token = getattr(processor, "image_token", "<image>")
    images = list(images)
    ids: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    image_inputs: dict[str, list[torch.Tensor]] = {}
    token_inputs: dict[str, list[torch.Tensor]] = {}
    for n, (text, is_answer) in enumerate(conversation_segments(processor, messages)):
        count = text.count(image_token)
        seg_images, images = images[:count], images[count:]
        out = processor(
            text=[text], images=seg_images or None, return_tensors="pt", add_special_tokens=(n == 0)
        )
        seg_ids = out["input_ids"][0]
        ids.append(seg_ids)
        labels.append(seg_ids.clone() if is_answer else torch.full_like(seg_ids, IGNORE_INDEX))
        for key, value in out.items():
            if key in TOKEN_KEYS:
                token_inputs.setdefault(key, []).append(value[0])
            elif key not in TEXT_KEYS:
                image_inputs.setdefault(key, []).append(value)
    if images:
        raise ValueError(f"{len(images)} image(s) were given but the conversation has no <image> for them")
    example = {"input_ids": torch.cat(ids), "labels": torch.cat(labels)}
    example.update({k: torch.cat(v) for k, v in token_inputs.items()})
    example.update({k: stack_images(v) for k, v in image_inputs.items()})
    return example


def image_inputs(processor, images: Sequence[Any]) -> dict[str, torch.Tensor]:
    """The processor's image tensors for ``images`` alone (``pixel_values``, ``image_grid_thw``...):
    what :func:`encode_example` gets from the one segment holding them, so training can rebuild
    them from stored image bytes. The processor runs on just the placeholders: its image part
    does not read the text (``pipelines.preprocessing.encode`` checks that per backbone)."""
    image_token = getattr(processor, "image_token", "<image>")
    images = list(images)
    out = processor(text=[image_token * len(images)], images=images, return_tensors="pt")
    return {key: value for key, value in out.items() if key not in TEXT_KEYS}


def stack_images(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Join image tensors along dim 0, zero-padding the other dims to the largest (LLaVA-NeXT and
    Idefics3 hold a variable number of views per image, padded with zeros by their processors)."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        pad = [p for d in reversed(range(1, t.dim())) for p in (0, shape[d - 1] - t.shape[d])]
        padded.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return torch.cat(padded)


def collate(examples: Sequence[dict[str, torch.Tensor]], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad ``input_ids``/``labels`` (and per-token tensors) into a batch with an ``attention_mask``;
    join image tensors."""
    width = max(len(e["input_ids"]) for e in examples)
    batch: dict[str, Any] = {"input_ids": [], "attention_mask": [], "labels": []}
    tokens = [k for k in TOKEN_KEYS if k in examples[0]]
    batch.update({k: [] for k in tokens})
    for e in examples:
        n = len(e["input_ids"])
        pad = width - n

        def padded(t: torch.Tensor, fill: int) -> torch.Tensor:
            filler = torch.full((pad,), fill, dtype=t.dtype)
            return torch.cat([filler, t] if padding_side == "left" else [t, filler])

        batch["input_ids"].append(padded(e["input_ids"], pad_token_id))
        batch["attention_mask"].append(padded(torch.ones(n, dtype=torch.long), 0))
        batch["labels"].append(padded(e.get("labels", torch.full((n,), IGNORE_INDEX)), IGNORE_INDEX))
        for key in tokens:
            batch[key].append(padded(e[key], 0))
    out = {k: torch.stack(v) for k, v in batch.items()}
    for key in examples[0]:
        if key not in out:
            out[key] = stack_images([e[key] for e in examples if key in e])
    return out
