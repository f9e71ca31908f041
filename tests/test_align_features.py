"""The alignment feature cache says which backbone and corpus export its rows encode: two exports
(e.g. scene variants) share relative image paths, and a row must never be read for the wrong one."""

from __future__ import annotations

import torch

from pipelines.align import features
from pipelines.align.features import EncodedRecords, cached_features, cached_rows, source_key


def test_cached_rows_are_read_only_for_their_own_backbone_and_corpus(tmp_path, monkeypatch):
    images = ["images/scenes/train/00000.png", "images/scenes/train/00001.png", "images/scenes/train/00002.png"]
    computed = torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(3, 4, 2).to(features.FEATURE_DTYPE)
    calls = []
    monkeypatch.setattr(features, "vision_features", lambda vlm, processor, corpus, paths, batch_size=32: calls.append(paths) or computed)
    ours = source_key({"backbone": "mini"}, {"settings": {"scenes_background": "photo"}})
    other = source_key({"backbone": "mini"}, {"settings": {"scenes_background": "plain"}})
    assert ours != other

    encoded = EncodedRecords([], [], [], [], images)
    rows, reused = cached_features(None, None, tmp_path, encoded, tmp_path, "k1", source=ours)
    assert not reused and calls == [images] and torch.equal(rows, computed)
    assert cached_features(None, None, tmp_path, encoded, tmp_path, "k1", source=ours)[1]  # same key: reused
    assert len(calls) == 1

    picked = cached_rows(tmp_path, ours, [images[2], images[0]])
    assert torch.equal(picked, computed[[2, 0]])
    assert cached_rows(tmp_path, other, images[:1]) is None  # same paths, another export: not these pixels
    assert cached_rows(tmp_path, ours, ["images/scenes/train/99999.png"]) is None
