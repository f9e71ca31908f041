"""Open Clip Art Library (Debian ``openclipart-png`` + ``openclipart-svg``) as category questions
and title captions.

PNGs live under ``png/<category>/<subfolders>/``; each has an SVG twin at the same path whose
metadata carries ``dc:title`` and ``dc:subject`` keywords. The same drawing appears under several
paths (symlinks and copies), so images are de-duplicated by content: a drawing filed under more
than one top-level category has no single answer and is skipped, and one drawing can never be in
both splits. Empty files are counted over the whole tree; undecodable or oversized files are
counted when a split draw reaches them.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipelines.corpora.common import (
    balanced_take,
    llava_record,
    require_files,
    save_png,
    seeded_rng,
    shuffled_groups,
    square_on_white,
)

PNG_PACKAGE = "openclipart-png"
SVG_PACKAGE = "openclipart-svg"
DEFAULT_ROOT = Path("/usr/share/openclipart")
NAME = "openclipart"
CATEGORY_TASK = "clipart_category"
TITLE_TASK = "clipart_title"
# Catch-all folders: their name says nothing about the drawing.
EXCLUDED_CATEGORIES = ("special", "unsorted")
MAX_PIXELS = 50_000_000  # a few posters are ~170 MP; decoding one costs seconds and ~700 MB
TITLE_QUESTION = "Give this clip art a short title."
_DC = "{http://purl.org/dc/elements/1.1/}"
_CREDIT_PREFIX = re.compile(r"^clip\s*art by [^-]+ - ", re.IGNORECASE)  # "Clipart by Nicu Buculei - pear"
_RDF_LI = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}li"


@dataclass(frozen=True)
class Clip:
    path: str  # relative to png/, the first of its copies in sorted order
    category: str


@dataclass
class Scan:
    groups: dict[str, list[Clip]]  # category -> unique drawings filed only there
    skipped: Counter


def display_name(category: str) -> str:
    return category.replace("_", " ")


def category_question(categories: list[str]) -> str:
    options = ", ".join(display_name(c) for c in categories)
    return f"Which category does this clip art belong to? Options: {options}. Answer with the category name."


def scan(root: Path = DEFAULT_ROOT) -> Scan:
    """Every PNG (following symlinks), grouped by content hash, with the empty ones counted."""
    png_root = Path(root) / "png"
    require_files("Open Clip Art PNGs", PNG_PACKAGE, [png_root])
    require_files("Open Clip Art SVGs", SVG_PACKAGE, [Path(root) / "svg"])
    skipped: Counter[str] = Counter()
    copies: dict[str, list[str]] = {}
    for directory, subdirs, files in os.walk(png_root, followlinks=True):
        subdirs.sort()
        for name in sorted(files):
            if not name.lower().endswith(".png"):
                continue
            path = Path(directory) / name
            try:
                data = path.read_bytes()
            except OSError:  # a dangling symlink
                skipped["unreadable"] += 1
                continue
            if not data:
                skipped["empty"] += 1
                continue
            copies.setdefault(hashlib.sha256(data).hexdigest(), []).append(path.relative_to(png_root).as_posix())
    groups: dict[str, list[Clip]] = {}
    for paths in copies.values():
        categories = {p.split("/", 1)[0] for p in paths}
        skipped["duplicate_copies"] += len(paths) - 1
        if len(categories) > 1:
            skipped["ambiguous_category"] += 1
            continue
        category = categories.pop()
        groups.setdefault(category, []).append(Clip(min(paths), category))
    for clips in groups.values():
        clips.sort(key=lambda clip: clip.path)
    return Scan(groups, skipped)


def choose_categories(groups: dict[str, list[Clip]], min_per_category: int, wanted: tuple[str, ...] | None = None) -> list[str]:
    """``wanted`` as given (each must exist), else every non-catch-all category with enough drawings."""
    if wanted:
        unknown = sorted(set(wanted) - set(groups))
        if unknown:
            raise ValueError(f"unknown clip-art categories {unknown}; available: {sorted(groups)}")
        return sorted(wanted)
    return sorted(c for c, clips in groups.items() if c not in EXCLUDED_CATEGORIES and len(clips) >= min_per_category)


def load_image(path: Path) -> Image.Image:
    """Fully decoded; raises ``ValueError`` for oversized and ``OSError``-likes for broken files."""
    with warnings.catch_warnings():  # our own pixel limit applies, below PIL's error threshold
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as exc:  # PIL refuses > 2x its limit before we can look
            raise ValueError(str(exc)) from None
    with image:
        if image.width * image.height > MAX_PIXELS:
            raise ValueError(f"{image.width}x{image.height} is over {MAX_PIXELS} pixels")
        image.load()
        return image.copy()


def svg_metadata(svg_path: Path) -> tuple[str | None, list[str]]:
    """``(dc:title, dc:subject keywords)`` from an SVG's RDF metadata; ``(None, [])`` if unreadable."""
    title, keywords = None, []
    try:
        for _, element in ET.iterparse(svg_path, events=("end",)):
            if element.tag == f"{_DC}title" and title is None:
                title = _CREDIT_PREFIX.sub("", " ".join("".join(element.itertext()).split())) or None
            elif element.tag == f"{_DC}subject":
                keywords = [" ".join((li.text or "").split()) for li in element.iter(_RDF_LI) if (li.text or "").strip()]
            elif element.tag.endswith("}metadata") and title is not None:
                break
    except (ET.ParseError, OSError, UnicodeDecodeError):
        return None, []
    return title, keywords


