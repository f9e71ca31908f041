"""Shards hold image bytes, not pixels; training rebuilds the very tensors the pixel shards held.

No Ray here: the encoder and the training input's ``map_batches`` UDF are called directly on
tables that went through parquet, as the pipelines' actors call them.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from autoselect.data import collate, encode_example
from autoselect.testing.tiny_backbones import TINY_BACKBONES
from mlops.backbone import TINY_LLAVA, TINY_PREFIX
from pipelines.preprocessing.encode import Encoder
from pipelines.preprocessing.samples import (
    IMAGE_TOO_LARGE, Rejected, chat_messages, decode_image, encode_image, stored_image,
)
from pipelines.preprocessing.shards import (
    OK, SHAPE_SUFFIX, TOKEN_COLUMNS, ImageTensors, encoded_schema, example_columns, examples_from_table,
    tensor_type, to_table,
)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Noise over a gradient: compresses like a photo (badly), unlike a flat colour."""
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 200, width, dtype=np.float32)[None, :, None]
    pixels = np.clip(gradient + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def sample(sample_id: str, data: bytes, answer: str) -> dict:
    """A row as the corpus readers give it (``pipelines.preprocessing.corpus``)."""
    messages = chat_messages([("What is in the image?", answer)])
    return {"id": sample_id, "source": "test", "image": data, "image_path": "", "messages": json.dumps(messages),
            "reason": "", "detail": ""}


SAMPLES = [  # sizes differ, so native-resolution backbones (Qwen-VL) get different grids
    sample("jpeg", encode_image(photo(48, 40, 1), "JPEG", quality=90), "a gradient"),
    sample("png", encode_image(photo(40, 24, 2), "PNG"), "a wide picture"),
    sample("bmp", encode_image(photo(24, 40, 3), "BMP"), "a tall picture, stored as a PNG"),
]


def old_example_from_row(row: dict) -> dict[str, torch.Tensor]:
    """The training reader of pixel shards before image bytes (commit 1bc2553), verbatim: the
    reference the new path must reproduce."""
    example = {name: torch.as_tensor(np.asarray(row[name], dtype=np.int64)) for name in TOKEN_COLUMNS}
    for column in row:
        if column.endswith(SHAPE_SUFFIX):
            name = column[: -len(SHAPE_SUFFIX)]
            shape = [int(n) for n in row[column]]
            values = np.asarray(row[name])
            values = values.astype(np.float32) if values.dtype.kind == "f" else values.astype(np.int64)
            example[name] = torch.as_tensor(values).reshape(shape)
    return example


def through_parquet(rows: list[dict], schema: pa.Schema, path) -> pa.Table:
    """The rows as training reads them: written like the sink writes (no status/detail), read back."""
    pq.write_table(to_table(rows, schema).drop_columns(["status", "detail"]), path)
    return pq.read_table(path)


def assert_same(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], what: str) -> None:
    assert old.keys() == new.keys(), what
    for name in old:
        assert old[name].dtype == new[name].dtype and torch.equal(old[name], new[name]), f"{what}: {name}"


@pytest.mark.parametrize("family", sorted(TINY_BACKBONES))
def test_training_gets_the_pixel_shards_tensors_from_image_bytes(family, tmp_path):
    """Every backbone: a shard row with the image bytes, decoded and processed by the training
    input, gives tensor for tensor what the pixel shard of the same record gave the old reader;
    and pixel shards written before still read the same."""
    model = TINY_PREFIX + family
    encoder = Encoder(model, max_length=100_000, image_fs=pafs.LocalFileSystem(), max_image_bytes=2**20)
    processor = encoder.processor

    old_rows, types = [], {}
    for record in SAMPLES:  # the pixel shards: every tensor stored (the encoder before this change)
        example = encode_example(processor, json.loads(record["messages"]), [decode_image(record["image"])])
        types = {name: tensor_type(t) for name, t in example.items() if name not in TOKEN_COLUMNS}
        old_rows.append({"id": record["id"], "source": record["source"], "status": OK, "detail": "",
                         **example_columns(example)})
    old_table = through_parquet(old_rows, encoded_schema(types), tmp_path / "old.parquet")
    old = [old_example_from_row(row) for row in old_table.to_pylist()]

    new_rows = [encoder.encode(record) for record in SAMPLES]
    assert [row["status"] for row in new_rows] == [OK] * len(SAMPLES), new_rows
    new_table = through_parquet(new_rows, encoder.schema, tmp_path / "new.parquet")
    assert not any(pa.types.is_floating(f.type.value_type) for f in new_table.schema if pa.types.is_list(f.type))
    assert new_table["image"].to_pylist()[:2] == [SAMPLES[0]["image"], SAMPLES[1]["image"]]  # the files' own bytes
    assert new_table["image_encoding"].to_pylist() == ["source", "source", "png"]
    new = examples_from_table(ImageTensors(model)(new_table))

    for record, old_example, new_example in zip(SAMPLES, old, new):
        assert_same(old_example, new_example, f"{family} {record['id']}")
    for record, old_example, legacy in zip(SAMPLES, old, examples_from_table(old_table)):
        assert_same(old_example, legacy, f"{family} {record['id']} (pixel shard)")
    pad = processor.tokenizer.pad_token_id or 0
    assert_same(collate(old, pad), collate(new, pad), f"{family} batch")


