"""Scenes: 1-3 items pasted at random, non-overlapping places on a real photo, so the answer to
a question sits in one region of the image and which visual tokens are kept decides it.

Each scene is a random crop of a packaged photo (``photos.py``) resized to ``image_size`` (or a
plain flat colour, ``Style.background``), with exactly one Fashion-MNIST garment and 0-2 Open Clip
Art drawings (``Style.drawings``), each a square of side 1/4 to 1/2 of the image (the garment's
range is ``Style.garment_side``). The garment is pasted as the Fashion-MNIST corpus shows it (the grey item on
its own black square, upscaled): the pixels the projector was aligned on, with a square that
stands out from the photo and a box that is exactly where the answer is (an intensity mask would
let a bright photo swallow a light garment). Drawings are pasted on their white square.

Pools are disjoint by construction, reusing each source's own split: train scenes take
Fashion-MNIST train-file items, the clip-art corpus's train drawings and the train photos;
held-out scenes take t10k items (minus pixel duplicates of train items), its held-out drawings
and the held-out photos. Two records per scene: the garment question (task ``scenes_garment``)
and a caption naming every item and where it is (task ``scenes_caption``); both keep the items'
labels, source ids and boxes (pixels and fractions of the image); training picks either kind by
its ``task`` field (e.g. ``align_projector.py --task-weights scenes_caption=1``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from pipelines.corpora import fashion_mnist, openclipart, photos
from pipelines.corpora.common import gray_to_rgb, llava_record, save_png, seeded_rng

NAME = "scenes"
GARMENT_TASK = "scenes_garment"
CAPTION_TASK = "scenes_caption"
ID_SUFFIX = {GARMENT_TASK: "-garment", CAPTION_TASK: "-caption"}  # a record's id: the scene's stem + this
GARMENT_QUESTION = "What kind of clothing item is in the picture? Answer with one word or phrase."
CAPTION_QUESTION = "Describe the picture in one sentence, saying where each item is."
MAX_ITEMS = 3
DRAWING_SIDE = (0.25, 0.5)  # of the image side
BACKGROUNDS = ("photo", "plain")
CAPTIONS = ("places", "names")  # `caption` / `names_caption`
_ROWS = ("top", "middle", "bottom")
_COLUMNS = ("left", "centre", "right")

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive


@dataclass(frozen=True)
class Pool:
    """One split's ingredients."""

    garments: list[fashion_mnist.Item]
    clips: list[tuple[openclipart.Clip, Image.Image]]
    backgrounds: list[tuple[photos.Photo, Image.Image]]


def overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@dataclass(frozen=True)
class Style:
    """How a scene looks: the garment's side as a fraction of the image side (drawings keep
    1/4-1/2), and the background: a crop of a packaged ``photo`` or a ``plain`` flat colour; how
    many drawings stand beside the garment (drawn uniformly from ``drawings``, LOW and HIGH
    included: fixing it, e.g. ``(2, 2)``, makes every scene hold distractors); and what its caption
    says: every item with its ``places`` and the background, or only the items' ``names`` (the
    images do not change with it)."""

    garment_side: tuple[float, float] = (0.25, 0.5)
    background: str = "photo"
    caption: str = "places"
    drawings: tuple[int, int] = (0, MAX_ITEMS - 1)

    def __post_init__(self) -> None:
        low, high = self.garment_side
        if not 0.1 <= low <= high <= 0.67:
            raise ValueError(f"garment side must be fractions 0.1 <= low <= high <= 0.67 of the image (two drawings must still fit), got {self.garment_side}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown scene background {self.background!r}; choose from {', '.join(BACKGROUNDS)}")
        if self.caption not in CAPTIONS:
            raise ValueError(f"unknown scene caption {self.caption!r}; choose from {', '.join(CAPTIONS)}")
        low, high = self.drawings
        if not 0 <= low <= high <= MAX_ITEMS - 1:
            raise ValueError(f"drawings per scene must be whole numbers 0 <= low <= high <= {MAX_ITEMS - 1}, got {self.drawings}")


