"""The on-disk contract between preprocessing and training, and the writer that produces it.

Training shards (``data/*.parquet``) hold one example per row:

    id, source            where the example came from
    input_ids, labels     list<int32>; labels are -100 outside the assistant answers
    image                 the image file's bytes: the source file's own (JPEG, PNG, WebP), re-encoded
                          only for other formats (as PNG, same pixels) or over a size cap
                          (``samples.stored_image``)
    image_encoding        how those bytes came to be: source, png or jpeg
    <tensor>_shape        the shape of each image tensor the processor gave at preprocessing
                          (``pixel_values``; also ``image_grid_thw`` for Qwen-VL), checked in training
    <tensor>, <tensor>_shape
                          other per-token processor outputs (``mm_token_type_ids``), a flat list
                          plus its shape

Pixels are not stored (float32 pixels were ~0.6 MB a row at 224 px, ~1.35 MB at 336 px): the
training input decodes the image and runs the backbone's processor (:class:`ImageTensors`, a Ray
Data ``map_batches`` on CPU actors), which adds each image tensor as a flat list beside its shape.
Shards written before this format stored the image tensors that way already (no ``image``
column) and are read as they are. Flat lists plus shapes are plain parquet, so pandas, pyarrow or
Ray can read them without Ray's tensor extension; :func:`examples_from_table` rebuilds the tensors
``collate`` expects. The quarantine table (``quarantine/*.parquet``) has ``id, source, reason, detail``.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from pipelines.preprocessing.samples import Rejected, decode_image

# torch and the backbone loaders are imported where they are used, not here: Ray Data's
# coordinating actors (Ray Train's dataset manager, the split coordinator) unpickle the training
# plan that names ImageTensors, and importing torch + transformers there cost each ~7 s of CPU
# per run, on a 2-core machine beside the workers. The decoding actors import them once, on start.
if TYPE_CHECKING:
    import torch

OK = "ok"
SHAPE_SUFFIX = "_shape"
TOKEN_COLUMNS = ("input_ids", "labels")
IMAGE, IMAGE_ENCODING = "image", "image_encoding"
QUARANTINE_SCHEMA = pa.schema([(name, pa.string()) for name in ("id", "source", "reason", "detail")])


def tensor_type(tensor: torch.Tensor) -> pa.DataType:
    """float32 for floating tensors (pixels), int64 for the rest (grids, token types)."""
    return pa.float32() if tensor.is_floating_point() else pa.int64()


def encoded_schema(tensor_types: Mapping[str, pa.DataType], image_tensors: Sequence[str] = ()) -> pa.Schema:
    """Schema of the encoder's output: status/detail plus every training column. ``tensor_types``
    are stored as values plus shape; ``image_tensors`` only as a shape, beside the image bytes
    (none: the layout of shards that stored every tensor)."""
    columns = [("id", pa.string()), ("source", pa.string()), ("status", pa.string()), ("detail", pa.string())]
    columns += [(name, pa.list_(pa.int32())) for name in TOKEN_COLUMNS]
    for name, dtype in tensor_types.items():
        columns += [(name, pa.list_(dtype)), (name + SHAPE_SUFFIX, pa.list_(pa.int32()))]
    columns += [(name + SHAPE_SUFFIX, pa.list_(pa.int32())) for name in image_tensors]
    if image_tensors:
        columns += [(IMAGE, pa.binary()), (IMAGE_ENCODING, pa.string())]
    return pa.schema(columns)


def example_columns(example: Mapping[str, torch.Tensor], shape_only: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Flatten an ``encode_example`` result into the training columns; tensors named in
    ``shape_only`` (the image tensors training rebuilds from the image) keep only their shape."""
    row: dict[str, np.ndarray] = {}
    for name, tensor in example.items():
        flat = tensor.detach().reshape(-1)
        if name in TOKEN_COLUMNS:
            row[name] = flat.numpy().astype(np.int32)
            continue
        if name not in shape_only:
            row[name] = flat.float().numpy() if tensor.is_floating_point() else flat.long().numpy()
        row[name + SHAPE_SUFFIX] = np.asarray(tensor.shape, dtype=np.int32)
    return row


def has_encoded_images(schema: pa.Schema | Sequence[str]) -> bool:
    """Whether shards hold image bytes (training must decode them) rather than the image tensors."""
    return IMAGE in (schema.names if hasattr(schema, "names") else schema)


def image_tensor_names(names: Sequence[str]) -> list[str]:
    """The tensors a table records only the shape of: what :class:`ImageTensors` adds."""
    return [c[: -len(SHAPE_SUFFIX)] for c in names if c.endswith(SHAPE_SUFFIX) and c[: -len(SHAPE_SUFFIX)] not in names]


