"""Classification VQA: "what kind of clothing item is shown?" over the 10 Fashion-MNIST classes,
on the held-out split of the packaged corpora (class-balanced when ``--limit`` cuts it)."""

from __future__ import annotations

from pipelines.corpora.common import balanced_subset
from pipelines.evaluation.tasks.base import Task, TaskContext, heldout_records, manifest_choices, record_example

NAME = "fmnist_vqa"


def load(ctx: TaskContext) -> Task:
    records = heldout_records(ctx, "fashion_mnist")
    choices = manifest_choices(ctx, "fmnist_class")
    chosen = balanced_subset(records, ctx.size(len(records)))
    return Task(
        name=NAME,
        kind="choice",
        examples=[record_example(ctx, r) for r in chosen],
        description="Fashion-MNIST clothing class (10-way multiple choice)",
        source=f"{ctx.corpora_dir}/fashion_mnist.heldout.jsonl, {ctx.split} half",
        choices=choices,
    )
