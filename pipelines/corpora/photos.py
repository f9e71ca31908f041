"""A handful of real photos that ship inside Python packages, with hand-written captions.

scikit-image's sample images are used when scikit-image is installed (it is optional: the
skipped count says how many were left out); scikit-learn's and matplotlib's always are.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from pipelines.corpora.common import llava_record, on_white, save_png, seeded_rng

NAME = "photos"
TASK = "photo_caption"
QUESTION = "Describe the image in one sentence."


@dataclass(frozen=True)
class Photo:
    name: str
    library: str  # the distribution that must be importable
    load: Callable[[], Image.Image]
    caption: str
    subject: str  # a short noun phrase: "a photo of <subject>" in scene captions


def _skimage(name: str, index: int | None = None) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        array = getattr(importlib.import_module("skimage.data"), name)()
        array = array[index] if index is not None else array
        if array.dtype == bool:
            array = np.where(array, 0, 255).astype(np.uint8)  # skimage's horse: True is the silhouette
        return Image.fromarray(array)

    return load


def _sklearn(filename: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(filename))

    return load


def _matplotlib(filename: str) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        from matplotlib.cbook import get_sample_data

        with get_sample_data(filename) as handle:
            return Image.open(handle).copy()

    return load


PHOTOS: tuple[Photo, ...] = (
    Photo("astronaut", "skimage", _skimage("astronaut"), "A smiling astronaut in an orange spacesuit, with a flag and a model space shuttle behind her.", "an astronaut"),
    Photo("brick", "skimage", _skimage("brick"), "A black-and-white close-up of a brick wall.", "a brick wall"),
    Photo("camera", "skimage", _skimage("camera"), "A black-and-white photo of a man looking through a camera on a tripod.", "a cameraman"),
    Photo("cell", "skimage", _skimage("cell"), "A blurry grey microscope image of a single round cell.", "a cell"),
    Photo("checkerboard", "skimage", _skimage("checkerboard"), "A black-and-white checkerboard pattern.", "a checkerboard"),
    Photo("chelsea", "skimage", _skimage("chelsea"), "A close-up of a tabby cat's face.", "a cat"),
    Photo("clock", "skimage", _skimage("clock"), "A motion-blurred grey photo of a round wall clock.", "a wall clock"),
    Photo("coffee", "skimage", _skimage("coffee"), "A cup of coffee on a red saucer with a spoon, on a wooden table.", "a cup of coffee"),
    Photo("coins", "skimage", _skimage("coins"), "Rows of old coins on a dark background.", "old coins"),
    Photo("colorwheel", "skimage", _skimage("colorwheel"), "A colour wheel showing every hue on a black background.", "a colour wheel"),
    Photo("grass", "skimage", _skimage("grass"), "A grey close-up of grass.", "grass"),
    Photo("gravel", "skimage", _skimage("gravel"), "A grey close-up of gravel.", "gravel"),
    Photo("horse", "skimage", _skimage("horse"), "A black silhouette of a horse on a white background.", "a horse silhouette"),
    Photo("hubble_deep_field", "skimage", _skimage("hubble_deep_field"), "A deep-space photo full of small, distant galaxies.", "distant galaxies"),
    Photo("immunohistochemistry", "skimage", _skimage("immunohistochemistry"), "A microscope image of tissue stained brown and blue.", "stained tissue"),
    Photo("logo", "skimage", _skimage("logo"), "A round green and orange logo with a snake drawn on it.", "a logo"),
    Photo("microaneurysms", "skimage", _skimage("microaneurysms"), "A grey close-up of blood vessels at the back of an eye.", "blood vessels"),
    Photo("moon", "skimage", _skimage("moon"), "A grey photo of the cratered surface of the moon.", "the moon's surface"),
    Photo("motorcycle", "skimage", _skimage("stereo_motorcycle", 0), "A red motorcycle parked in a garage.", "a motorcycle"),
    Photo("page", "skimage", _skimage("page"), "A scanned page of printed text about image segmentation.", "a printed page"),
    Photo("retina", "skimage", _skimage("retina"), "A photo of the retina at the back of a human eye, with its blood vessels.", "a retina"),
    Photo("rocket", "skimage", _skimage("rocket"), "A rocket on a launch pad at night.", "a rocket"),
    Photo("text", "skimage", _skimage("text"), "Handwritten maths formulas on a sheet of paper.", "handwritten formulas"),
    Photo("china", "sklearn", _sklearn("china.jpg"), "A tall Chinese pagoda among trees, with a lake behind it.", "a pagoda"),
    Photo("flower", "sklearn", _sklearn("flower.jpg"), "An orange dahlia in front of dark green leaves.", "a flower"),
    Photo("grace_hopper", "matplotlib", _matplotlib("grace_hopper.jpg"), "A portrait of a woman in a navy officer's uniform.", "a woman in uniform"),
)


def library_versions() -> dict[str, str | None]:
    """What decides which photos exist and their pixels (part of the export's cache key)."""
    from minillava.assets import distribution_version

    return {lib: distribution_version(dist) for lib, dist in (("skimage", "scikit-image"), ("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"))}


def split(n_heldout: int, seed: int) -> tuple[dict[str, list[Photo]], Counter]:
    """The installed photos per split (held-out: a seeded draw of ``n_heldout``), in list order,
    and how many were skipped because their library is not installed."""
    skipped: Counter[str] = Counter()
    available = []
    for photo in PHOTOS:
        if importlib.util.find_spec(photo.library) is None:
            skipped[f"{photo.library}_not_installed"] += 1
        else:
            available.append(photo)
    order = list(available)
    seeded_rng(seed, NAME).shuffle(order)
    heldout = {p.name for p in order[:n_heldout]}
    return {s: [p for p in available if (p.name in heldout) == (s == "heldout")] for s in ("heldout", "train")}, skipped


def load_rgb(photo: Photo) -> Image.Image:
    return on_white(photo.load())


def export(out_dir: Path, n_heldout: int, image_size: int, seed: int) -> dict:
    """Caption records per split; held-out photos are a seeded draw of ``n_heldout``."""
    splits, skipped = split(n_heldout, seed)
    records: dict[str, list[dict]] = {}
    for split_name, chosen in splits.items():
        records[split_name] = []
        for photo in chosen:
            image = load_rgb(photo)
            image.thumbnail((2 * image_size, 2 * image_size), Image.Resampling.LANCZOS)  # the processor resizes again
            relative = save_png(image, out_dir, f"images/{NAME}/{photo.name}.png")
            records[split_name].append(
                llava_record(f"{NAME}-{photo.name}", relative, QUESTION, photo.caption, task=TASK, label=photo.caption, library=photo.library)
            )
    return {"records": records, "skipped": dict(skipped)}
