"""Export real packaged image-text data as LLaVA-style JSONL + PNG folders with fixed train /
held-out splits (held-out images are never in a train file).

    python pipelines/packaged_corpora.py                      # defaults into .cache/corpora
    python pipelines/packaged_corpora.py --fmnist-train 20 --fmnist-heldout 20 --out /tmp/small

Sources and the Debian packages they need (install once):

    apt-get update && apt-get install -y dataset-fashion-mnist openclipart-png openclipart-svg

* Fashion-MNIST: 28x28 grey -> 224 px RGB, "What kind of clothing item is shown?" (10 classes).
* Open Clip Art: drawings on white, padded square; multiple-choice top-level category
  questions, and the SVG twin's dc:title as a caption. Empty, broken, oversized, duplicated and
  multi-category files are skipped and counted in manifest.json.
* Photos from scikit-image (if installed), scikit-learn and matplotlib, with written captions.
* Scenes: one Fashion-MNIST garment and 0-2 clip-art drawings at random places on a photo crop;
  "What kind of clothing item is in the picture?" plus a caption naming every item and where.

Nothing is redone when OUT already holds an export with the same settings, exporter code and
source versions (build_manifest.json); --force redoes it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, TypeVar

from pipelines.corpora import DEFAULT_OUT, ExportSettings, MissingPackageError, export_corpora, read_manifest
from pipelines.corpora.export import SOURCES


def build_parser() -> argparse.ArgumentParser:
    d = ExportSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    add("--seed", type=int, default=d.seed, help="split seed (default: %(default)s)")
    add("--image-size", type=int, default=d.image_size, help="side of the exported Fashion-MNIST / clip-art PNGs (default: %(default)s)")
    add("--fmnist-train", type=int, default=d.fmnist_train, help="Fashion-MNIST train images, class-balanced (default: %(default)s)")
    add("--fmnist-heldout", type=int, default=d.fmnist_heldout, help="Fashion-MNIST held-out images from the test file (default: %(default)s)")
    add("--clipart-train", type=int, default=d.clipart_train, help="clip-art train drawings, round-robin over categories (default: %(default)s)")
    add("--clipart-heldout", type=int, default=d.clipart_heldout, help="clip-art held-out drawings, balanced over categories (default: %(default)s)")
    add("--clipart-min-per-category", type=int, default=d.clipart_min_per_category,
        help="a category is used when it has this many usable drawings (default: %(default)s)")
    add("--clipart-categories", default=None, help="comma-separated categories to use instead (e.g. animals,food)")
    add("--photos-heldout", type=int, default=d.photos_heldout, help="photos kept for held-out captions (default: %(default)s)")
    add("--scenes-train", type=int, default=d.scenes_train, help="train scenes (default: %(default)s)")
    add("--scenes-heldout", type=int, default=d.scenes_heldout, help="held-out scenes, on held-out items and photos (default: %(default)s)")
    add("--scenes-garment-side", default=",".join(map(str, d.scenes_garment_side)),
        help="the garment's side in scenes, LOW,HIGH fractions of the image side (default: %(default)s)")
    add("--scenes-background", choices=("photo", "plain"), default=d.scenes_background,
        help="scene backgrounds: crops of packaged photos or plain flat colours (default: %(default)s)")
    add("--scenes-caption", choices=("places", "names"), default=d.scenes_caption,
        help="scene captions: every item with its place and the background, or only the items' names (default: %(default)s)")
    add("--scenes-drawings", default=",".join(map(str, d.scenes_drawings)),
        help="drawings beside the garment in each scene, LOW,HIGH (or one number) (default: %(default)s)")
    add("--sources", default=",".join(d.sources), help=f"comma-separated subset of {','.join(SOURCES)} (default: all)")
    add("--fmnist-dir", default=d.fmnist_dir, help="Fashion-MNIST idx files (default: %(default)s)")
    add("--clipart-dir", default=d.clipart_dir, help="folder holding png/ and svg/ (default: %(default)s)")
    add("--force", action="store_true", help="export again even if OUT matches these settings")
    return parser


T = TypeVar("T")


def low_high(text: str, convert: Callable[[str], T], flag: str, wants: str, one_means_both: bool = False) -> tuple[T, T]:
    """A LOW,HIGH flag value (or, with ``one_means_both``, one number for both), refused by name."""
    parts = text.split(",")
    try:
        low, high = (convert(p) for p in (parts * 2 if one_means_both and len(parts) == 1 else parts))
    except ValueError:
        raise SystemExit(f"{flag} wants LOW,HIGH {wants}, got {text!r}") from None
    return low, high


def settings_from_args(args: argparse.Namespace) -> ExportSettings:
    categories = tuple(c.strip() for c in args.clipart_categories.split(",") if c.strip()) if args.clipart_categories else None
    return ExportSettings(
        seed=args.seed,
        image_size=args.image_size,
        fmnist_train=args.fmnist_train,
        fmnist_heldout=args.fmnist_heldout,
        clipart_train=args.clipart_train,
        clipart_heldout=args.clipart_heldout,
        clipart_min_per_category=args.clipart_min_per_category,
        clipart_categories=categories,
        photos_heldout=args.photos_heldout,
        scenes_train=args.scenes_train,
        scenes_heldout=args.scenes_heldout,
        scenes_garment_side=low_high(args.scenes_garment_side, float, "--scenes-garment-side", "fractions such as 0.25,0.5"),
        scenes_background=args.scenes_background,
        scenes_caption=args.scenes_caption,
        scenes_drawings=low_high(args.scenes_drawings, int, "--scenes-drawings", "whole numbers such as 0,2 (or one number)", one_means_both=True),
        sources=tuple(s.strip() for s in args.sources.split(",") if s.strip()),
        fmnist_dir=args.fmnist_dir,
        clipart_dir=args.clipart_dir,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
        built = export_corpora(args.out, settings, force=args.force)
    except MissingPackageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        parser.error(str(exc))
    manifest = read_manifest(built.path)
    print(f"{'exported' if built.rebuilt else 'reused'} {built.path.resolve()}")
    print(json.dumps({"files": manifest["files"], "skipped": manifest["skipped"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
