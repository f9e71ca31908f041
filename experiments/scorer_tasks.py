"""What the scorer-only experiments share (the vision tower and the scorer, no LLM): their command
line, loading the backbone and one scorer, each ``--task NAME=CORPORA``'s val questions through the
evaluation's own loader, and the pass from a batch's pixels to its visual tokens and logits."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import torch

from autoselect.model import AutoSelectModel
from mlops.backbone import load_autoselect, load_vlm_and_processor
from pipelines.evaluation.scoring import heldout_task


def add_arguments(parser: argparse.ArgumentParser, limit: int | None) -> None:
    """--model, --scorer, --task (repeatable), --limit, --batch-size, --dtype, --out."""
    parser.add_argument("--model", required=True, help="the backbone folder the scorer was trained on")
    parser.add_argument("--scorer", required=True, help="a scorer folder or models:/name@alias")
    parser.add_argument("--task", action="append", required=True, metavar="NAME=CORPORA", help="a task and its corpora export (repeatable)")
    parser.add_argument("--limit", type=int, default=limit, help="questions per task (default: %(default)s; none: the evaluation's)")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32")
    parser.add_argument("--out", type=Path, default=None)


def load(args: argparse.Namespace):
    """``(vlm, processor, model)``: the backbone on the CPU in ``--dtype`` and the scorer over it."""
    vlm, processor = load_vlm_and_processor(args.model, args.dtype, torch.device("cpu"))
    model, _ = load_autoselect(args.scorer, vlm)
    return vlm, processor, model


def tasks(vlm, processor, args: argparse.Namespace) -> Iterator[tuple[str, list]]:
    """``(name, examples)`` per ``--task NAME=CORPORA``: its val questions, the evaluation's pick."""
    for spec in args.task:
        name, _, corpora = spec.partition("=")
        yield name, heldout_task(vlm, processor, name, Path(corpora), args.limit).examples


def scored_batches(model: AutoSelectModel, processor, examples: list, batch_size: int) -> Iterator[tuple[list, torch.Tensor, torch.Tensor]]:
    """``(batch, tokens [B, N, D], logits [B, N])`` over ``examples`` in batches, without gradients."""
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        pixels = processor.image_processor([e.image for e in batch], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            tokens = model.visual_tokens(pixel_values=pixels)
            yield batch, tokens, model.scorer(tokens)