def side_range(fractions: tuple[float, float], size: int) -> tuple[int, int]:
    """Whole-pixel sides for a fraction range (the low end rounded up)."""
    return math.ceil(round(fractions[0] * size, 6)), int(fractions[1] * size)


def layout(rng: random.Random, sides: Sequence[tuple[int, int]], size: int, tries: int = 20000) -> list[Box]:
    """Non-overlapping squares inside ``size`` x ``size``, item i's side drawn from ``sides[i]``
    (pixels, inclusive), returned in item order; placed largest first by rejection sampling.
    Items after the first are capped at what fits beside it (a large garment leaves a strip of
    ``size - side``), so three items at these sizes always fit and it ends quickly."""
    for _ in range(tries):
        drawn = [rng.randint(low, high) for low, high in sides[:1]]
        drawn += [rng.randint(low, max(low, min(high, size - drawn[0]))) for low, high in sides[1:]]
        boxes: dict[int, Box] = {}
        for i in sorted(range(len(drawn)), key=lambda i: -drawn[i]):
            side = drawn[i]
            x, y = rng.randint(0, size - side), rng.randint(0, size - side)
            box = (x, y, x + side, y + side)
            if any(overlaps(box, other) for other in boxes.values()):
                break
            boxes[i] = box
        else:
            return [boxes[i] for i in range(len(drawn))]
    raise RuntimeError(f"could not place {len(sides)} items of sides {list(sides)} in {tries} tries")


def background(rng: random.Random, photo: Image.Image, size: int) -> tuple[Image.Image, Box]:
    """A random square crop (half to all of the short side) resized to ``size``, and the crop box."""
    side = int(min(photo.size) * rng.uniform(0.5, 1.0))
    x, y = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
    crop = (x, y, x + side, y + side)
    return photo.crop(crop).resize((size, size), Image.Resampling.LANCZOS), crop


