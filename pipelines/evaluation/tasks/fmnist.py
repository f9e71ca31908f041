"""Classification VQA: "what kind of clothing item is shown?" over the 10 Fashion-MNIST classes,
on the held-out split of the packaged corpora (class-balanced when ``--limit`` cuts it)."""

from __future__ import annotations

from pipelines.evaluation.tasks.base import Task, TaskContext, balanced_choice_task, heldout_records, manifest_choices

NAME = "fmnist_vqa"


def load(ctx: TaskContext) -> Task:
    return balanced_choice_task(ctx, NAME, "fashion_mnist", heldout_records(ctx, "fashion_mnist"),
                                manifest_choices(ctx, "fmnist_class"), "Fashion-MNIST clothing class (10-way multiple choice)")
