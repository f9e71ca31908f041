"""Export every packaged source into one folder of LLaVA JSONL files + PNGs, once per settings.

Layout of the output folder (image paths in the JSONL files are relative to it, which is what
``pipelines.preprocess`` assumes when no ``--image-root`` is given):

    fashion_mnist.{train,heldout}.jsonl   10-way clothing questions           (task fmnist_class)
    openclipart.{train,heldout}.jsonl     multiple-choice clip-art categories (task clipart_category)
    captions.{train,heldout}.jsonl        clip-art titles + photo captions    (clipart_title, photo_caption)
    scenes.{train,heldout}.jsonl          items on photos: garment question + caption per scene
                                                                              (scenes_garment, scenes_caption)
    images/<source>/...png
    manifest.json                         counts, skipped files, tasks (choices, chance), settings
    build_manifest.json                   the cache key (settings, exporter code, source versions)

A folder whose ``build_manifest.json`` shows the same settings, code and sources is reused.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from minillava.assets import distribution_version, file_sha256
from minillava.cache import Built, cached_build
from pipelines.corpora import common, fashion_mnist, openclipart, photos, scenes
from pipelines.corpora.common import write_jsonl

DEFAULT_OUT = Path(".cache/corpora")
MANIFEST = "manifest.json"
SPLITS = ("train", "heldout")
SOURCES = ("fashion_mnist", "openclipart", "photos", "scenes")
FILES = ("fashion_mnist", "openclipart", "captions", "scenes")


@dataclass(frozen=True)
class ExportSettings:
    seed: int = 0
    image_size: int = 224
    fmnist_train: int = 2000
    fmnist_heldout: int = 500
    clipart_train: int = 1500
    clipart_heldout: int = 260  # 20 per category with the 13 default categories
    clipart_min_per_category: int = 50
    clipart_categories: tuple[str, ...] | None = None  # None: every non-catch-all category with enough drawings
    photos_heldout: int = 6
    scenes_train: int = 2000
    scenes_heldout: int = 1200  # halved into val / test by id: >= 300 test scenes per task
    scenes_garment_side: tuple[float, float] = scenes.Style.garment_side  # of the image side
    scenes_background: str = scenes.Style.background  # "photo" or "plain"
    scenes_caption: str = scenes.Style.caption  # "places" or "names"
    scenes_drawings: tuple[int, int] = scenes.Style.drawings  # drawings per scene, LOW-HIGH
    sources: tuple[str, ...] = SOURCES
    fmnist_dir: str = str(fashion_mnist.DEFAULT_DIR)
    clipart_dir: str = str(openclipart.DEFAULT_ROOT)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.sources) - set(SOURCES))
        if unknown:
            raise ValueError(f"unknown source(s) {unknown}; choose from {', '.join(SOURCES)}")
        for name in ("image_size", "fmnist_train", "fmnist_heldout", "clipart_train", "clipart_heldout", "photos_heldout", "scenes_train", "scenes_heldout"):
            if getattr(self, name) < 0 or (name == "image_size" and self.image_size < 14):
                raise ValueError(f"{name} must be a non-negative size (image_size >= 14), got {getattr(self, name)}")
        self.scene_style()  # refuses a bad garment side, background, caption or drawing count by name

    def scene_style(self) -> scenes.Style:
        return scenes.Style(tuple(self.scenes_garment_side), self.scenes_background, self.scenes_caption, tuple(self.scenes_drawings))

    def key(self) -> dict[str, Any]:
        return asdict(self)


def _dpkg_version(package: str) -> str | None:
    try:
        result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=False)
    except OSError:
        return None
    return result.stdout.strip() or None


def _uses(settings: ExportSettings, source: str) -> bool:
    """Whether the export reads ``source``: exported itself, or pasted into the scenes."""
    return source in settings.sources or "scenes" in settings.sources


def cache_inputs(settings: ExportSettings) -> dict[str, Any]:
    """Settings + the exporters' code + the versions of everything that decides the output bytes."""
    code = {module.__name__: file_sha256(module.__file__) for module in (common, fashion_mnist, openclipart, photos, scenes)}
    code[__name__] = file_sha256(__file__)
    versions: dict[str, Any] = {"Pillow": Image.__version__, "numpy": distribution_version("numpy")}
    if _uses(settings, "fashion_mnist"):
        versions[fashion_mnist.DEBIAN_PACKAGE] = _dpkg_version(fashion_mnist.DEBIAN_PACKAGE)
        versions["fashion_mnist_files"] = {
            p.name: file_sha256(p) for p in fashion_mnist.source_files(Path(settings.fmnist_dir)) if p.exists()
        }
    if _uses(settings, "openclipart"):
        versions.update({p: _dpkg_version(p) for p in (openclipart.PNG_PACKAGE, openclipart.SVG_PACKAGE)})
    if _uses(settings, "photos"):
        versions.update(photos.library_versions())
    return {"settings": settings.key(), "code_sha256": code, "versions": versions}


