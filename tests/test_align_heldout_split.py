"""align_projector's closing held-out score reads the val half only: the test half of the held-out
files is what docs/results.md reports, so nothing run while choosing a backbone may look at it."""

from __future__ import annotations

import json

import pipelines.align_projector as align_projector
from pipelines.evaluation.tasks.base import split_of


def test_the_closing_score_reads_only_the_val_half_of_the_heldout_files(tmp_path, monkeypatch):
    labels = ["shirt", "bag"]
    for name in align_projector.EVAL_FILES.values():
        rows = [{"id": f"{name}-{i}", "label": labels[i % 2], "image": f"{i}.png"} for i in range(40)]
        (tmp_path / f"{name}.heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen: dict[str, list[dict]] = {}

    def fake_accuracy(vlm, processor, corpora, records, choices, batch_size, desc):
        seen[desc] = records
        return {"accuracy": 0.5, "n": len(records), "chance": 1 / len(choices)}

    monkeypatch.setattr(align_projector, "choice_accuracy", fake_accuracy)
    manifest = {"tasks": {task: {"choices": labels} for task in align_projector.EVAL_FILES}}
    results = align_projector.evaluate(None, None, tmp_path, manifest, limit=None, batch_size=4, examples=0, tag="t")

    assert set(results) == set(align_projector.EVAL_FILES)
    for task, records in seen.items():
        ids = [r["id"] for r in records]
        assert ids and all(split_of(i) == "val" for i in ids), task
        name = align_projector.EVAL_FILES[task.removeprefix("t ")]
        expected = [f"{name}-{i}" for i in range(40) if split_of(f"{name}-{i}") == "val"]
        assert sorted(ids) == sorted(expected)  # every val record, none of the test half
    assert all(result["split"] == "val" and 0 < result["n"] < 40 for result in results.values())
