"""Inputs the model tests share: seeded noise images and two prompts of different lengths (so a
batch is padded)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

PROMPTS = [
    "USER: <image>\nWhat is in the image? ASSISTANT:",
    "USER: <image>\nDescribe the picture in one short sentence please. ASSISTANT:",
]


def noise_images(sizes: Sequence[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    """One uniform-noise RGB image per ``(height, width)``, drawn in order from one seeded stream."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def square_images(count: int, seed: int = 0, side: int = 32) -> list[Image.Image]:
    """``count`` noise images of ``side`` x ``side`` (the tiny backbones' 32 px)."""
    return noise_images([(side, side)] * count, seed)