def _build(settings: ExportSettings, out_dir: Path) -> None:
    files: dict[str, dict[str, list[dict]]] = {name: {split: [] for split in SPLITS} for name in FILES}
    skipped: dict[str, dict] = {}
    tasks: dict[str, dict] = {}
    if "fashion_mnist" in settings.sources:
        result = fashion_mnist.export(
            Path(settings.fmnist_dir), out_dir, settings.fmnist_train, settings.fmnist_heldout, settings.image_size, settings.seed
        )
        files["fashion_mnist"] = result["records"]
        skipped["fashion_mnist"] = result["skipped"]
        tasks[fashion_mnist.TASK] = fashion_mnist.task_info()
    clips = None
    if _uses(settings, "openclipart"):  # one draw: the scenes paste the clip-art corpus's own split
        clips = openclipart.draw(
            Path(settings.clipart_dir), settings.clipart_train, settings.clipart_heldout, settings.image_size,
            settings.seed, settings.clipart_min_per_category, settings.clipart_categories,
        )
        skipped["openclipart"] = dict(sorted(clips.skipped.items()))
    if "openclipart" in settings.sources:
        result = openclipart.export(Path(settings.clipart_dir), out_dir, clips)
        files["openclipart"] = result["records"]
        for split in SPLITS:
            files["captions"][split] += result["captions"][split]
        skipped["openclipart"] = result["skipped"]
        tasks[openclipart.CATEGORY_TASK] = result["task"]
        tasks[openclipart.TITLE_TASK] = {"question": openclipart.TITLE_QUESTION}
    if "photos" in settings.sources:
        result = photos.export(out_dir, settings.photos_heldout, settings.image_size, settings.seed)
        for split in SPLITS:
            files["captions"][split] += result["records"][split]
        skipped["photos"] = result["skipped"]
        tasks[photos.TASK] = {"question": photos.QUESTION}
    if "scenes" in settings.sources:
        backgrounds, _ = photos.split(settings.photos_heldout, settings.seed)
        counts = {"heldout": settings.scenes_heldout, "train": settings.scenes_train}
        pools, skipped["scenes"] = scenes.pools(Path(settings.fmnist_dir), clips, backgrounds, counts, settings.seed)
        files["scenes"] = scenes.export(out_dir, pools, settings.image_size, settings.seed, settings.scene_style())
        tasks.update(scenes.task_info())

    counts = {
        f"{name}.{split}.jsonl": write_jsonl(out_dir / f"{name}.{split}.jsonl", records)
        for name, by_split in files.items()
        for split, records in by_split.items()
    }
    manifest = {"settings": settings.key(), "files": counts, "tasks": tasks, "skipped": skipped}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def export_corpora(out_dir: str | Path = DEFAULT_OUT, settings: ExportSettings = ExportSettings(), force: bool = False) -> Built:
    """Export into ``out_dir`` unless it already holds an export from the same inputs."""
    return cached_build(out_dir, cache_inputs(settings), lambda staging: _build(settings, staging), force)


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(out_dir) / MANIFEST).read_text())


def load_records(out_dir: str | Path, name: str, split: str) -> list[dict]:
    """The records of ``<name>.<split>.jsonl`` (``name`` in :data:`FILES`)."""
    if name not in FILES or split not in SPLITS:
        raise ValueError(f"no {name}.{split}.jsonl: names are {FILES}, splits {SPLITS}")
    path = Path(out_dir) / f"{name}.{split}.jsonl"
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def record_messages(record: dict) -> list[dict]:
    """HF chat messages for a record, through the same reader ``pipelines.preprocess`` uses."""
    from pipelines.preprocessing.corpus import conversation_turns
    from pipelines.preprocessing.samples import chat_messages

    return chat_messages(conversation_turns(record["conversations"]))


def open_image(out_dir: str | Path, record: dict) -> Image.Image:
    with Image.open(Path(out_dir) / record["image"]) as image:
        return image.convert("RGB")
