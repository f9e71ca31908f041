"""Helpers for the local lmms-eval tasks: records in the LLaVA conversation format that
``pipelines/packaged_corpora.py`` writes (``image`` relative to the JSONL's folder, or absolute)."""

from __future__ import annotations

import os

from PIL import Image

ROOT_ENV = "AUTOSELECT_LMMS_DATA_ROOT"  # folder the records' image paths are relative to


def doc_to_visual(doc: dict) -> list:
    path = doc["image"] if os.path.isabs(doc["image"]) else os.path.join(os.environ.get(ROOT_ENV, ".cache/corpora"), doc["image"])
    return [Image.open(path).convert("RGB")]


def doc_to_text(doc: dict) -> str:
    return doc["conversations"][0]["value"].replace("<image>", "").strip()


def doc_to_target(doc: dict) -> str:
    return doc["conversations"][1]["value"]


def process_results(doc: dict, results: list[str]) -> dict:
    """Exact match after trimming and lower-casing (what the evaluation CLI scores too)."""
    prediction = results[0].strip().rstrip(".").lower()
    return {"accuracy": float(prediction == doc_to_target(doc).strip().lower())}
