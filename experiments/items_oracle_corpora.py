"""A copy of a corpora export whose scenes garment questions point the oracle at every item.

The evaluation's oracle keeps the K tokens that overlap an example's boxes most; for the scenes
garment question those boxes are the garment's, which a query-agnostic selector cannot know. This
writes ``--out`` with the same files (symlinks) except ``scenes.heldout.jsonl``, where each
garment question's ``boxes`` are every item's box (the garment and the drawings: what a caption
names), so ``pipelines/evaluate.py --corpora OUT --pruners oracle`` measures the best a selector
that keeps every item and drops the background can do. For validation runs only; it changes no
image, answer or split.

    python experiments/items_oracle_corpora.py --corpora .cache/corpora-plain-g6 --out .cache/corpora-plain-g6-items
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipelines.corpora.scenes import GARMENT_TASK

SCENES = "scenes.heldout.jsonl"


def items_boxes(record: dict) -> dict:
    """The record with ``boxes`` = every item's fractional box when it is a garment question."""
    if record.get("task") != GARMENT_TASK:
        return record
    return {**record, "boxes": [item["box_fraction"] for item in record["items"]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpora", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
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
            rewritten = items_boxes(record)
            changed += rewritten is not record
            writer.write(json.dumps(rewritten) + "\n")
    print(f"{args.out}: {changed} garment questions now box every item")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
