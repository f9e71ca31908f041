"""Pieces every packaged-corpus exporter shares: LLaVA records, seeded balanced splits, image
normalisation, and the error raised when a Debian data package is not installed.

Splits are drawn per label in round-robin from a seeded shuffle, so held-out sets are balanced
(chance is exactly 1/labels) and the held-out draw does not depend on how much is trained on.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, TypeVar

import numpy as np
from PIL import Image

T = TypeVar("T")
IMAGE_TOKEN = "<image>"
WHITE = (255, 255, 255)


class MissingPackageError(FileNotFoundError):
    """A packaged data set is absent; the message names the Debian package that ships it."""

    def __init__(self, what: str, path: Path, package: str) -> None:
        super().__init__(
            f"{what} not found at {path}. It comes from the Debian package {package!r}: "
            f"run `apt-get update && apt-get install -y {package}` (or point the exporter at another copy)."
        )
        self.package = package


def require_files(what: str, package: str, paths: Sequence[Path]) -> None:
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise MissingPackageError(what, missing[0], package)


def seeded_rng(seed: int, *scope: str) -> random.Random:
    """An RNG per (seed, source, split): string seeds are hashed with SHA-512, so the draw is the
    same in every process and Python version, independent of PYTHONHASHSEED."""
    return random.Random(":".join([str(seed), *scope]))


def shuffled_groups(groups: Mapping[str, Sequence[T]], rng: random.Random) -> dict[str, list[T]]:
    """Each label's items in a seeded order (labels in sorted order, so dict order cannot leak in)."""
    queues = {}
    for label in sorted(groups):
        items = list(groups[label])
        rng.shuffle(items)
        queues[label] = items
    return queues


def balanced_take(queues: dict[str, list[T]], n: int, accept: Callable[[T], bool] = lambda _: True) -> list[T]:
    """Take up to ``n`` items round-robin over labels, popping from ``queues`` (so a later take
    never sees them again); items ``accept`` rejects (broken files) are dropped and skipped."""
    taken: list[T] = []
    while len(taken) < n and any(queues.values()):
        for label in list(queues):
            while queues[label] and len(taken) < n:
                item = queues[label].pop(0)
                if accept(item):
                    taken.append(item)
                    break
    return taken



def balanced_subset(records: Sequence[dict], n: int | None) -> list[dict]:
    """Up to ``n`` records taken round-robin over labels in file order (all when ``n`` is None),
    so a small evaluation keeps the held-out split's class balance."""
    if n is None or n >= len(records):
        return list(records)
    by_label: dict[str, list[dict]] = {}
    for record in records:
        by_label.setdefault(record["label"], []).append(record)
    return balanced_take(by_label, n)


def llava_record(record_id: str, image: str, question: str, answer: str, **extra) -> dict:
    """One LLaVA-style sample (the format ``pipelines.preprocess`` reads); extra keys ride along."""
    return {
        "id": record_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
            {"from": "gpt", "value": answer},
        ],
        **extra,
    }


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    return n


def on_white(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto white (clip art is drawn on a transparent
    canvas; a plain ``convert('RGB')`` would turn the background black)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def square_on_white(image: Image.Image, size: int) -> Image.Image:
    """Pad to a white square, then resize to ``size``: the whole drawing survives the processor's
    centre crop, whatever its aspect ratio."""
    image = on_white(image)
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), WHITE)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def gray_to_rgb(pixels: np.ndarray, size: int) -> Image.Image:
    """A small grey-level array upsampled (bicubic) to a ``size`` x ``size`` RGB image."""
    return Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def save_png(image: Image.Image, out_dir: Path, relative: str) -> str:
    path = out_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=False)
    return relative
