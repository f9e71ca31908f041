"""The Ray Data UDF that validates samples and runs the backbone's processor on them.

A callable class, so each Ray actor loads the processor once. Every input row gives exactly
one output row: the training columns with ``status="ok"``, or ``status=<reason>`` plus a
detail, which the sink sends to the quarantine table. Every image is decoded and encoded here
(so a broken one is quarantined now, never met in training), but a row keeps the image's bytes
and the shapes of its image tensors, not the pixels: training rebuilds them (``shards.ImageTensors``).
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.fs as pafs
import torch
from PIL import Image

from autoselect.data import encode_example, image_inputs
from mlops import storage
from mlops.backbone import load_processor
from pipelines.preprocessing import shards
from pipelines.preprocessing.samples import (
    ENCODE_ERROR, MISSING_IMAGE, TOO_LONG, Rejected, chat_messages, check_messages, stored_image,
)


class Encoder:
    """``map_batches`` UDF over sample rows (see ``pipelines.preprocessing.corpus``), pyarrow in and out."""

    def __init__(self, model: str, max_length: int, image_fs: pafs.FileSystem, max_image_bytes: int):
        self.model = model
        self.processor = load_processor(model)
        self.max_length = max_length
        self.max_image_bytes = max_image_bytes
        self.image_fs = image_fs
        tensor_types, self.image_tensors = self._probe()
        self.schema = shards.encoded_schema(tensor_types, self.image_tensors)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return shards.to_table([self.encode(row) for row in batch.to_pylist()], self.schema)

    def encode(self, row: dict) -> dict:
        """The output row for one sample; never raises for a bad sample."""
        base = {"id": row["id"], "source": row["source"]}
        try:
            example, data, encoding = self._example(row)
        except Rejected as rejected:
            return {**base, "status": rejected.reason, "detail": rejected.detail}
        columns = shards.example_columns(example, shape_only=self.image_tensors)
        return {**base, "status": shards.OK, "detail": "", **columns, shards.IMAGE: data, shards.IMAGE_ENCODING: encoding}

    def _example(self, row: dict) -> tuple[dict, bytes, str]:
        if row["reason"]:
            raise Rejected(row["reason"], row["detail"])
        messages = json.loads(row["messages"])
        check_messages(messages)
        data, encoding, image = stored_image(row["image"] or self._load(row["image_path"]), self.max_image_bytes)
        try:
            example = encode_example(self.processor, messages, [image])
        except Exception as exc:  # the processor is third-party code; keep its refusal as data
            raise Rejected(ENCODE_ERROR, f"{type(exc).__name__}: {exc}") from None
        length = len(example["input_ids"])
        if length > self.max_length:
            raise Rejected(TOO_LONG, f"{length} tokens > max_length {self.max_length}")
        return example, data, encoding

    def _load(self, path: str) -> bytes:
        # Only a missing file is a data problem; other I/O errors (throttling, network) fail the
        # task loudly instead of quarantining good samples.
        try:
            return storage.read_bytes(self.image_fs, path)
        except (FileNotFoundError, IsADirectoryError):
            raise Rejected(MISSING_IMAGE, f"not found: {path}") from None

    def _probe(self) -> tuple[dict[str, pa.DataType], list[str]]:
        """Which tensors this processor emits, learned from one tiny example: ``(per-token tensors
        stored with the row -> their types, image tensors training rebuilds)``. Refuses a processor
        whose image tensors training could not rebuild from the image alone."""
        image = Image.new("RGB", (32, 32), "gray")
        example = encode_example(self.processor, chat_messages([("probe", "ok")]), [image])
        rebuilt = image_inputs(self.processor, [image])
        for name, tensor in rebuilt.items():
            if name not in example or not torch.equal(example[name], tensor):
                raise RuntimeError(f"{self.model!r}: the processor's {name!r} for an image differs between a "
                                   "conversation and the image alone; shards with image bytes cannot rebuild it")
        tensor_types = {name: shards.tensor_type(t) for name, t in example.items()
                        if name not in shards.TOKEN_COLUMNS and name not in rebuilt}
        return tensor_types, list(rebuilt)
