"""A copy of a corpora export with its held-out scenes changed for one validation question.

Everything but ``scenes.heldout.jsonl`` is linked, not copied; no image, answer or split changes.
What changes, only for garment questions (captions stay as they are):

- ``--box-items``: each question's ``boxes`` become every item's box (the garment and the
  drawings: what a caption names), so the evaluation's oracle measures a selector that keeps every
  item and drops the background, the ceiling of a query-agnostic selector. The oracle ranks patches
  wholly inside a box first, ties by the distance to the nearest box centre, so with whole item
  boxes a small garment beside large drawings gets fewer tokens than its share;
  ``--equal-share K --grid G`` shrinks each item's box to about K / (items) patches of a G x G grid
  around its centre (clipped to the item), so K splits evenly between items.
- ``--items N[,N]``: keep only the questions whose scene has that many items (garment + drawings).
- ``--skip-first-val N``: drop the N val questions an earlier ``--limit N`` evaluation used (the
  same class-balanced pick), so a finding there can be checked on scenes it was not found on.

    python experiments/scenes_heldout_copy.py --corpora .cache/corpora-plain-g6 --out .cache/corpora-plain-g6-items --box-items
    python experiments/scenes_heldout_copy.py --corpora .cache/corpora-plain-g6 --out .cache/g6-two-items-fresh \\
      --items 2 --skip-first-val 200
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from pipelines.corpora.scenes import GARMENT_TASK
from pipelines.evaluation.tasks import scenes
from pipelines.evaluation.tasks.base import TaskContext

SCENES = "scenes.heldout.jsonl"


def centre_square(box: list[float], side: float) -> list[float]:
    """The square of ``side`` (image fractions) around ``box``'s centre, clipped to ``box``."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return [max(x0, cx - side / 2), max(y0, cy - side / 2), min(x1, cx + side / 2), min(y1, cy + side / 2)]


def items_boxes(record: dict, equal_share: int | None = None, grid: int = 16) -> dict:
    """The record with ``boxes`` = every item's fractional box when it is a garment question (with
    ``equal_share`` K: each shrunk to about K / items patches around its centre)."""
    if record.get("task") != GARMENT_TASK:
        return record
    boxes = [item["box_fraction"] for item in record["items"]]
    if equal_share:
        side = math.sqrt(equal_share / len(boxes)) / grid
        boxes = [centre_square(box, side) for box in boxes]
    return {**record, "boxes": boxes}


def first_val_ids(corpora: Path, limit: int) -> set[str]:
    """The ids of the val garment questions ``pipelines/evaluate.py --limit LIMIT`` scores."""
    ctx = TaskContext(image_size=224, patch_size=14, corpora_dir=corpora, limit=limit, split="val")  # geometry unused by this task
    return {example.id for example in scenes.load(ctx).examples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--box-items", action="store_true", help="box every item, not the garment alone")
    parser.add_argument("--equal-share", type=int, default=None, metavar="K", help="with --box-items: split K tokens evenly between items")
    parser.add_argument("--grid", type=int, default=16, help="patches per image side (default: %(default)s, the mini-LLaVA)")
    parser.add_argument("--items", default=None, help="keep questions on scenes with this many items (comma-separated)")
    parser.add_argument("--skip-first-val", type=int, default=0, metavar="N", help="drop the val questions a --limit N evaluation used")
    args = parser.parse_args(argv)
    if args.equal_share and not args.box_items:
        parser.error("--equal-share needs --box-items")
    source = args.corpora.resolve()
    counts = {int(n) for n in args.items.split(",")} if args.items else None
    skip = first_val_ids(source, args.skip_first_val) if args.skip_first_val else set()
    args.out.mkdir(parents=True, exist_ok=False)
    for entry in source.iterdir():
        if entry.name != SCENES:
            (args.out / entry.name).symlink_to(entry)
    kept = dropped = 0
    with open(source / SCENES, encoding="utf-8") as reader, open(args.out / SCENES, "w", encoding="utf-8") as writer:
        for line in filter(str.strip, reader):
            record = json.loads(line)
            if record.get("task") == GARMENT_TASK:
                if record["id"] in skip or (counts is not None and len(record["items"]) not in counts):
                    dropped += 1
                    continue
                kept += 1
                if args.box_items:
                    record = items_boxes(record, args.equal_share, args.grid)
            writer.write(json.dumps(record) + "\n")
    print(f"{args.out}: {kept} garment questions kept, {dropped} dropped ({len(skip)} used before, the rest by item count)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
