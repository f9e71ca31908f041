"""The synthetic marker task (``autoselect.testing.synthetic``): "which colour is the marker?",
the answer held by 2 one-patch squares, so a pruner that drops both fails.

Generated at the backbone's own geometry (image side, patch size), so it runs on any backbone
and fully offline on the tiny one. Held out by construction: a seed stream that the training
streams (plain integer seeds) never use.
"""

from __future__ import annotations

from autoselect.testing.synthetic import COLOURS, QUESTION, marker_image
from pipelines.evaluation.tasks.base import Example, Task, TaskContext, cell_box

NAME = "markers"


def load(ctx: TaskContext) -> Task:
    rng = ctx.rng(1)
    names = list(COLOURS)
    examples = []
    for i in range(ctx.size()):
        colour = names[int(rng.integers(len(names)))]
        image, cells = marker_image(rng, colour, size=ctx.image_size, patch=ctx.patch_size)
        boxes = tuple(cell_box(cell, ctx.image_size // ctx.patch_size) for cell in cells)
        examples.append(Example(f"{NAME}-{i:04d}", image, QUESTION, colour, boxes))
    return Task(
        name=NAME,
        kind="choice",
        examples=examples,
        description="colour of 2 one-patch markers on grey noise (multiple choice)",
        source=f"generated (autoselect.testing.synthetic, seed {ctx.seed}, {ctx.split} stream)",
        choices=tuple(names),
    )
