"""Clip Art category accuracy: the Open Clip Art top-level category of a drawing (multiple choice
over the exported categories), on the held-out split, category-balanced under ``--limit``."""

from __future__ import annotations

from pipelines.evaluation.tasks.base import Task, TaskContext, balanced_choice_task, heldout_records, manifest_choices

NAME = "clipart_category"


def load(ctx: TaskContext) -> Task:
    records = heldout_records(ctx, "openclipart")
    choices = manifest_choices(ctx, "clipart_category")
    return balanced_choice_task(ctx, NAME, "openclipart", records, choices, f"Open Clip Art category ({len(choices)}-way multiple choice)")