def cell(box: Box, size: int) -> tuple[int, int]:
    """(row, column) of the box centre in a 3 x 3 grid over the image."""
    return min(2, 3 * (box[1] + box[3]) // (2 * size)), min(2, 3 * (box[0] + box[2]) // (2 * size))


def where(box: Box, size: int) -> str:
    """The box's grid cell as words ("at the top left", "on the right", "in the centre")."""
    row, column = (names[i] for names, i in zip((_ROWS, _COLUMNS), cell(box, size)))
    if row == "middle":
        return "in the centre" if column == "centre" else f"on the {column}"
    return f"at the {row}" if column == "centre" else f"at the {row} {column}"


def item_phrase(item: dict) -> str:
    """"a sandal", "a pair of trousers", "a drawing from the animals category"."""
    label = item["label"]
    if item["kind"] == "clipart":
        return f"a drawing from the {label} category"
    return "a pair of trousers" if label == "trousers" else f"{'an' if label[0] in 'aeiou' else 'a'} {label}"


def reading_order(items: list[dict], size: int) -> list[dict]:
    """Top row of the 3 x 3 grid first, left to right within a row."""
    return sorted(items, key=lambda item: (cell(tuple(item["box"]), size)[0], item["box"][0] + item["box"][2]))


def listing(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def caption(items: list[dict], subject: str | None, size: int) -> str:
    """Every item in reading order with its place, then the photo: "A sandal at the top left and
    a drawing from the animals category on the right, on a photo of a cup of coffee."."""
    listed = listing([f"{item_phrase(item)} {where(tuple(item['box']), size)}" for item in reading_order(items, size)])
    text = f"{listed}, on a photo of {subject}." if subject else f"{listed}, on a plain background."
    return text[0].upper() + text[1:]


def names_caption(items: list[dict], size: int) -> str:
    """`caption` without the places and the background: "A sandal and a drawing from the animals
    category." (every token but the glue names an item)."""
    text = listing([item_phrase(item) for item in reading_order(items, size)]) + "."
    return text[0].upper() + text[1:]


def item_entry(kind: str, label: str, source: str, box: Box, size: int) -> dict:
    return {"kind": kind, "label": label, "source": source, "box": list(box), "box_fraction": [v / size for v in box]}


def compose(
    rng: random.Random, garment: fashion_mnist.Item, pool: Pool, size: int, style: Style = Style()
) -> tuple[Image.Image, list[dict], photos.Photo | None, Box | list[int]]:
    """One scene around ``garment``: a background, the garment and ``style.drawings`` drawings from ``pool``;
    the image, its items (the garment first), the photo (None on a plain background) and the
    crop box (the flat colour on a plain background)."""
    if style.background == "photo":
        photo, photo_image = pool.backgrounds[rng.randrange(len(pool.backgrounds))]
        image, crop = background(rng, photo_image, size)
    else:
        photo, crop = None, [rng.randint(40, 215) for _ in range(3)]
        image = Image.new("RGB", (size, size), tuple(crop))
    clips = rng.sample(pool.clips, min(rng.randint(*style.drawings), len(pool.clips)))
    boxes = layout(rng, [side_range(style.garment_side, size)] + [side_range(DRAWING_SIDE, size)] * len(clips), size)
    image.paste(gray_to_rgb(garment.pixels, boxes[0][2] - boxes[0][0]), boxes[0][:2])
    items = [item_entry("garment", garment.label, garment.id, boxes[0], size)]
    for (clip, drawing), box in zip(clips, boxes[1:]):
        side = box[2] - box[0]
        image.paste(drawing.resize((side, side), Image.Resampling.LANCZOS), box[:2])
        items.append(item_entry("clipart", openclipart.display_name(clip.category), f"{openclipart.NAME}-{clip.path}", box, size))
    return image, items, photo, crop


def pools(
    fmnist_root: Path, clips: openclipart.Draw, backgrounds: dict[str, list[photos.Photo]], counts: dict[str, int], seed: int
) -> tuple[dict[str, Pool], dict]:
    """Each split's pool from the sources' own splits, ``counts[split]`` garments (one per scene)
    from a seeded draw of its own, and the skip counts."""
    garments, skipped = fashion_mnist.draw(fmnist_root, counts, seed, scope=f"{NAME}_garments")
    out = {}
    for split in counts:
        if counts[split] and not backgrounds[split]:
            raise ValueError(f"scenes need {split} background photos, found none (install scikit-image or change --photos-heldout)")
        out[split] = Pool(garments[split], clips.splits[split], [(p, photos.load_rgb(p)) for p in backgrounds[split]])
    return out, dict(skipped)


def export(out_dir: Path, pool_by_split: dict[str, Pool], image_size: int, seed: int, style: Style = Style()) -> dict[str, list[dict]]:
    """Write one PNG per garment of each split's pool; a garment and a caption record per scene."""
    records: dict[str, list[dict]] = {}
    for split, pool in pool_by_split.items():
        rng = seeded_rng(seed, NAME, split)
        garments = list(pool.garments)
        rng.shuffle(garments)
        records[split] = []
        for index, garment in enumerate(garments):
            image, items, photo, crop = compose(rng, garment, pool, image_size, style)
            fields = {"items": items, "background": {"photo": photo.name, "crop": list(crop)} if photo else {"plain": crop}}
            relative = save_png(image, out_dir, f"images/{NAME}/{split}/{index:05d}.png")
            stem = f"{NAME}-{split}-{index:05d}"
            boxes = [items[0]["box_fraction"]]  # where the answer is, for an oracle
            text = caption(items, photo.subject if photo else None, image_size) if style.caption == "places" else names_caption(items, image_size)
            records[split] += [
                llava_record(stem + ID_SUFFIX[GARMENT_TASK], relative, GARMENT_QUESTION, garment.label, task=GARMENT_TASK, label=garment.label, boxes=boxes, **fields),
                llava_record(stem + ID_SUFFIX[CAPTION_TASK], relative, CAPTION_QUESTION, text, task=CAPTION_TASK, label=text, **fields),
            ]
    return records


def garment_question_id(record: dict) -> str:
    """The id of the garment question about the same scene as ``record`` (any of its records)."""
    return record["id"].removesuffix(ID_SUFFIX[record["task"]]) + ID_SUFFIX[GARMENT_TASK]


def task_info() -> dict[str, dict]:
    return {GARMENT_TASK: {**fashion_mnist.task_info(), "question": GARMENT_QUESTION}, CAPTION_TASK: {"question": CAPTION_QUESTION}}
