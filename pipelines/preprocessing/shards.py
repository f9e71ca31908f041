"""The on-disk contract between preprocessing and training, and the writer that produces it.

Training shards (``data/*.parquet``) hold one example per row:

    id, source            where the example came from
    input_ids, labels     list<int32>; labels are -100 outside the assistant answers
    <tensor>, <tensor>_shape
                          every other processor output (``pixel_values`` for LLaVA,
                          also ``image_grid_thw`` for Qwen-VL) as a flat list plus its shape

Flat lists plus shapes are plain parquet, so pandas, pyarrow or Ray can read them without
Ray's tensor extension. :func:`example_from_row` rebuilds the tensors ``collate`` expects.
The quarantine table (``quarantine/*.parquet``) has ``id, source, reason, detail``.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

OK = "ok"
SHAPE_SUFFIX = "_shape"
TOKEN_COLUMNS = ("input_ids", "labels")
QUARANTINE_SCHEMA = pa.schema([(name, pa.string()) for name in ("id", "source", "reason", "detail")])


def tensor_type(tensor: torch.Tensor) -> pa.DataType:
    """float32 for floating tensors (pixels), int64 for the rest (grids, token types)."""
    return pa.float32() if tensor.is_floating_point() else pa.int64()


def encoded_schema(tensor_types: Mapping[str, pa.DataType]) -> pa.Schema:
    """Schema of the encoder's output: status/detail plus every training column."""
    columns = [("id", pa.string()), ("source", pa.string()), ("status", pa.string()), ("detail", pa.string())]
    columns += [(name, pa.list_(pa.int32())) for name in TOKEN_COLUMNS]
    for name, dtype in tensor_types.items():
        columns += [(name, pa.list_(dtype)), (name + SHAPE_SUFFIX, pa.list_(pa.int32()))]
    return pa.schema(columns)


def example_columns(example: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Flatten an ``encode_example`` result into the training columns."""
    row: dict[str, np.ndarray] = {}
    for name, tensor in example.items():
        flat = tensor.detach().reshape(-1)
        if name in TOKEN_COLUMNS:
            row[name] = flat.numpy().astype(np.int32)
        else:
            row[name] = flat.float().numpy() if tensor.is_floating_point() else flat.long().numpy()
            row[name + SHAPE_SUFFIX] = np.asarray(tensor.shape, dtype=np.int32)
    return row


def example_from_row(row: Mapping) -> dict[str, torch.Tensor]:
    """Tensors for one training row, ready for ``autoselect.data.collate``."""
    example = {name: torch.as_tensor(np.asarray(row[name], dtype=np.int64)) for name in TOKEN_COLUMNS}
    for column in row:
        if column.endswith(SHAPE_SUFFIX):
            name = column[: -len(SHAPE_SUFFIX)]
            shape = [int(n) for n in row[column]]
            values = np.asarray(row[name])
            values = values.astype(np.float32) if values.dtype.kind == "f" else values.astype(np.int64)
            example[name] = torch.as_tensor(values).reshape(shape)
    return example


def to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows (good ones with every column, rejected ones with id/source/status/detail) as a table.

    A good row with a column too many or too few is a bug in the encoder, not bad data: raise.
    """
    names = set(schema.names)
    for row in rows:
        wrong = set(row) ^ names if row["status"] == OK else set(row) - names
        if wrong:
            raise ValueError(f"row {row['id']!r} does not fit the output schema: columns {sorted(wrong)}")
    arrays = []
    for field in schema:
        empty = [] if pa.types.is_list(field.type) else ""
        arrays.append(pa.array([row.get(field.name, empty) for row in rows], type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


class SplitParquetSink(Datasink[dict]):
    """Write good rows to ``data/`` and rejected rows to ``quarantine/`` in one streaming pass.

    Each write task returns its per-status counts; after the write, ``counts`` holds the totals
    (``"ok"`` plus one key per quarantine reason). Both tables always exist, possibly empty.
    """

    def __init__(self, fs: pafs.FileSystem, data_dir: str, quarantine_dir: str, rows_per_file: int):
        self.fs, self.data_dir, self.quarantine_dir = fs, data_dir, quarantine_dir
        self.rows_per_file = rows_per_file
        self.run_id = uuid.uuid4().hex[:8]
        self.data_schema: pa.Schema | None = None
        self.counts: dict[str, int] | None = None

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        self.data_schema = _data_schema(schema) if schema is not None else None

    def write(self, blocks: Iterable[Block], ctx) -> dict:
        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {}
        table = pa.concat_tables(tables)
        name = f"part-{self.run_id}-{ctx.task_idx:06d}.parquet"
        ok = pc.equal(table["status"], OK)
        good = table.filter(ok)
        bad = table.filter(pc.invert(ok))
        if good.num_rows:
            self._write(good.select(_data_schema(table.schema).names), self.data_dir, name)
        if bad.num_rows:
            bad = bad.select(["id", "source", "status", "detail"]).rename_columns(QUARANTINE_SCHEMA.names)
            self._write(bad, self.quarantine_dir, name)
        return dict(Counter(table["status"].to_pylist()))

    def on_write_complete(self, write_result) -> None:
        counts: Counter = Counter()
        for task_counts in write_result.write_returns:
            counts.update(task_counts)
        self.counts = dict(counts)
        if not counts.get(OK) and self.data_schema is not None:
            self._write(self.data_schema.empty_table(), self.data_dir, f"part-{self.run_id}-empty.parquet")
        if not sum(n for status, n in counts.items() if status != OK):
            self._write(QUARANTINE_SCHEMA.empty_table(), self.quarantine_dir, f"part-{self.run_id}-empty.parquet")

    def _write(self, table: pa.Table, directory: str, name: str) -> None:
        pq.write_table(table, f"{directory}/{name}", filesystem=self.fs)


def _data_schema(encoded: pa.Schema) -> pa.Schema:
    return pa.schema([field for field in encoded if field.name not in ("status", "detail")])
