"""What every evaluation task is made of, and the held-out corpora they read.

A task is a list of ``(image, question, answer)`` examples plus how to score them: ``choice``
tasks are multiple choice over ``choices`` (accuracy), ``nll`` tasks score the reference answer
itself (mean next-token loss of its tokens). A task whose data is absent raises
`TaskUnavailable` with the reason, which the report lists under ``skipped``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from pipelines.corpora import load_records, open_image, read_manifest

Kind = Literal["choice", "nll"]
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

    def size(self, available: int | None = None) -> int:
        """How many examples to use: ``limit``, capped by what is ``available`` (generated: 200)."""
        wanted = self.limit if self.limit is not None else (available or GENERATED_DEFAULT_SIZE)
        return min(wanted, available) if available is not None else wanted


def heldout_records(ctx: TaskContext, name: str) -> list[dict]:
    """The held-out split ``<name>.heldout.jsonl`` of the packaged-corpora export, never a train file."""
    path = ctx.corpora_dir / f"{name}.heldout.jsonl"
    if not path.is_file():
        raise TaskUnavailable(f"{path} not found: the packaged corpora are not exported; " + EXPORT_HINT.format(dir=ctx.corpora_dir))
    records = load_records(ctx.corpora_dir, name, "heldout")
    if not records:
        raise TaskUnavailable(f"{path} is empty (was its source left out of the export? see manifest.json 'skipped')")
    return records


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
    from pipelines.corpus import conversation_turns

    question, answer = conversation_turns(record["conversations"])[0]
    return Example(record["id"], record_image(ctx, record), question, answer)