def test_shards_keep_the_source_bytes_and_reencode_only_odd_or_oversized_images():
    image = photo(64, 48)
    for fmt in ("JPEG", "PNG", "WEBP"):
        data = encode_image(image, fmt)
        stored, how, decoded = stored_image(data, max_bytes=2**20)
        assert (stored, how) == (data, "source") and decoded.tobytes() == decode_image(data).tobytes()

    bmp = encode_image(image, "BMP")  # odd format: a PNG of the same pixels
    stored, how, decoded = stored_image(bmp, max_bytes=2**20)
    assert how == "png" and Image.open(io.BytesIO(stored)).format == "PNG"
    assert decode_image(stored).tobytes() == decoded.tobytes() == image.tobytes()

    png = encode_image(image, "PNG")  # over the cap: a JPEG, and the pixels training will see
    jpeg = encode_image(image, "JPEG", quality=95)
    assert len(jpeg) < len(png)
    stored, how, decoded = stored_image(png, max_bytes=len(jpeg))
    assert (stored, how) == (jpeg, "jpeg") and decoded.tobytes() == decode_image(jpeg).tobytes()
    with pytest.raises(Rejected) as rejected:
        stored_image(png, max_bytes=len(jpeg) - 1)
    assert rejected.value.reason == IMAGE_TOO_LARGE and f"max_image_bytes {len(jpeg) - 1}" in rejected.value.detail


@pytest.fixture(scope="module")
def llava_encoder() -> Encoder:
    return Encoder(TINY_LLAVA, max_length=1000, image_fs=pafs.LocalFileSystem(), max_image_bytes=2**20)


def test_training_input_refuses_damaged_images_and_shards_of_another_backbone(llava_encoder):
    table = to_table([llava_encoder.encode(SAMPLES[0])], llava_encoder.schema)
    with pytest.raises(ValueError, match="ImageTensors"):  # image bytes are not training tensors yet
        examples_from_table(table)

    damaged = table.set_column(table.schema.get_field_index("image"), "image", pa.array([b"\xff\xd8 cut"], pa.binary()))
    with pytest.raises(ValueError, match="'jpeg': its image does not decode .* preprocess the corpus again"):
        ImageTensors(TINY_LLAVA)(damaged)
    with pytest.raises(ValueError, match="train with the backbone the shards were preprocessed for"):
        ImageTensors(TINY_PREFIX + "qwen2_5_vl")(table)  # it also gives image_grid_thw
    column = table.schema.get_field_index("pixel_values_shape")
    resized = table.set_column(column, "pixel_values_shape", pa.array([[1, 3, 64, 64]], pa.list_(pa.int32())))
    with pytest.raises(ValueError, match=r"pixel_values of shape \[1, 3, 32, 32\], but the shard was preprocessed to \[1, 3, 64, 64\]"):
        ImageTensors(TINY_LLAVA)(resized)


def test_an_image_over_the_cap_even_as_a_jpeg_is_quarantined():
    big = Encoder(TINY_LLAVA, max_length=1000, image_fs=pafs.LocalFileSystem(), max_image_bytes=200)
    row = big.encode(SAMPLES[1])
    assert (row["status"], row["id"]) == (IMAGE_TOO_LARGE, "png") and "max_image_bytes 200" in row["detail"]


def test_the_shard_module_imports_without_torch_or_transformers():
    """Ray Data's coordinating actors unpickle the training plan that names ``ImageTensors``: its
    module must not pull torch and transformers into them (seconds of CPU each per run)."""
    import subprocess
    import sys

    probe = "import sys, pipelines.preprocessing.shards; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    root = Path(__file__).resolve().parent.parent  # `python -c` imports from its working folder first
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
