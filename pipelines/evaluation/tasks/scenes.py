"""Localized content: "what kind of clothing item is in the picture?" on held-out scenes (one
Fashion-MNIST garment, 0-2 clip-art drawings, a photo behind them; ``pipelines/corpora/scenes.py``).

The answer sits in the garment's square (1/4 to 1/2 of the image side), so a pruner that drops
those tokens fails while the drawings and the photo keep the rest of the image busy. Each
example's ``boxes`` is that square, for the oracle. Class-balanced when ``--limit`` cuts.

``scenes_caption_nll``: the NLL of the held-out scenes' captions (every item named), the
scorer's training objective on scenes it never saw. A scene's caption falls in the half of its
garment question, so val and test never share an image across the two tasks.
"""

from __future__ import annotations

from dataclasses import replace

from pipelines.corpora.scenes import CAPTION_TASK, GARMENT_TASK, garment_question_id
from pipelines.evaluation.tasks.base import (
    Example, Task, TaskContext, balanced_choice_task, heldout_records, manifest_choices, record_example,
)

NAME = "scenes_garment"
CAPTION_NAME = "scenes_caption_nll"


def boxed_example(ctx: TaskContext, record: dict) -> Example:
    """The record's question with its garment's square, for the oracle."""
    return replace(record_example(ctx, record), boxes=tuple(tuple(box) for box in record["boxes"]))


def load(ctx: TaskContext) -> Task:
    records = [r for r in heldout_records(ctx, "scenes") if r["task"] == GARMENT_TASK]
    return balanced_choice_task(
        ctx, NAME, "scenes", records, manifest_choices(ctx, GARMENT_TASK),
        "Fashion-MNIST garment among clip-art drawings on a photo or a plain background (10-way multiple choice)",
        example=boxed_example,
    )


def load_captions(ctx: TaskContext) -> Task:
    records = [r for r in heldout_records(ctx, "scenes", split_key=garment_question_id) if r["task"] == CAPTION_TASK]
    return Task(
        name=CAPTION_NAME,
        kind="nll",
        examples=[record_example(ctx, r) for r in records[: ctx.size(len(records))]],
        description="mean NLL per answer token of a held-out scene's caption (every item named)",
        source=f"{ctx.corpora_dir}/scenes.heldout.jsonl, {ctx.split} half (by scene)",
    )
