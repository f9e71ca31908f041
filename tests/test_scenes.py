"""Scenes (items pasted on packaged photos): layout, disjoint train / held-out pools, records,
the CLI export and the ``scenes_garment`` evaluation task. Skipped, saying why, where the Debian
packages are not installed (`make data`)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.corpora import ExportSettings, fashion_mnist, load_records, openclipart, photos, read_manifest, scenes
from pipelines.corpora.common import gray_to_rgb

missing = [p for p in (fashion_mnist.DEFAULT_DIR, openclipart.DEFAULT_ROOT / "svg") if not Path(p).is_dir()]
pytestmark = pytest.mark.skipif(
    bool(missing), reason=f"Debian data packages not installed ({', '.join(map(str, missing))}); run `make data` as root"
)

SMALL = ExportSettings(sources=("scenes",), clipart_train=26, clipart_heldout=13, scenes_train=24, scenes_heldout=60)
COUNTS = {"heldout": SMALL.scenes_heldout, "train": SMALL.scenes_train}
SIZE = SMALL.image_size


@pytest.fixture(scope="module")
def pools():
    clips = openclipart.draw(
        Path(SMALL.clipart_dir), SMALL.clipart_train, SMALL.clipart_heldout, SIZE, SMALL.seed, SMALL.clipart_min_per_category
    )
    backgrounds, _ = photos.split(SMALL.photos_heldout, SMALL.seed)
    by_split, _ = scenes.pools(Path(SMALL.fmnist_dir), clips, backgrounds, COUNTS, SMALL.seed)
    return by_split


@pytest.fixture(scope="module")
def exported(pools, tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    out = tmp_path_factory.mktemp("scenes")
    return out, scenes.export(out, pools, SIZE, SMALL.seed)


def of_task(records: list[dict], task: str = scenes.GARMENT_TASK) -> list[dict]:
    return [r for r in records if r["task"] == task]


def test_layout_keeps_items_inside_sized_and_apart():
    rng = random.Random(0)
    for size in (224, 50, 336):
        for garment in ((0.25, 0.5), (1 / 3, 2 / 3), (0.5, 0.67)):
            sides = [scenes.side_range(garment, size)] + [scenes.side_range(scenes.DRAWING_SIDE, size)] * 2
            for _ in range(100):
                n = rng.randint(1, 3)
                boxes = scenes.layout(rng, sides[:n], size)
                for i, (x0, y0, x1, y1) in enumerate(boxes):
                    fractions = garment if i == 0 else scenes.DRAWING_SIDE
                    assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size and x1 - x0 == y1 - y0
                    assert fractions[0] * size - 1e-6 <= x1 - x0 <= fractions[1] * size  # item order kept
                    assert not any(scenes.overlaps(boxes[i], other) for other in boxes[i + 1 :])


def test_scene_style_refuses_what_cannot_be_drawn():
    with pytest.raises(ValueError, match="garment side"):
        ExportSettings(scenes_garment_side=(0.5, 0.9))
    with pytest.raises(ValueError, match="garment side"):
        scenes.Style(garment_side=(0.5, 0.25))
    with pytest.raises(ValueError, match="unknown scene background 'sky'"):
        ExportSettings(scenes_background="sky")
    with pytest.raises(ValueError, match="unknown scene caption 'poem'"):
        ExportSettings(scenes_caption="poem")
    for drawings in ((0, 3), (2, 1), (-1, 1)):
        with pytest.raises(ValueError, match=r"drawings per scene must be whole numbers 0 <= low <= high <= 2"):
            ExportSettings(scenes_drawings=drawings)


def test_a_fixed_drawing_count_puts_that_many_drawings_in_every_scene(pools, tmp_path):
    by_count = {n: scenes.export(tmp_path / str(n), {"heldout": pools["heldout"]}, SIZE, SMALL.seed,
                                 scenes.Style(background="plain", drawings=(n, n)))["heldout"]
                for n in (0, 2)}
    for n, records in by_count.items():
        garments = of_task(records)
        assert len(garments) == SMALL.scenes_heldout
        assert all(len(r["items"]) == n + 1 and [i["kind"] for i in r["items"]] == ["garment"] + ["clipart"] * n for r in garments)
        assert all(r["boxes"] == [r["items"][0]["box_fraction"]] for r in garments)  # the oracle's box is still the garment's
    # the same garments, in the same order (so the same val / test halves), only the scenes around them change
    assert [r["label"] for r in of_task(by_count[0])] == [r["label"] for r in of_task(by_count[2])]
    assert [r["items"][0]["source"] for r in of_task(by_count[0])] == [r["items"][0]["source"] for r in of_task(by_count[2])]


def test_names_captions_change_only_the_caption_text(pools, tmp_path):
    by_style = {caption: scenes.export(tmp_path / caption, {"train": pools["train"]}, SIZE, SMALL.seed,
                                       scenes.Style(background="plain", caption=caption))["train"]
                for caption in ("places", "names")}
    assert [r["items"] for r in by_style["places"]] == [r["items"] for r in by_style["names"]]  # the same scenes
    for places, names in zip(of_task(by_style["places"], scenes.CAPTION_TASK), of_task(by_style["names"], scenes.CAPTION_TASK)):
        assert names["label"] == scenes.names_caption(places["items"], SIZE) != places["label"]
        assert names["conversations"][1]["value"] == names["label"]
    first = of_task(by_style["places"])[0]["image"]
    assert (tmp_path / "places" / first).read_bytes() == (tmp_path / "names" / first).read_bytes()


def test_plain_scenes_have_a_flat_background_and_larger_garments(pools, tmp_path):
    style = scenes.Style(garment_side=(1 / 3, 2 / 3), background="plain")
    records = scenes.export(tmp_path, {"train": pools["train"]}, SIZE, SMALL.seed, style)["train"]
    for record in of_task(records):
        x0, y0, x1, y1 = record["items"][0]["box"]
        assert SIZE / 3 - 1 <= x1 - x0 <= 2 * SIZE / 3
        colour = record["background"]["plain"]
        pixels = np.asarray(Image.open(tmp_path / record["image"]).convert("RGB"))
        free = np.ones(pixels.shape[:2], bool)
        for item in record["items"]:
            a, b, c, d = item["box"]
            free[b:d, a:c] = False
        assert free.any() and (pixels[free] == colour).all()  # every pixel outside the items is the flat colour
    assert all(r["label"].endswith("on a plain background.") for r in of_task(records, scenes.CAPTION_TASK))


def test_every_scene_has_one_garment_answered_by_its_class_at_its_box(exported, pools):
    out, by_split = exported
    for split in COUNTS:
        garments = {item.id: item for item in pools[split].garments}
        garment_records, caption_records = of_task(by_split[split]), of_task(by_split[split], scenes.CAPTION_TASK)
        assert len(garment_records) == len(caption_records) == COUNTS[split]
        assert Counter(r["label"] for r in garment_records) == Counter(i.label for i in garments.values())  # class-balanced
        for record, described in zip(garment_records, caption_records):
            kinds = [item["kind"] for item in record["items"]]
            assert kinds.count("garment") == 1 and 1 <= len(kinds) <= 3 and record["items"] == described["items"]
            garment = record["items"][kinds.index("garment")]
            assert record["conversations"][1]["value"] == record["label"] == garment["label"] in fashion_mnist.CLASS_NAMES
            assert record["boxes"] == [garment["box_fraction"]] == [[v / SIZE for v in garment["box"]]]
            boxes = [tuple(item["box"]) for item in record["items"]]
            for i, (x0, y0, x1, y1) in enumerate(boxes):
                assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE and SIZE / 4 <= x1 - x0 == y1 - y0 <= SIZE / 2
                assert not any(scenes.overlaps(boxes[i], other) for other in boxes[i + 1 :])
            # the garment's pixels are exactly where its box says
            with Image.open(out / record["image"]) as image:
                pasted = np.asarray(image.convert("RGB").crop(tuple(garment["box"])))
            side = garment["box"][2] - garment["box"][0]
            assert np.array_equal(pasted, np.asarray(gray_to_rgb(garments[garment["source"]].pixels, side)))
            text = described["conversations"][1]["value"]
            assert all(scenes.item_phrase(item).lower() in text.lower() for item in record["items"]) and text.endswith(".")


def test_names_caption_names_every_item_in_the_captions_order_without_places():
    items = [{"kind": "clipart", "label": "animals", "box": [150, 150, 200, 200]},
             {"kind": "garment", "label": "trousers", "box": [0, 0, 56, 56]}]
    assert scenes.caption(items, None, 224) == ("A pair of trousers at the top left and a drawing from the animals "
                                                "category at the bottom right, on a plain background.")
    assert scenes.names_caption(items, 224) == "A pair of trousers and a drawing from the animals category."
    assert scenes.names_caption(items[:1], 224) == "A drawing from the animals category."


def test_train_and_heldout_scenes_share_no_item_and_no_background(exported):
    used = {}
    for split in COUNTS:
        garment_records = of_task(exported[1][split])
        items = [item for r in garment_records for item in r["items"]]
        used[split] = {
            "garments": {i["source"] for i in items if i["kind"] == "garment"},
            "clipart": {i["source"] for i in items if i["kind"] == "clipart"},
            "backgrounds": {r["background"]["photo"] for r in garment_records},
        }
        assert used[split]["clipart"] and used[split]["backgrounds"]
    for kind in ("garments", "clipart", "backgrounds"):
        assert not used["train"][kind] & used["heldout"][kind], f"held-out {kind} must never be trained on"
    assert all(s.startswith("fashion_mnist-t10k-") for s in used["heldout"]["garments"])
    assert all(s.startswith("fashion_mnist-train-") for s in used["train"]["garments"])


def test_cli_export_matches_and_the_task_loads_with_boxes_and_disjoint_halves(exported, tmp_path):
    from pipelines.evaluation.tasks import TaskContext, load_tasks
    from pipelines.packaged_corpora import main

    args = ["--sources", "scenes", "--clipart-train", "26", "--clipart-heldout", "13", "--out", str(tmp_path)]
    assert main([*args, "--scenes-train", str(SMALL.scenes_train), "--scenes-heldout", str(SMALL.scenes_heldout)]) == 0
    manifest = read_manifest(tmp_path)
    assert manifest["tasks"][scenes.GARMENT_TASK]["choices"] == list(fashion_mnist.CLASS_NAMES)
    assert manifest["files"]["scenes.heldout.jsonl"] == 2 * SMALL.scenes_heldout and manifest["files"]["fashion_mnist.train.jsonl"] == 0
    for split in COUNTS:  # the same scenes, to the pixel, as the direct export: seeded and deterministic
        cli = load_records(tmp_path, "scenes", split)
        assert cli == exported[1][split]
        for record in cli[:6]:
            assert (tmp_path / record["image"]).read_bytes() == (exported[0] / record["image"]).read_bytes()

    halves = {}
    for half in ("val", "test"):
        (task,), skipped = load_tasks(["scenes_garment"], TaskContext(SIZE, 14, tmp_path, split=half))
        assert not skipped and task.choices == fashion_mnist.CLASS_NAMES and half in task.source
        by_id = {r["id"]: r for r in load_records(tmp_path, "scenes", "heldout")}
        for example in task.examples:
            assert example.answer == by_id[example.id]["label"] and example.image.size == (SIZE, SIZE)
            assert example.boxes == (tuple(by_id[example.id]["boxes"][0]),)
        halves[half] = {e.id for e in task.examples}
        (small,), _ = load_tasks(["scenes_garment"], TaskContext(SIZE, 14, tmp_path, split=half, limit=10))
        labels = Counter(e.answer for e in small.examples)
        assert len(small.examples) == 10 and max(labels.values()) - min(labels.values()) <= 1  # class-balanced cut
    assert not halves["val"] & halves["test"]
    assert halves["val"] | halves["test"] == {r["id"] for r in load_records(tmp_path, "scenes", "heldout") if r["task"] == scenes.GARMENT_TASK}

    # scenes_caption_nll: a half's captions are of exactly the scenes its garment questions show,
    # so val and test share no image across the two tasks
    images = {}
    for half in ("val", "test"):
        (garments, captions), _ = load_tasks(["scenes_garment", "scenes_caption_nll"], TaskContext(SIZE, 14, tmp_path, split=half))
        assert captions.kind == "nll" and half in captions.source
        assert all(by_id[e.id]["task"] == scenes.CAPTION_TASK and e.answer == by_id[e.id]["label"] for e in captions.examples)
        images[half] = {by_id[e.id]["image"] for e in captions.examples}
        assert images[half] == {by_id[e.id]["image"] for e in garments.examples}
    assert images["val"] and images["test"] and not images["val"] & images["test"]


def test_cli_reads_the_drawing_count_and_names_a_bad_one():
    from pipelines.packaged_corpora import build_parser, settings_from_args

    def drawings(*argv: str) -> tuple[int, int]:
        return settings_from_args(build_parser().parse_args(["--out", "unused", *argv])).scenes_drawings

    assert drawings() == scenes.Style.drawings == (0, 2)
    assert drawings("--scenes-drawings", "2") == (2, 2)
    assert drawings("--scenes-drawings", "1,2") == (1, 2)
    for bad in ("two", "0,1,2", "0.5,1"):
        with pytest.raises(SystemExit, match=f"--scenes-drawings wants LOW,HIGH whole numbers.*{bad!r}"):
            drawings("--scenes-drawings", bad)
