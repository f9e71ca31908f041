"""Fashion-MNIST (Debian ``dataset-fashion-mnist``) as 10-way "what clothing item" questions.

The train split comes from the package's 60k training file and the held-out split from its 10k
test file, both drawn balanced per class; held-out images whose pixels also occur in the
training file are left out, so nothing held out can have been trained on.
"""

from __future__ import annotations

import gzip
import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.corpora.common import balanced_take, gray_to_rgb, llava_record, require_files, save_png, seeded_rng, shuffled_groups

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
NAME = "fashion_mnist"
TASK = "fmnist_class"
# Fashion-MNIST's label order; names read as an answer would ("T-shirt/top" -> "T-shirt").
CLASS_NAMES = ("T-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
QUESTION = "What kind of clothing item is shown? Answer with one word or phrase."
_FILES = {"train": "train", "heldout": "t10k"}


def _idx_path(root: Path, prefix: str, kind: str) -> Path:
    return root / (f"{prefix}-images-idx3-ubyte.gz" if kind == "images" else f"{prefix}-labels-idx1-ubyte.gz")


def source_files(root: Path = DEFAULT_DIR) -> list[Path]:
    return [_idx_path(Path(root), prefix, kind) for prefix in _FILES.values() for kind in ("images", "labels")]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (big-endian header: magic with the rank in its last byte, then the dims)."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    rank = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=rank, offset=4).astype(int)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank).reshape(tuple(dims))


def load_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images [n, 28, 28] uint8, labels [n])`` for ``train`` or ``heldout`` (the test file)."""
    root = Path(root)
    require_files("Fashion-MNIST", DEBIAN_PACKAGE, source_files(root))
    prefix = _FILES[split]
    images, labels = read_idx(_idx_path(root, prefix, "images")), read_idx(_idx_path(root, prefix, "labels"))
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels in the {prefix} files")
    return images, labels


@dataclass(frozen=True)
class Item:
    id: str  # fashion_mnist-<file>-<index>, the same whichever draw picked it
    label: str
    pixels: np.ndarray  # 28 x 28 uint8, light item on black


def draw(root: Path, counts: dict[str, int], seed: int, scope: str = NAME) -> tuple[dict[str, list[Item]], Counter]:
    """``counts[split]`` class-balanced items per split (in file order) from the seeded draw
    ``scope``, and the skip counts: held-out items whose pixels also occur in the train file are
    left out, so nothing held out can have been trained on."""
    skipped: Counter[str] = Counter()
    train_images, _ = load_split(root, "train")
    train_hashes = {hashlib.sha1(image.tobytes()).digest() for image in train_images}
    drawn: dict[str, list[Item]] = {}
    for split, n in counts.items():
        images, labels = load_split(root, split)
        groups: dict[str, list[int]] = {}
        for index, label in enumerate(labels.tolist()):
            groups.setdefault(f"{label:02d}", []).append(index)

        def unseen(index: int) -> bool:
            if split == "heldout" and hashlib.sha1(images[index].tobytes()).digest() in train_hashes:
                skipped["heldout_duplicate_of_train"] += 1
                return False
            return True

        chosen = balanced_take(shuffled_groups(groups, seeded_rng(seed, scope, split)), n, unseen)
        drawn[split] = [
            Item(f"{NAME}-{_FILES[split]}-{index:05d}", CLASS_NAMES[int(labels[index])], images[index]) for index in sorted(chosen)
        ]
    return drawn, skipped


def export(root: Path, out_dir: Path, n_train: int, n_heldout: int, image_size: int, seed: int) -> dict:
    """Write the PNGs and return ``{"records": {split: [...]}, "skipped": {...}}``."""
    drawn, skipped = draw(root, {"heldout": n_heldout, "train": n_train}, seed)
    records: dict[str, list[dict]] = {}
    for split, items in drawn.items():
        records[split] = []
        for item in items:
            index = item.id.rsplit("-", 1)[1]
            relative = save_png(gray_to_rgb(item.pixels, image_size), out_dir, f"images/{NAME}/{split}/{index}.png")
            records[split].append(llava_record(item.id, relative, QUESTION, item.label, task=TASK, label=item.label))
    return {"records": records, "skipped": dict(skipped)}


def task_info() -> dict:
    return {"question": QUESTION, "choices": list(CLASS_NAMES), "chance": 1 / len(CLASS_NAMES)}
