"""Encode alignment records once and cache the frozen vision encoder's output on disk.

The encoder is frozen, so its pre-projector visual tokens are a pure function of the image:
computing them once (bf16, one row per distinct image) takes the encoder out of every training
step. The cache file is keyed by the backbone, the corpus export and the image list.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from autoselect.backbones import get_adapter
from autoselect.data import encode_example
from pipelines.corpora import open_image, record_messages

FEATURE_DTYPE = torch.bfloat16


@dataclass
class EncodedRecords:
    """Token ids and labels per record; ``image_index[i]`` is record i's row in ``features``."""

    records: list[dict]
    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]
    image_index: list[int]
    images: list[str]  # distinct image paths (relative to the corpus folder), in feature-row order
    features: torch.Tensor | None = None  # [len(images), N, D]


def encode_records(processor, corpus_dir: str | Path, records: Sequence[dict]) -> EncodedRecords:
    """``autoselect.data.encode_example`` on every record (labels on the answer only)."""
    encoded = EncodedRecords(list(records), [], [], [], [])
    rows: dict[str, int] = {}
    for record in tqdm(records, desc="encode", unit="rec", leave=False):
        example = encode_example(processor, record_messages(record), [open_image(corpus_dir, record)])
        encoded.input_ids.append(example["input_ids"])
        encoded.labels.append(example["labels"])
        encoded.image_index.append(rows.setdefault(record["image"], len(rows)))
    encoded.images = list(rows)
    return encoded


@torch.no_grad()
def vision_features(vlm, processor, corpus_dir: str | Path, images: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Pre-projector visual tokens ``[len(images), N, D]`` (the adapter's selection: chosen layer,
    CLS dropped), computed in the model's dtype and stored as bf16."""
    adapter = get_adapter(vlm)
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc="vision features", unit="batch", leave=False):
        batch = [open_image(corpus_dir, {"image": path}) for path in images[start : start + batch_size]]
        pixels = processor.image_processor(batch, return_tensors="pt")["pixel_values"]
        chunks.append(adapter.visual_tokens(pixels).to(FEATURE_DTYPE))
    return torch.cat(chunks)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def features_key(identity: dict[str, Any], corpus_inputs: dict[str, Any], images: Sequence[str]) -> str:
    return _digest({"backbone": identity, "corpus": corpus_inputs, "images": list(images)})


def source_key(identity: dict[str, Any], corpus_inputs: dict[str, Any]) -> str:
    """Backbone + corpus export, stored in each cache file: two exports (e.g. scene variants)
    share relative image paths, so a path alone does not say which pixels a row encodes."""
    return _digest({"backbone": identity, "corpus": corpus_inputs})


def cached_rows(cache_dir: str | Path, source: str, images: Sequence[str]) -> torch.Tensor | None:
    """Rows for ``images`` from any cache file of the same ``source`` that holds them all."""
    for path in sorted(Path(cache_dir).glob("features-*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            if metadata.get("source") != source:
                continue
            row = {image: i for i, image in enumerate(json.loads(metadata["images"]))}
            if all(image in row for image in images):
                return handle.get_tensor("features")[torch.tensor([row[i] for i in images])]
    return None


def cached_features(
    vlm, processor, corpus_dir: str | Path, encoded: EncodedRecords, cache_dir: str | Path, key: str, batch_size: int = 32,
    source: str = "",
) -> tuple[torch.Tensor, bool]:
    """``(features, reused)``: read ``<cache_dir>/features-<key>.safetensors`` or compute and write
    it (with ``source``, see ``source_key``, in its metadata)."""
    path = Path(cache_dir) / f"features-{key}.safetensors"
    if path.is_file():
        with safe_open(str(path), framework="pt") as handle:
            if json.loads(handle.metadata()["images"]) == encoded.images:
                return handle.get_tensor("features"), True
    features = vision_features(vlm, processor, corpus_dir, encoded.images, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file({"features": features.contiguous()}, str(partial), metadata={"images": json.dumps(encoded.images), "source": source})
    partial.rename(path)
    return features, False
