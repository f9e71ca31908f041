"""The Ray Data UDF that validates samples and runs the backbone's processor on them.

A callable class, so each Ray actor loads the processor once. Every input row gives exactly
one output row: the training columns with ``status="ok"``, or ``status=<reason>`` plus a
detail, which the sink sends to the quarantine table.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.fs as pafs
from PIL import Image

from autoselect.data import encode_example
from mlops import storage
from mlops.backbone import load_processor
from pipelines.preprocessing import shards
from pipelines.preprocessing.samples import (
    ENCODE_ERROR, MISSING_IMAGE, TOO_LONG, Rejected, chat_messages, check_messages, decode_image,
)


class Encoder:
    """``map_batches`` UDF over sample rows (see ``pipelines.preprocessing.corpus``), pyarrow in and out."""

    def __init__(self, model: str, max_length: int, image_fs: pafs.FileSystem):
        self.processor = load_processor(model)
        self.max_length = max_length
        self.image_fs = image_fs
        self.schema = shards.encoded_schema(self._tensor_types())

    def __call__(self, batch: pa.Table) -> pa.Table:
        return shards.to_table([self.encode(row) for row in batch.to_pylist()], self.schema)

    def encode(self, row: dict) -> dict:
        """The output row for one sample; never raises for a bad sample."""
        base = {"id": row["id"], "source": row["source"]}
        try:
            example = self._example(row)
        except Rejected as rejected:
            return {**base, "status": rejected.reason, "detail": rejected.detail}
        return {**base, "status": shards.OK, "detail": "", **shards.example_columns(example)}

    def _example(self, row: dict) -> dict:
        if row["reason"]:
            raise Rejected(row["reason"], row["detail"])
        messages = json.loads(row["messages"])
        check_messages(messages)
        image = decode_image(row["image"] or self._load(row["image_path"]))
        try:
            example = encode_example(self.processor, messages, [image])
        except Exception as exc:  # the processor is third-party code; keep its refusal as data
            raise Rejected(ENCODE_ERROR, f"{type(exc).__name__}: {exc}") from None
        length = len(example["input_ids"])
        if length > self.max_length:
            raise Rejected(TOO_LONG, f"{length} tokens > max_length {self.max_length}")
        return example

    def _load(self, path: str) -> bytes:
        # Only a missing file is a data problem; other I/O errors (throttling, network) fail the
        # task loudly instead of quarantining good samples.
        try:
            return storage.read_bytes(self.image_fs, path)
        except (FileNotFoundError, IsADirectoryError):
            raise Rejected(MISSING_IMAGE, f"not found: {path}") from None

    def _tensor_types(self) -> dict[str, pa.DataType]:
        """Which image tensors this processor emits, learned from one tiny example."""
        probe = encode_example(self.processor, chat_messages([("probe", "ok")]), [Image.new("RGB", (32, 32))])
        return {name: shards.tensor_type(t) for name, t in probe.items() if name not in shards.TOKEN_COLUMNS}
