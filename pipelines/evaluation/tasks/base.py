"""What every evaluation task is made of, and the held-out corpora they read.

A task is a list of ``(image, question, answer)`` examples plus how to score them: ``choice``
tasks are multiple choice over ``choices`` (accuracy), ``nll`` tasks score the reference answer
itself (mean next-token loss of its tokens). A task whose data is absent raises
`TaskUnavailable` with the reason, which the report lists under ``skipped``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from PIL import Image

from pipelines.corpora import load_records, open_image, read_manifest
from pipelines.corpora.common import balanced_subset

Kind = Literal["choice", "nll"]
EVAL_SPLITS = ("val", "test")  # every choice is made on val; reported numbers come from test
HELDOUT_STREAM = 10_000  # + a per-task number: never an integer seed a training stream uses
GENERATED_DEFAULT_SIZE = 200  # examples of a generated task when --limit is not given
EXPORT_HINT = "export them with `python pipelines/packaged_corpora.py --out {dir}`"


class TaskUnavailable(Exception):
    """The task's data is absent; the message says what is missing and how to get it."""


@dataclass(frozen=True)
class Example:
    id: str
    image: Image.Image
    question: str
    answer: str  # the reference answer (the correct choice, or the caption to score)
    # where the answer is, as (x0, y0, x1, y1) fractions of the image's width and height; empty
    # when the task does not know (the evaluation-only oracle needs it)
    boxes: tuple[tuple[float, float, float, float], ...] = ()


@dataclass
class Task:
    name: str
    kind: Kind
    examples: list[Example]
    description: str
    source: str
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.examples:
            raise TaskUnavailable(f"{self.name}: no examples")
        if self.kind == "choice":
            unknown = sorted({e.answer for e in self.examples} - set(self.choices))
            if unknown:
                raise ValueError(f"{self.name}: answers {unknown} are not among the choices")

    @property
    def metric(self) -> str:
        return "accuracy" if self.kind == "choice" else "nll"

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "choice"

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "n": len(self.examples),
            "description": self.description,
            "source": self.source,
        }
        if self.kind == "choice":
            info.update(choices=list(self.choices), chance=round(1 / len(self.choices), 4))
        return info


@dataclass(frozen=True)
class TaskContext:
    """What task loaders may depend on: the backbone's image geometry, the corpora, the seed."""

    image_size: int  # side of the square image the vision tower sees
    patch_size: int  # pixels per visual token
    corpora_dir: Path
    seed: int = 0
    limit: int | None = None
    split: str = "val"  # which half of every held-out set: "val" (choose) or "test" (report)

    def __post_init__(self) -> None:
        if self.split not in EVAL_SPLITS:
            raise ValueError(f"split must be one of {EVAL_SPLITS}, got {self.split!r}")

    def rng(self, task_number: int):
        """The seeded stream of a generated task: its own per task, seed and split, and never an
        integer seed a training stream uses (``HELDOUT_STREAM``)."""
        import numpy as np

        return np.random.default_rng([HELDOUT_STREAM, task_number, self.seed, EVAL_SPLITS.index(self.split)])

    def size(self, available: int | None = None) -> int:
        """How many examples to use: ``limit``, capped by what is ``available`` (generated: 200)."""
        wanted = self.limit if self.limit is not None else (available or GENERATED_DEFAULT_SIZE)
        return min(wanted, available) if available is not None else wanted


def cell_box(cell: int, grid: int) -> tuple[float, float, float, float]:
    """The box of patch ``cell`` (row-major) of a ``grid x grid`` patch grid, in image fractions."""
    row, col = divmod(cell, grid)
    return (col / grid, row / grid, (col + 1) / grid, (row + 1) / grid)


def split_of(record_id: str) -> str:
    """``val`` or ``test`` for a held-out record: a fixed half by a hash of its id, so the halves
    never change with the seed, the limit or the order of the file."""
    return EVAL_SPLITS[hashlib.sha256(record_id.encode()).digest()[0] % 2]


def heldout_records(ctx: TaskContext, name: str, split_key: Callable[[dict], str] = lambda r: r["id"]) -> list[dict]:
    """``ctx.split``'s half (`split_of` of ``split_key(record)``, its id by default) of
    ``<name>.heldout.jsonl`` of the packaged-corpora export, never a train file."""
    path = ctx.corpora_dir / f"{name}.heldout.jsonl"
    if not path.is_file():
        raise TaskUnavailable(f"{path} not found: the packaged corpora are not exported; " + EXPORT_HINT.format(dir=ctx.corpora_dir))
    records = load_records(ctx.corpora_dir, name, "heldout")
    if not records:
        raise TaskUnavailable(f"{path} is empty (was its source left out of the export? see manifest.json 'skipped')")
    return [r for r in records if split_of(split_key(r)) == ctx.split]


def manifest_choices(ctx: TaskContext, task_key: str) -> tuple[str, ...]:
    """The answer options the exporter recorded for ``task_key`` in ``manifest.json``."""
    try:
        return tuple(read_manifest(ctx.corpora_dir)["tasks"][task_key]["choices"])
    except FileNotFoundError:
        raise TaskUnavailable(f"{ctx.corpora_dir / 'manifest.json'} not found; " + EXPORT_HINT.format(dir=ctx.corpora_dir)) from None
    except KeyError:
        raise TaskUnavailable(f"{ctx.corpora_dir / 'manifest.json'} lists no choices for {task_key!r}") from None


def record_image(ctx: TaskContext, record: dict) -> Image.Image:
    try:
        return open_image(ctx.corpora_dir, record)
    except FileNotFoundError as exc:
        raise TaskUnavailable(f"{exc.filename} is missing from the export; " + EXPORT_HINT.format(dir=ctx.corpora_dir)) from None


def record_example(ctx: TaskContext, record: dict) -> Example:
    """An exported LLaVA record's first turn, read as ``pipelines.preprocess`` reads it."""
    from pipelines.preprocessing.corpus import conversation_turns

    question, answer = conversation_turns(record["conversations"])[0]
    return Example(record["id"], record_image(ctx, record), question, answer)


def balanced_choice_task(
    ctx: TaskContext, name: str, corpus: str, records: list[dict], choices: tuple[str, ...], description: str,
    example: Callable[[TaskContext, dict], Example] = record_example,
) -> Task:
    """A multiple-choice task over ``records`` of ``<corpus>.heldout.jsonl``, class-balanced when
    ``--limit`` cuts it (`balanced_subset`), each read by ``example``."""
    chosen = balanced_subset(records, ctx.size(len(records)))
    return Task(
        name=name,
        kind="choice",
        examples=[example(ctx, r) for r in chosen],
        description=description,
        source=f"{ctx.corpora_dir}/{corpus}.heldout.jsonl, {ctx.split} half",
        choices=choices,
    )
