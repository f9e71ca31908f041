"""One LLaVA annotation file from several, shuffled together, for a training mix.

The training stream reads the preprocessed shards in order, so two sources preprocessed one after
the other would reach the scorer one after the other (all scenes, then all Fashion-MNIST). Mixing
the annotation lines before preprocessing, with a fixed seed, makes every stretch of the stream
hold both and the data reproducible. Each input is ``FILE``, ``FILE:TASK`` (keep only records
of that task) or ``FILE:TASK:N`` (N of them, drawn with the same seed, to weight a source); image
paths stay relative to the inputs' folder, so preprocess with ``--image-root`` set to it:

    python experiments/mix_annotations.py --out outputs/mix/scenes-captions-fmnist.train.jsonl --seed 0 \
      .cache/corpora-small-plain/scenes.train.jsonl:scenes_caption .cache/corpora-small-plain/fashion_mnist.train.jsonl:fmnist_class
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path


def selected_lines(spec: str, rng: random.Random) -> list[str]:
    path, _, rest = spec.partition(":")
    task, _, count = rest.partition(":")
    lines = Path(path).read_text().splitlines(keepends=True)
    if not task:
        return lines
    kept = [line for line in lines if json.loads(line).get("task") == task]
    if not kept:
        raise SystemExit(f"{path}: no record has task {task!r}")
    if count:
        if not count.isdigit() or not 0 < int(count) <= len(kept):
            raise SystemExit(f"{spec}: N must be a whole number from 1 to {len(kept)} (the {task} records there)")
        kept = rng.sample(kept, int(count))
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="FILE, FILE:TASK or FILE:TASK:N")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    lines = [line for spec in args.inputs for line in selected_lines(spec, rng)]
    rng.shuffle(lines)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(lines))
    print(json.dumps({"out": str(out), "rows": len(lines), "tasks": Counter(json.loads(line).get("task") for line in lines)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