class ImageTensors:
    """``map_batches`` UDF of the training input, pyarrow in and out, one processor per actor:
    decodes each row's image, runs the backbone's processor on it (``autoselect.data.image_inputs``)
    and adds the image tensors as flat columns beside the shapes preprocessing recorded, so rows
    leave it as a shard that stored the tensors would have given them, tensor for tensor.

    The images decoded at preprocessing (undecodable ones were quarantined there), so a row that
    fails now means a damaged shard: it raises, naming the row, instead of dropping it. A processor
    whose tensors have other shapes than the recorded ones (another backbone or resolution than
    the shards were preprocessed for) raises too.
    """

    def __init__(self, model: str):
        from autoselect.data import image_inputs
        from mlops.backbone import load_processor

        self.model = model
        self.processor = load_processor(model)
        probe = image_inputs(self.processor, [Image.new("RGB", (32, 32))])
        self.types = {name: tensor_type(tensor) for name, tensor in probe.items()}

    def __call__(self, table: pa.Table) -> pa.Table:
        from autoselect.data import image_inputs

        names = image_tensor_names(table.column_names)
        if set(names) != set(self.types):
            raise ValueError(f"the shards record image tensors {sorted(names)} but {self.model!r}'s processor "
                             f"gives {sorted(self.types)}: train with the backbone the shards were preprocessed for")
        values: dict[str, list[np.ndarray]] = {name: [] for name in names}
        recorded = [table[name + SHAPE_SUFFIX].to_pylist() for name in names]
        for index, (row_id, data) in enumerate(zip(table["id"].to_pylist(), table[IMAGE].to_pylist())):
            try:
                image = decode_image(data)
            except Rejected as rejected:
                raise ValueError(f"training row {row_id!r}: its image does not decode ({rejected.detail}); it decoded "
                                 "at preprocessing, so the shard is damaged: preprocess the corpus again") from None
            columns = example_columns(image_inputs(self.processor, [image]))
            for name, shapes in zip(names, recorded):
                shape = columns[name + SHAPE_SUFFIX].tolist()
                if shape != shapes[index]:
                    raise ValueError(
                        f"training row {row_id!r}: {self.model!r}'s processor gives {name} of shape {shape}, "
                        f"but the shard was preprocessed to {shapes[index]}: "
                        "train with the backbone (model.path) the shards were preprocessed for, or preprocess again")
                values[name].append(columns[name])
        out = table.drop_columns([IMAGE, IMAGE_ENCODING])
        for name in names:
            out = out.append_column(name, list_array(values[name], self.types[name]))
        return out


def list_array(rows: Sequence[np.ndarray], dtype: pa.DataType) -> pa.ListArray:
    """One list per row from numpy arrays, copied once (no Python object per element)."""
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(row) for row in rows], out=offsets[1:])
    flat = np.concatenate(rows) if rows else np.zeros(0, dtype=dtype.to_pandas_dtype())
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat, type=dtype))


def list_values(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """Each row's list as a numpy view (no Python object per element)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy()
    flat = array.values.to_numpy(zero_copy_only=False)  # the unsliced values: offsets index into them
    return [flat[offsets[i]: offsets[i + 1]] for i in range(len(array))]


def examples_from_table(table: pa.Table) -> list[dict[str, torch.Tensor]]:
    """Tensors for each training row, ready for ``autoselect.data.collate``: ``input_ids``/``labels``
    as int64, every ``<tensor>`` reshaped to ``<tensor>_shape`` (float32 or int64)."""
    import torch

    names = table.column_names
    if has_encoded_images(names) or image_tensor_names(names):
        raise ValueError(f"rows without their image tensors {image_tensor_names(names)}: shards with image "
                         "bytes go through ImageTensors (the training input's map_batches) first")
    examples: list[dict[str, torch.Tensor]] = [{} for _ in range(table.num_rows)]
    for name in TOKEN_COLUMNS:
        for example, values in zip(examples, list_values(table[name])):
            example[name] = torch.from_numpy(values.astype(np.int64))
    for column in names:
        if column.endswith(SHAPE_SUFFIX):
            name = column[: -len(SHAPE_SUFFIX)]
            for example, shape, values in zip(examples, table[column].to_pylist(), list_values(table[name])):
                dtype = np.float32 if values.dtype.kind == "f" else np.int64
                example[name] = torch.from_numpy(values.astype(dtype)).reshape(shape)
    return examples


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
    (``"ok"`` plus one key per quarantine reason) and ``image_encodings`` how many good rows'
    images were kept as their source bytes or re-encoded. Both tables always exist, possibly empty.
    """

    def __init__(self, fs: pafs.FileSystem, data_dir: str, quarantine_dir: str, rows_per_file: int):
        self.fs, self.data_dir, self.quarantine_dir = fs, data_dir, quarantine_dir
        self.rows_per_file = rows_per_file
        self.run_id = uuid.uuid4().hex[:8]
        self.data_schema: pa.Schema | None = None
        self.counts: dict[str, int] | None = None
        self.image_encodings: dict[str, int] | None = None

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
        encodings = good[IMAGE_ENCODING].to_pylist() if IMAGE_ENCODING in good.column_names else []
        return {"status": dict(Counter(table["status"].to_pylist())), "image_encoding": dict(Counter(encodings))}

    def on_write_complete(self, write_result) -> None:
        counts: Counter = Counter()
        encodings: Counter = Counter()
        for task_counts in write_result.write_returns:
            counts.update(task_counts.get("status", {}))
            encodings.update(task_counts.get("image_encoding", {}))
        self.counts, self.image_encodings = dict(counts), dict(encodings)
        if not counts.get(OK) and self.data_schema is not None:
            self._write(self.data_schema.empty_table(), self.data_dir, f"part-{self.run_id}-empty.parquet")
        if not sum(n for status, n in counts.items() if status != OK):
            self._write(QUARANTINE_SCHEMA.empty_table(), self.quarantine_dir, f"part-{self.run_id}-empty.parquet")

    def _write(self, table: pa.Table, directory: str, name: str) -> None:
        pq.write_table(table, f"{directory}/{name}", filesystem=self.fs)


def _data_schema(encoded: pa.Schema) -> pa.Schema:
    return pa.schema([field for field in encoded if field.name not in ("status", "detail")])
