"""The stale DeepSpeed op-build lock is named before training would wait on it forever."""

from __future__ import annotations

import os
import time

import pytest

from pipelines.training.build_locks import OP, STALE_AFTER_S, build_lock, warn_if_stale


def test_the_lock_is_where_torch_builds_the_op(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert build_lock() == tmp_path / OP / "lock"


def test_only_an_old_lock_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = build_lock()
    assert warn_if_stale() is None  # no build ever started here
    lock.touch()
    assert warn_if_stale() is None  # a build in progress holds a fresh lock
    old = time.time() - STALE_AFTER_S - 60
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="wait for it forever") as caught:
        message = warn_if_stale()
    assert str(lock) in message and f"rm {lock}" in str(caught[0].message)
