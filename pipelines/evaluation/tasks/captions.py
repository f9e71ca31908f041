"""Caption next-token loss: mean NLL (nats per token) of the reference caption's answer tokens,
over the held-out captions (clip-art titles and photo captions). ``--limit`` takes them
round-robin over the two sources, so a small run still sees both."""

from __future__ import annotations

from pipelines.corpora.common import balanced_take
from pipelines.evaluation.tasks.base import Task, TaskContext, heldout_records, record_example

NAME = "caption_nll"


def load(ctx: TaskContext) -> Task:
    records = heldout_records(ctx, "captions")
    by_source: dict[str, list[dict]] = {}
    for record in records:
        by_source.setdefault(record.get("task", "captions"), []).append(record)
    chosen = balanced_take({k: by_source[k] for k in sorted(by_source)}, ctx.size(len(records)))
    return Task(
        name=NAME,
        kind="nll",
        examples=[record_example(ctx, r) for r in chosen],
        description=f"mean NLL per answer token of the reference caption ({', '.join(sorted(by_source))})",
        source=f"{ctx.corpora_dir}/captions.heldout.jsonl, {ctx.split} half",
    )
