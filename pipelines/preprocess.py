"""Preprocess an image-text corpus into training shards with Ray Data.

    python -m pipelines.preprocess --input data/llava.json --model models/tiny --output out/pre
    python -m pipelines.preprocess --config preprocess.yaml --overwrite

Reads LLaVA JSON/JSONL + an image folder, parquet, or WebDataset tars (local or ``s3://``),
validates and encodes every sample with the backbone's processor, and writes
``<output>/data/*.parquet`` (training rows holding the image bytes, see ``pipelines.preprocessing.shards``),
``<output>/quarantine/*.parquet`` (``id, source, reason, detail``) and ``<output>/stats.json``.
Every input row ends up in exactly one of the two tables; the run checks that and says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from ray.data import ActorPoolStrategy

from mlops import storage
from pipelines.preprocessing.corpus import FORMATS, RecordSpec, infer_format, read_corpus
from pipelines.preprocessing.encode import Encoder
from pipelines.preprocessing.samples import IMAGE_ENCODINGS, REASONS
from pipelines.preprocessing.shards import OK, SplitParquetSink

REQUIRED = ("input", "output", "model")


@dataclass
class PreprocessConfig:
    """One run's settings; YAML keys and CLI flags share these names (flags use dashes)."""

    input: list[str]
    output: str
    model: str
    format: str = "auto"
    image_root: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    caption_prompt: str | None = None
    fraction: float = 1.0  # keep this share of the samples, chosen by a hash of their ids
    tasks: list[str] | None = None  # keep only records whose task field is one of these
    max_length: int = 2048
    s3_endpoint: str | None = None
    concurrency: int = 1
    batch_size: int = 16
    rows_per_shard: int = 256  # a write task holds at least this many rows (an image's bytes plus tokens each)
    max_image_bytes: int = 8 * 2**20  # bigger images are re-encoded as JPEG (samples.stored_image)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.input, str):
            self.input = [self.input]
        if not self.input:
            raise ValueError("input: give at least one file or folder")
        if self.format not in ("auto", *FORMATS):
            raise ValueError(f"format: {self.format!r} is not one of auto, {', '.join(FORMATS)}")
        for name in ("max_length", "concurrency", "batch_size", "rows_per_shard", "max_image_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) or not 0 < self.fraction <= 1:
            raise ValueError(f"fraction: must be in (0, 1], got {self.fraction!r}")
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        if self.tasks is not None and (not self.tasks or not all(isinstance(t, str) and t for t in self.tasks)):
            raise ValueError(f"tasks: expected a non-empty list of task names, got {self.tasks!r}")
        if not isinstance(self.fields, dict):
            raise ValueError("fields: expected a mapping of NAME: COLUMN")
        RecordSpec.from_mapping(self.fields)  # unknown field names fail here, before Ray starts


def run(config: PreprocessConfig) -> dict[str, Any]:
    """Run the pipeline; returns (and writes to ``stats.json``) where outputs went and the counts."""
    started = time.time()
    fmt = infer_format(config.input[0]) if config.format == "auto" else config.format
    spec = RecordSpec.from_mapping(config.fields, config.caption_prompt)
    out_fs, out_path = storage.resolve(config.output, config.s3_endpoint)
    storage.prepare_output(out_fs, out_path, config.overwrite)
    corpus = read_corpus(fmt, config.input, spec, config.image_root, config.s3_endpoint)
    corpus = corpus.subset(config.fraction).only_tasks(config.tasks)

    rows_in = corpus.records.count()  # a separate, cheap pass: no image is fetched or decoded
    if rows_in == 0:
        raise ValueError(f"no samples found in {config.input}")
    data_dir, quarantine_dir = f"{out_path}/data", f"{out_path}/quarantine"
    for directory in (data_dir, quarantine_dir):
        out_fs.create_dir(directory, recursive=True)
    sink = SplitParquetSink(out_fs, data_dir, quarantine_dir, rows_per_file=config.rows_per_shard)
    corpus.samples.map_batches(
        Encoder,
        fn_constructor_kwargs={"model": config.model, "max_length": config.max_length, "image_fs": corpus.image_fs,
                               "max_image_bytes": config.max_image_bytes},
        batch_format="pyarrow",
        batch_size=config.batch_size,
        compute=ActorPoolStrategy(size=config.concurrency),
        num_cpus=1,
        udf_modifying_row_count=False,
    ).write_datasink(sink)

    counts = sink.counts or {}
    by_reason = {reason: counts.get(reason, 0) for reason in REASONS}
    stats = {
        "format": fmt,
        "input": config.input,
        "fraction": config.fraction,
        "tasks": config.tasks,
        "data": storage.to_uri(out_fs, data_dir),
        "quarantine": storage.to_uri(out_fs, quarantine_dir),
        "rows_in": rows_in,
        "rows_written": counts.get(OK, 0),
        "rows_quarantined": sum(by_reason.values()),
        "quarantined_by_reason": by_reason,
        "images_stored": {encoding: (sink.image_encodings or {}).get(encoding, 0) for encoding in IMAGE_ENCODINGS},
        "seconds": round(time.time() - started, 1),
    }
    storage.write_json(out_fs, f"{out_path}/stats.json", {**stats, "config": dataclasses.asdict(config)})
    if stats["rows_written"] + stats["rows_quarantined"] != rows_in or set(counts) - {OK, *REASONS}:
        raise RuntimeError(f"rows went missing: read {rows_in}, but the writer saw {counts}")
    return stats


def build_parser() -> argparse.ArgumentParser:
    default = {f.name: f.default for f in dataclasses.fields(PreprocessConfig)}
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.preprocess",
        description=__doc__.split("\n\n")[0],
        argument_default=argparse.SUPPRESS,  # so only flags given on the command line override the YAML
    )
    add = parser.add_argument
    add("--config", help="YAML file with any of the keys below (flags win over it)")
    add("--input", nargs="+", help="annotation files, parquet files, .tar shards or folders; local or s3://")
    add("--output", help="output folder, local or s3://")
    add("--model", help="local HF folder with the backbone's processor (AutoProcessor.from_pretrained)")
    add("--format", choices=("auto", *FORMATS), help="default: from the first input's extension")
    add("--image-root", dest="image_root", help="folder that relative image paths are read from "
        "(default: the folder of each annotation/parquet file)")
    add("--field", dest="fields", action="append", metavar="NAME=COLUMN",
        help=f"where a record keeps a part; NAME in {', '.join(RecordSpec.field_names())} "
        "(e.g. --field image=jpg --field question=prompt)")
    add("--caption-prompt", dest="caption_prompt",
        help=f"question asked for caption-only samples (default: {RecordSpec.caption_prompt!r})")
    add("--fraction", type=float,
        help="keep this share of the samples, e.g. 0.1; chosen by a hash of each sample's id, so the same "
        "ids on every run and for every backbone (default 1: all); rows_in counts the kept samples")
    add("--tasks", nargs="+", metavar="TASK",
        help="keep only records whose task field (--field task=COLUMN; default 'task') is one of these, e.g. "
        "scenes_caption; records already rejected are kept, so they are still counted (default: every record)")
    add("--max-length", dest="max_length", type=int,
        help=f"samples with more tokens are quarantined (default {default['max_length']})")
    add("--s3-endpoint", dest="s3_endpoint",
        help="S3 endpoint override, e.g. http://127.0.0.1:9000 (default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL)")
    add("--concurrency", type=int,
        help=f"encoder actors, each loading the processor once (default {default['concurrency']})")
    add("--batch-size", dest="batch_size", type=int, help=f"samples per encoder call (default {default['batch_size']})")
    add("--rows-per-shard", dest="rows_per_shard", type=int,
        help=f"minimum rows per output parquet file (default {default['rows_per_shard']})")
    add("--max-image-bytes", dest="max_image_bytes", type=int,
        help="images whose file is bigger are stored re-encoded as JPEG (quality 95), and rejected as image_too_large "
        f"if still bigger; JPEG/PNG/WebP files under it are stored as they are (default {default['max_image_bytes']})")
    add("--overwrite", action="store_true", help="empty a non-empty output folder first")
    return parser


def load_yaml(path: str) -> dict[str, Any]:
    """The YAML config as a dict; unknown keys are an error, not silently ignored."""
    values = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of settings")
    known = {f.name for f in dataclasses.fields(PreprocessConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    return values


def parse_config(argv: Sequence[str] | None = None) -> PreprocessConfig:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    try:
        values = load_yaml(args.pop("config")) if "config" in args else {}
    except (OSError, ValueError, yaml.YAMLError) as exc:
        parser.error(str(exc))
    if "fields" in args:
        pairs = [item.split("=", 1) for item in args.pop("fields")]
        if any(len(pair) != 2 for pair in pairs):
            parser.error("--field takes NAME=COLUMN")
        values["fields"] = {**values.get("fields", {}), **dict(pairs)}
    values.update(args)
    missing = [name for name in REQUIRED if name not in values]
    if missing:
        parser.error(f"missing {', '.join('--' + name for name in missing)} (on the command line or in --config)")
    try:
        return PreprocessConfig(**values)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    stats = run(parse_config(argv))
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
