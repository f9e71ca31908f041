"""Held-out evaluation tasks, one small module each, behind a name -> loader registry.

Add a task by writing ``load(ctx: TaskContext) -> Task`` (raise `TaskUnavailable` when its data
is absent) and listing it in ``TASKS``.
"""

from __future__ import annotations

from typing import Callable

from pipelines.evaluation.tasks import captions, clipart, fmnist, markers, scenes, spatial
from pipelines.evaluation.tasks.base import Example, Task, TaskContext, TaskUnavailable

TASKS: dict[str, Callable[[TaskContext], Task]] = {
    "markers": markers.load,
    "spatial_markers": spatial.load_markers,
    "fmnist_vqa": fmnist.load,
    "spatial_fmnist": spatial.load_fmnist,
    "clipart_category": clipart.load,
    "caption_nll": captions.load,
    "scenes_garment": scenes.load,
    "scenes_caption_nll": scenes.load_captions,
}


def load_tasks(names: list[str], ctx: TaskContext) -> tuple[list[Task], dict[str, str]]:
    """The tasks that could be built, and ``{name: reason}`` for the ones whose data is absent."""
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; available: {', '.join(TASKS)}")
    tasks, skipped = [], {}
    for name in names:
        try:
            tasks.append(TASKS[name](ctx))
        except TaskUnavailable as exc:
            skipped[name] = str(exc)
    return tasks, skipped


__all__ = ["TASKS", "Example", "Task", "TaskContext", "TaskUnavailable", "load_tasks"]
