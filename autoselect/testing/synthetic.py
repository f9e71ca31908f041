"""A synthetic task whose answer depends on a few patches: "which colour are the markers?".

Each image is low-contrast grey noise with ``markers`` patch-sized squares of one saturated
colour at random grid cells. A VLM that sees all tokens can answer; one that keeps a random
quarter of the tokens often loses every marker. A scorer that learns to keep the markers
restores the answer, which is what the tests and the demo measure.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from PIL import Image

from autoselect.data import collate, encode_example

COLOURS = {"red": (230, 25, 25), "green": (25, 200, 25), "blue": (25, 25, 230), "yellow": (230, 230, 25)}
QUESTION = "Which colour is the marker?"


def marker_image(rng: np.random.Generator, colour: str, size: int = 32, patch: int = 4, markers: int = 2) -> tuple[Image.Image, list[int]]:
    """An image and the grid cells (row-major patch indices) holding the markers."""
    grid = size // patch
    pixels = rng.normal(128, 12, size=(size, size, 3)).clip(0, 255).astype(np.uint8)
    cells = rng.choice(grid * grid, size=markers, replace=False)
    for cell in cells:
        r, c = divmod(int(cell), grid)
        pixels[r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] = COLOURS[colour]
    return Image.fromarray(pixels), sorted(int(c) for c in cells)


def messages(answer: str | None = None) -> list[dict]:
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    if answer is not None:
        turn.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return turn


def marker_batches(processor, batch_size: int, seed: int, size: int = 32, patch: int = 4, markers: int = 2) -> Iterator[dict[str, torch.Tensor]]:
    """An endless stream of collated training batches (labels on the colour word + EOS)."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    pad = processor.tokenizer.pad_token_id
    while True:
        examples = []
        for _ in range(batch_size):
            colour = names[int(rng.integers(len(names)))]
            image, _ = marker_image(rng, colour, size, patch, markers)
            examples.append(encode_example(processor, messages(colour), [image]))
        yield collate(examples, pad)


def teach_vlm_markers(vlm, processor, steps: int = 200, lr: float = 1e-3, batch_size: int = 16, seed: int = 1) -> float:
    """Train a *random* tiny VLM (all weights) to answer the marker question with all tokens.

    AutoSelect needs a VLM that already uses the image; a real backbone comes pretrained, a
    tiny random one learns this task in a few seconds. Returns the last training loss.
    """
    stream = marker_batches(processor, batch_size, seed)
    optimizer = torch.optim.AdamW(vlm.parameters(), lr=lr)
    vlm.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = vlm(**next(stream)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    vlm.eval()
    return float(loss.detach())


def answer_accuracy(model, batch: dict[str, torch.Tensor]) -> float:
    """Share of examples whose first answer token is predicted correctly (greedy).

    Works for pruned models: each row's answer moved left by the placeholders its images lost
    (right-padded batches, one image per row, as ``marker_batches`` makes them).
    """
    with torch.no_grad():
        out = model(**batch)
    labels = batch["labels"]
    first = (labels != -100).float().argmax(-1)
    rows = torch.arange(labels.shape[0])
    selection = getattr(model, "last_selection", None)
    if selection is not None and len(selection.per_image()) == labels.shape[0]:
        lost = torch.tensor([n - len(k) for n, k in zip(selection.counts(), selection.per_image())])
    else:  # logits cover the whole (possibly uniformly shortened) sequence; the answer is at its end
        lost = torch.full_like(first, labels.shape[1] - out.logits.shape[1])
    predicted = out.logits[rows, first - 1 - lost].argmax(-1)
    return float((predicted == labels[rows, first]).float().mean())
