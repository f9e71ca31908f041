"""A copy of a corpora export whose scenes garment questions point the oracle at every item.

The evaluation's oracle keeps the K tokens that overlap an example's boxes most; for the scenes
garment question those boxes are the garment's, which a query-agnostic selector cannot know. This
writes ``--out`` with the same files (symlinks) except ``scenes.heldout.jsonl``, where each
garment question's ``boxes`` are every item's box (the garment and the drawings: what a caption
names), so ``pipelines/evaluate.py --corpora OUT --pruners oracle`` measures the best a selector
that keeps every item and drops the background can do. For validation runs only; it changes no
image, answer or split.

The oracle ranks patches wholly inside a box first, ties broken by the distance to the nearest box
centre, so with whole item boxes it keeps each item's central patches and a small garment beside
large drawings gets fewer than its share. ``--equal-share K --grid G`` gives every item about the
same share instead: each item's box shrinks to a square of about K / (items) patches of a G x G
grid around its centre (clipped to the item), so the K kept tokens split evenly between items.

    python experiments/items_oracle_corpora.py --corpora .cache/corpora-plain-g6 --out .cache/corpora-plain-g6-items
    python experiments/items_oracle_corpora.py --corpora .cache/corpora-plain-g6 --out .cache/corpora-plain-g6-items-eq \
      --equal-share 28 --grid 16
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from pipelines.corpora.scenes import GARMENT_TASK

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--equal-share", type=int, default=None, metavar="K", help="split K tokens evenly between items")
    parser.add_argument("--grid", type=int, default=16, help="patches per image side (default: %(default)s, the mini-LLaVA)")
    args = parser.parse_args(argv)
    source = args.corpora.resolve()
    args.out.mkdir(parents=True, exist_ok=False)
    for entry in source.iterdir():
        if entry.name != SCENES:
            (args.out / entry.name).symlink_to(entry)
    changed = 0
    with open(source / SCENES, encoding="utf-8") as reader, open(args.out / SCENES, "w", encoding="utf-8") as writer:
        for line in reader:
            if not line.strip():
                continue
            record = json.loads(line)
            rewritten = items_boxes(record, args.equal_share, args.grid)
            changed += rewritten is not record
            writer.write(json.dumps(rewritten) + "\n")
    print(f"{args.out}: {changed} garment questions now box every item")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