@dataclass
class Draw:
    """The seeded split of the drawings, decoded: the clip-art corpus writes it and the scenes
    paste it, so both use the same held-out drawings."""

    splits: dict[str, list[tuple[Clip, Image.Image]]]  # split -> (drawing, square on white at image_size)
    categories: list[str]
    available: dict[str, int]  # unique drawings per category, all of them
    skipped: Counter


def draw(
    root: Path,
    n_train: int,
    n_heldout: int,
    image_size: int,
    seed: int,
    min_per_category: int,
    categories: tuple[str, ...] | None = None,
) -> Draw:
    """Category-balanced drawings per split, held-out drawn first (fixed whatever ``n_train`` is)."""
    found = scan(root)
    skipped = found.skipped
    chosen_categories = choose_categories(found.groups, min_per_category, categories)
    if not chosen_categories:
        raise ValueError(f"no clip-art category has {min_per_category} or more usable drawings under {root}")
    queues = shuffled_groups({c: found.groups[c] for c in chosen_categories}, seeded_rng(seed, NAME))
    loaded: dict[str, Image.Image] = {}  # already shrunk: a draw may decode hundreds of drawings

    def decodable(clip: Clip) -> bool:
        try:
            loaded[clip.path] = square_on_white(load_image(Path(root) / "png" / clip.path), image_size)
            return True
        except ValueError:
            skipped["oversized"] += 1
        except Exception:  # PIL raises OSError, SyntaxError, DecompressionBombError, ...
            skipped["corrupt"] += 1
        return False

    splits = {
        split: [(clip, loaded.pop(clip.path)) for clip in sorted(balanced_take(queues, n, decodable), key=lambda c: c.path)]
        for split, n in (("heldout", n_heldout), ("train", n_train))
    }
    available = {c: len(found.groups[c]) for c in sorted(found.groups)}
    return Draw(splits, chosen_categories, available, skipped)


def export(root: Path, out_dir: Path, drawn: Draw) -> dict:
    """Category records per split, title-caption records for the same images, and skip counts."""
    skipped = Counter(drawn.skipped)
    question = category_question(drawn.categories)
    categories_out: dict[str, list[dict]] = {}
    titles_out: dict[str, list[dict]] = {}
    for split, clips in drawn.splits.items():
        categories_out[split], titles_out[split] = [], []
        for clip, image in clips:
            relative = save_png(image, out_dir, f"images/{NAME}/{clip.path}")
            stem = f"{NAME}-{clip.path[: -len('.png')]}"
            answer = display_name(clip.category)
            categories_out[split].append(
                llava_record(f"{stem}-category", relative, question, answer, task=CATEGORY_TASK, label=answer)
            )
            title, keywords = svg_metadata((Path(root) / "svg" / clip.path).with_suffix(".svg"))
            if title:
                titles_out[split].append(
                    llava_record(f"{stem}-title", relative, TITLE_QUESTION, title, task=TITLE_TASK, label=title, keywords=keywords)
                )
            else:
                skipped["no_title"] += 1
    return {
        "records": categories_out,
        "captions": titles_out,
        "skipped": dict(sorted(skipped.items())),
        "task": {
            "question": question,
            "choices": [display_name(c) for c in drawn.categories],
            "chance": 1 / len(drawn.categories),
            "unique_drawings_per_category": drawn.available,
        },
    }
