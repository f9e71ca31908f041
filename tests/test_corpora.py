"""Packaged corpora and the aligned mini-LLaVA.

* exports from the real Debian packages (Fashion-MNIST, Open Clip Art) and Python sample photos:
  counts, split disjointness, determinism by seed, reuse, and records the mini-LLaVA processor
  and the preprocessing reader accept;
* a fake clip-art tree with broken files, so every skip reason is counted exactly;
* the alignment pieces on the tiny LLaVA (loss, projector-only updates);
* the committed projector: it loads into the built mini-LLaVA and, on held-out Fashion-MNIST,
  beats the unaligned projector.

Needs the Debian packages: apt-get install -y dataset-fashion-mnist openclipart-png openclipart-svg
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from autoselect.convert.aligned import (
    DEFAULT_PROJECTOR,
    backbone_identity,
    load_aligned_mini_llava,
    load_projector,
    projector_module,
    save_projector,
)
from autoselect.backbones import get_adapter
from autoselect.convert.mini_llava import build_mini_llava
from autoselect.data import collate, encode_example
from autoselect.placeholders import IGNORE_INDEX
from pipelines import packaged_corpora
from pipelines.align.evaluate import balanced_subset, choice_log_likelihoods
from pipelines.align.features import encode_records, vision_features
from pipelines.align.train import TrainConfig, answer_loss, task_batches, train_projector
from pipelines.corpora import (
    FILES,
    ExportSettings,
    MissingPackageError,
    export_corpora,
    load_records,
    open_image,
    read_manifest,
    record_messages,
)
from pipelines.corpora import openclipart
from pipelines.corpora.common import square_on_white
from pipelines.corpus import RecordSpec, sample_from_record

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = ROOT / ".cache" / "backbones"
SMALL = ExportSettings(fmnist_train=20, fmnist_heldout=20, clipart_train=20, clipart_heldout=20, photos_heldout=3)


def _png(color: tuple[int, int, int], size: tuple[int, int] = (40, 32), mode: str = "RGBA") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color + ((200,) if mode == "RGBA" else ())).save(buffer, "PNG")
    return buffer.getvalue()


def _svg(title: str | None) -> str:
    title_xml = f"<dc:title>{title}</dc:title>" if title else ""
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/" '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" xmlns:cc="http://web.resource.org/cc/">'
        f"<metadata><rdf:RDF><cc:Work>{title_xml}<dc:subject><rdf:Bag><rdf:li>test</rdf:li></rdf:Bag></dc:subject>"
        "</cc:Work></rdf:RDF></metadata></svg>"
    )


@pytest.fixture(scope="module")
def fake_clipart(tmp_path_factory) -> Path:
    """Two categories with good drawings plus one of every kind of bad file."""
    root = tmp_path_factory.mktemp("openclipart")
    truncated = _png((9, 9, 9), (48, 48), "RGB")
    files = {
        "animals/cat.png": _png((200, 0, 0)),
        "animals/pets/cat_copy.png": _png((200, 0, 0)),  # same bytes, same category: one drawing
        "animals/dog.png": _png((0, 200, 0)),
        "animals/fox.png": _png((0, 0, 200)),  # its SVG has no title
        "animals/empty.png": b"",
        "animals/truncated.png": truncated[: len(truncated) // 2],
        "animals/notes.png": b"not a png at all",
        "animals/shared.png": _png((1, 2, 3)),
        "food/shared.png": _png((1, 2, 3)),  # filed under two categories: no single answer
        "food/apple.png": _png((250, 250, 0)),
        "food/bread.png": _png((150, 100, 50)),
        "food/cheese.png": _png((250, 200, 0), (32, 48)),
        "food/poster.png": _png((5, 5, 5), (100, 100)),  # over the (test-lowered) pixel limit
    }
    for relative, data in files.items():
        png = root / "png" / relative
        png.parent.mkdir(parents=True, exist_ok=True)
        png.write_bytes(data)
        svg = (root / "svg" / relative).with_suffix(".svg")
        svg.parent.mkdir(parents=True, exist_ok=True)
        svg.write_text(_svg(None if "fox" in relative else Path(relative).stem.replace("_", " ")))
    return root


def _fake_settings(clipart_dir: Path, **overrides) -> ExportSettings:
    values = dict(
        sources=("openclipart",), clipart_dir=str(clipart_dir), clipart_train=100, clipart_heldout=2,
        clipart_min_per_category=1, image_size=28,
    )
    return ExportSettings(**{**values, **overrides})


@pytest.fixture(scope="module")
def small_export(tmp_path_factory) -> Path:
    """A small export from the real packages (all three sources)."""
    return export_corpora(tmp_path_factory.mktemp("corpora") / "out", SMALL).path


@pytest.fixture(scope="module")
def mini_llava():
    built = build_mini_llava(cache_dir=CACHE_DIR)
    from transformers import AutoProcessor

    path = built["mini_llava"].path
    return built, AutoProcessor.from_pretrained(path)


def _all_records(out: Path) -> dict[str, list[dict]]:
    return {f"{name}.{split}": load_records(out, name, split) for name in FILES for split in ("train", "heldout")}


# --- exports from the real packages -----------------------------------------------------------


def test_small_export_sizes_balance_and_manifest(small_export):
    manifest = read_manifest(small_export)
    records = _all_records(small_export)
    counts = {name: len(rows) for name, rows in records.items()}
    assert counts["fashion_mnist.train"] == counts["fashion_mnist.heldout"] == 20
    assert counts["openclipart.train"] == counts["openclipart.heldout"] == 20
    assert manifest["files"] == {f"{name}.jsonl": n for name, n in counts.items()}

    fmnist = manifest["tasks"]["fmnist_class"]
    assert len(fmnist["choices"]) == 10 and fmnist["chance"] == pytest.approx(0.1)
    per_class = {c: sum(r["label"] == c for r in records["fashion_mnist.heldout"]) for c in fmnist["choices"]}
    assert set(per_class.values()) == {2}  # balanced: chance is exactly 1/10
    clipart = manifest["tasks"]["clipart_category"]
    assert len(clipart["choices"]) >= 8 and not {"special", "unsorted"} & set(clipart["choices"])
    assert {r["label"] for r in records["openclipart.heldout"]} <= set(clipart["choices"])

    # the package's own duplicates are counted, not exported twice
    skipped = manifest["skipped"]["openclipart"]
    assert skipped["duplicate_copies"] > 0 and skipped["ambiguous_category"] > 0
    captions = records["captions.train"] + records["captions.heldout"]
    assert {r["task"] for r in captions} == {"clipart_title", "photo_caption"}
    assert sum(r["task"] == "photo_caption" for r in records["captions.heldout"]) == 3

    for rows in records.values():
        for record in rows[:3]:
            image = open_image(small_export, record)
            assert image.mode == "RGB"
            if record["task"] != "photo_caption":
                assert image.size == (224, 224)


def test_heldout_never_overlaps_train(small_export):
    records = _all_records(small_export)

    def pixels(split: str) -> set[str]:
        rows = [r for name in FILES for r in records[f"{name}.{split}"]]
        return {hashlib.sha256((small_export / r["image"]).read_bytes()).hexdigest() for r in rows}

    def ids(split: str) -> set[str]:
        return {r["id"] for name in FILES for r in records[f"{name}.{split}"]}

    assert not ids("train") & ids("heldout")
    assert not pixels("train") & pixels("heldout")
    assert all("-t10k-" in r["id"] for r in records["fashion_mnist.heldout"])  # held-out comes from the test file
    assert all("-train-" in r["id"] for r in records["fashion_mnist.train"])


def test_records_encode_for_the_mini_llava_and_the_preprocess_reader(small_export, mini_llava):
    _, processor = mini_llava
    tokenizer = processor.tokenizer
    for name, rows in _all_records(small_export).items():
        record = rows[0]
        example = encode_example(processor, record_messages(record), [open_image(small_export, record)])
        assert int((example["input_ids"] == tokenizer.image_token_id).sum()) == 256, name
        answer = tokenizer.decode(example["labels"][example["labels"] != IGNORE_INDEX])
        assert answer == f"{record['conversations'][1]['value']}{tokenizer.eos_token}\n", name
        sample = sample_from_record(record, "test", RecordSpec(), str(small_export), "fallback")
        assert sample["reason"] == "" and Path(sample["image_path"]).is_file(), name


def test_export_is_reused_and_redone_on_new_settings(small_export):
    assert not export_corpora(small_export, SMALL).rebuilt
    before = (small_export / "fashion_mnist.heldout.jsonl").read_bytes()
    assert packaged_corpora.main(["--out", str(small_export), "--fmnist-train", "20", "--fmnist-heldout", "20",
                                  "--clipart-train", "20", "--clipart-heldout", "20", "--photos-heldout", "3"]) == 0
    assert (small_export / "fashion_mnist.heldout.jsonl").read_bytes() == before


# --- broken files, determinism, missing packages (fake clip-art tree) --------------------------


def test_broken_and_duplicate_files_are_skipped_and_counted(fake_clipart, tmp_path, monkeypatch):
    monkeypatch.setattr(openclipart, "MAX_PIXELS", 64 * 64)
    out = export_corpora(tmp_path / "out", _fake_settings(fake_clipart)).path
    manifest = read_manifest(out)
    assert manifest["skipped"]["openclipart"] == {
        "empty": 1, "corrupt": 2, "oversized": 1, "duplicate_copies": 2, "ambiguous_category": 1, "no_title": 1,
    }
    records = load_records(out, "openclipart", "train") + load_records(out, "openclipart", "heldout")
    assert sorted(Path(r["image"]).stem for r in records) == ["apple", "bread", "cat", "cheese", "dog", "fox"]
    assert len(load_records(out, "openclipart", "heldout")) == 2  # one per category
    titles = {r["label"] for r in load_records(out, "captions", "train") + load_records(out, "captions", "heldout")}
    assert titles == {"apple", "bread", "cat", "cheese", "dog"}


def test_clip_art_lands_on_a_white_square():
    for image in (Image.new("RGBA", (10, 20), (0, 0, 0, 0)), Image.new("LA", (20, 10), (0, 0))):
        square = square_on_white(image, 28)  # transparent canvas and padding both become white
        assert square.mode == "RGB" and square.size == (28, 28)
        assert square.getextrema() == ((255, 255),) * 3


def test_splits_are_fixed_by_seed(fake_clipart, tmp_path):
    both = dict(sources=("fashion_mnist", "openclipart"), fmnist_train=20, fmnist_heldout=10)

    def export(name: str, **changes) -> dict[str, bytes]:
        out = export_corpora(tmp_path / name, _fake_settings(fake_clipart, **{**both, **changes})).path
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.jsonl"))}

    first, again = export("a"), export("b")
    assert first == again  # same seed: byte-identical files
    other = export("c", seed=1)
    assert other["fashion_mnist.heldout.jsonl"] != first["fashion_mnist.heldout.jsonl"]
    more_train = export("d", fmnist_train=40, clipart_train=1)
    for name in ("fashion_mnist.heldout.jsonl", "openclipart.heldout.jsonl"):
        assert more_train[name] == first[name]  # held-out does not move when the train size does


def test_missing_packages_are_named(tmp_path, fake_clipart, capsys):
    with pytest.raises(MissingPackageError, match="dataset-fashion-mnist"):
        export_corpora(tmp_path / "a", ExportSettings(sources=("fashion_mnist",), fmnist_dir=str(tmp_path / "none")))
    no_svg = tmp_path / "clipart"
    (no_svg / "png").mkdir(parents=True)
    with pytest.raises(MissingPackageError, match="openclipart-svg"):
        export_corpora(tmp_path / "b", _fake_settings(no_svg))
    assert packaged_corpora.main(["--out", str(tmp_path / "c"), "--sources", "openclipart", "--clipart-dir", str(tmp_path / "x")]) == 2
    assert "apt-get install -y openclipart-png" in capsys.readouterr().err


# --- alignment pieces on the tiny LLaVA -------------------------------------------------------


def test_alignment_loop_trains_only_the_projector(fake_clipart, tmp_path):
    from autoselect.testing import build_tiny_llava

    vlm, processor = build_tiny_llava()
    out = export_corpora(tmp_path / "out", _fake_settings(fake_clipart, image_size=32)).path
    records = load_records(out, "openclipart", "train") + load_records(out, "captions", "train")
    encoded = encode_records(processor, out, records)
    encoded.features = vision_features(vlm, processor, out, encoded.images)
    assert encoded.features.shape == (len(encoded.images), 64, 32)

    pad = processor.tokenizer.pad_token_id
    rows = list(range(4))
    features = encoded.features[[encoded.image_index[i] for i in rows]].float()
    pieces = [{"input_ids": encoded.input_ids[i], "labels": encoded.labels[i]} for i in rows]
    with torch.no_grad():
        projected = projector_module(vlm)(features)
        ours = answer_loss(vlm, collate(pieces, pad, "left"), projected)
        reference = vlm(**collate(pieces, pad, "right"), mm_encoder_outputs=get_adapter(vlm).encoder_outputs(projected)).loss
    assert float(ours) == pytest.approx(float(reference), rel=1e-4)

    frozen = {k: v.clone() for k, v in vlm.state_dict().items() if "multi_modal_projector" not in k}
    projector = {k: v.clone() for k, v in projector_module(vlm).state_dict().items()}
    history = train_projector(vlm, encoded, TrainConfig(steps=3, batch_size=4, compute_dtype="float32", warmup_steps=1), pad)
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert all(torch.equal(v, vlm.state_dict()[k]) for k, v in frozen.items())
    assert any(not torch.equal(v, projector_module(vlm).state_dict()[k]) for k, v in projector.items())


def test_task_batches_follow_the_weights():
    records = [{"task": "a"}] * 10 + [{"task": "b"}] * 10
    batches = task_batches(records, {"a": 3, "b": 1}, 40, seed=0)
    first = next(batches)
    assert first == next(task_batches(records, {"a": 3, "b": 1}, 40, seed=0))
    share_a = sum(records[i]["task"] == "a" for i in first) / len(first)
    assert 0.55 < share_a < 0.95
    with pytest.raises(ValueError, match="no training records"):
        next(task_batches(records, {"c": 1}, 4, seed=0))


# --- the committed projector ------------------------------------------------------------------


def test_committed_projector_loads_and_beats_the_unaligned_one(small_export, mini_llava, tmp_path):
    assert DEFAULT_PROJECTOR.is_file() and DEFAULT_PROJECTOR.stat().st_size < 20 * 2**20
    built, processor = mini_llava
    vlm, _ = load_aligned_mini_llava(cache_dir=CACHE_DIR)

    tampered = tmp_path / "other.safetensors"
    identity = backbone_identity(built)
    save_projector(vlm, tampered, {**identity, "settings": {**identity["settings"], "seed": 99}})
    with pytest.raises(ValueError, match="another mini-LLaVA"):
        load_projector(vlm, tampered, identity)

    manifest = read_manifest(small_export)
    task = manifest["tasks"]["fmnist_class"]
    records = balanced_subset(load_records(small_export, "fashion_mnist", "heldout"), 10)  # one per class
    images = [open_image(small_export, r) for r in records]
    truth = torch.tensor([task["choices"].index(r["label"]) for r in records])

    def score(model) -> tuple[float, float]:
        scores = choice_log_likelihoods(model, processor, images, task["question"], task["choices"])
        accuracy = float((scores.argmax(-1) == truth).float().mean())
        return accuracy, float(scores.log_softmax(-1).gather(1, truth[:, None]).mean())

    aligned_accuracy, aligned_loglik = score(vlm)
    unaligned = LlavaForConditionalGeneration.from_pretrained(built["mini_llava"].path, dtype=torch.float32).eval()
    unaligned_accuracy, unaligned_loglik = score(unaligned)
    assert aligned_accuracy >= 0.5, (aligned_accuracy, unaligned_accuracy)
    assert aligned_accuracy > unaligned_accuracy
    assert aligned_loglik > unaligned_loglik  # the right class gets more of the probability mass


def test_metrics_record_the_command():
    metrics = json.loads((DEFAULT_PROJECTOR.parent / "metrics.json").read_text())
    assert metrics["command"].startswith("python pipelines/align_projector.py")
    assert metrics["heldout"]["fmnist_class"]["n"] > 0
