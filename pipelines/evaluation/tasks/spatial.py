"""Spatial questions about one cell of a 2 x 2 composite: "what is in the top-left?".

Each cell holds a different object, so the three others are wrong answers that are present in
the image: a pruner that drops the asked object (while keeping the others) fails, which a
whole-image question cannot show.

* ``spatial_markers``: one one-patch marker per quadrant, four different colours, on grey noise;
  generated at the backbone's geometry (runs offline on the tiny backbone).
* ``spatial_fmnist``: four held-out Fashion-MNIST items of four different classes, one per
  quadrant (needs the packaged-corpora export).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from autoselect.testing.synthetic import COLOURS
from pipelines.evaluation.tasks.base import Example, Task, TaskContext, cell_box, heldout_records, manifest_choices, record_image

POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")  # row-major quadrants


def marker_quadrants(rng: np.random.Generator, size: int, patch: int) -> tuple[Image.Image, list[str], list[int]]:
    """Grey noise with one patch-sized marker at a random cell of each quadrant; the colours and
    the markers' cells (row-major patch indices) by quadrant."""
    grid = size // patch
    half = grid // 2  # quadrant side in patches
    pixels = rng.normal(128, 12, size=(size, size, 3)).clip(0, 255).astype(np.uint8)
    colours = [str(c) for c in rng.permutation(list(COLOURS))]
    cells = []
    for quadrant, colour in enumerate(colours):
        row = (quadrant // 2) * half + int(rng.integers(half))
        col = (quadrant % 2) * half + int(rng.integers(half))
        pixels[row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] = COLOURS[colour]
        cells.append(row * grid + col)
    return Image.fromarray(pixels), colours, cells


def load_markers(ctx: TaskContext) -> Task:
    rng = ctx.rng(2)
    examples = []
    for i in range(ctx.size()):
        image, colours, cells = marker_quadrants(rng, ctx.image_size, ctx.patch_size)
        asked = int(rng.integers(len(POSITIONS)))
        question = f"Which colour is the marker in the {POSITIONS[asked]}?"
        box = cell_box(cells[asked], ctx.image_size // ctx.patch_size)
        examples.append(Example(f"spatial_markers-{i:04d}", image, question, colours[asked], (box,)))
    return Task(
        name="spatial_markers",
        kind="choice",
        examples=examples,
        description="colour of the one-patch marker in one quadrant; the other 3 quadrants hold the other colours",
        source=f"generated (seed {ctx.seed}, {ctx.split} stream)",
        choices=tuple(COLOURS),
    )


def tile(images: list[Image.Image], size: int) -> Image.Image:
    """Four images as the quadrants of a ``size`` x ``size`` square, row-major."""
    side = size // 2
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    for quadrant, image in enumerate(images):
        canvas.paste(image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC), ((quadrant % 2) * side, (quadrant // 2) * side))
    return canvas


def load_fmnist(ctx: TaskContext) -> Task:
    records = heldout_records(ctx, "fashion_mnist")
    choices = manifest_choices(ctx, "fmnist_class")
    by_label: dict[str, list[dict]] = {}
    for record in records:
        by_label.setdefault(record["label"], []).append(record)
    labels = sorted(by_label)
    if len(labels) < len(POSITIONS):
        raise ValueError(f"spatial_fmnist needs {len(POSITIONS)} classes in the held-out split, found {labels}")
    rng = ctx.rng(3)
    examples = []
    for i in range(ctx.size()):
        chosen = [labels[j] for j in rng.choice(len(labels), size=len(POSITIONS), replace=False)]
        items = [by_label[label][int(rng.integers(len(by_label[label])))] for label in chosen]
        asked = int(rng.integers(len(POSITIONS)))
        question = f"What kind of clothing item is shown in the {POSITIONS[asked]}? Answer with one word or phrase."
        image = tile([record_image(ctx, r) for r in items], ctx.image_size)
        x0, y0 = (asked % 2) / 2, (asked // 2) / 2
        examples.append(Example(f"spatial_fmnist-{i:04d}", image, question, chosen[asked], ((x0, y0, x0 + 0.5, y0 + 0.5),)))
    return Task(
        name="spatial_fmnist",
        kind="choice",
        examples=examples,
        description="clothing item in one quadrant of a 2x2 grid of held-out Fashion-MNIST items of 4 different classes",
        source=f"{ctx.corpora_dir}/fashion_mnist.heldout.jsonl, {ctx.split} half (seed {ctx.seed})",
        choices=choices,
    )
