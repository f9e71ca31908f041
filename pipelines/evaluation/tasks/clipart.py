"""Clip Art category accuracy: the Open Clip Art top-level category of a drawing (multiple choice
over the exported categories), on the held-out split, category-balanced under ``--limit``."""

from __future__ import annotations

from pipelines.corpora.common import balanced_subset
from pipelines.evaluation.tasks.base import Task, TaskContext, heldout_records, manifest_choices, record_example

NAME = "clipart_category"


def load(ctx: TaskContext) -> Task:
    records = heldout_records(ctx, "openclipart")
    choices = manifest_choices(ctx, "clipart_category")
    chosen = balanced_subset(records, ctx.size(len(records)))
    return Task(
        name=NAME,
        kind="choice",
        examples=[record_example(ctx, r) for r in chosen],
        description=f"Open Clip Art category ({len(choices)}-way multiple choice)",
        source=f"{ctx.corpora_dir}/openclipart.heldout.jsonl, {ctx.split} half",
        choices=choices,
    )
