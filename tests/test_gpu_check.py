"""bench/gpu_check.sh and bench/gpu_check.py, the check prepared for a lent GPU, smoke-run on the CPU:
the 576-token / width-1024 geometry with one 7B-shaped LM layer and a 2-layer vision tower."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # ~40 s on one thread: the 7B-shaped layer dominates


def load_gpu_check():
    """The script in this process: its sibling ``prefill`` is importable as it is when run as a script."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    return load_script("bench/gpu_check.py")


def test_the_wrapper_runs_every_part_on_cpu_and_writes_the_report(tmp_path):
    # both of CI's two cores: the 7B-wide layers make this the suite's slowest single-process test (~120 s on one)
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--lm-layers", "1", "--vision-layers", "2",
         "--repeats", "1", "--threads", "2", "--batch-size", "2", "--scorer-dtype", "bfloat16"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] is True
    env_seen = report["environment"]
    assert env_seen["torch"] == torch.__version__ and env_seen["transformers"] and env_seen["dtype"] == "float32"
    assert env_seen["device"] == "cpu" and env_seen["device_name"] and env_seen["threads"] == 2

    prefill = report["parts"]["prefill"]
    assert prefill["status"] == "ok" and prefill["geometry"]["visual_tokens"] == 576
    assert prefill["geometry"]["lm_layers"] == 1 and prefill["full_prefill_ms"] > 0
    assert prefill["geometry"]["batch_size"] == 2 and "batch 2" in prefill["scorer_measures"]
    assert "bfloat16 scorer" in prefill["scorer_measures"]
    assert set(prefill["prefill_speedup"]) == {"192", "128", "64"}
    assert all(ratio > 0 for ratio in prefill["prefill_speedup"].values())
    assert prefill["scorer_ms"] > 0 and prefill["paper"]["speedup_k64"] == 2.85

    training = report["parts"]["training"]
    assert training["status"] == "ok" and training["steps"] == 5
    assert training["losses_finite"] and all(math.isfinite(x) for x in training["losses"])
    assert training["scorer_moved"] is True and training["vlm_unchanged"] is True

    assert report["parts"]["deepspeed"]["status"] == "skipped"
    assert report["skipped"] == [{"part": "deepspeed", "reason": report["parts"]["deepspeed"]["reason"]}]
    assert "| 64 |" in done.stdout and "batch 2" in done.stdout and "scorer + top-K + gather" in done.stdout


def test_cuda_asked_for_without_cuda_fails_loudly(tmp_path, monkeypatch, capsys):
    gpu_check = load_gpu_check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu_check.json"
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main(["--device", "cuda", "--out", str(out)])
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert "--device cuda was asked for" in message and "sees no CUDA device" in message
    report = json.loads(out.read_text())
    assert report["ok"] is False and "sees no CUDA device" in report["error"] and report["parts"] == {}


def test_a_batch_size_below_one_is_refused_before_any_work(tmp_path, capsys):
    gpu_check = load_gpu_check()
    out = tmp_path / "gpu_check.json"
    with pytest.raises(SystemExit) as stopped:
        gpu_check.main(["--device", "cpu", "--batch-size", "0", "--out", str(out)])
    assert stopped.value.code == 2
    assert "--batch-size must be at least 1, got 0" in capsys.readouterr().err
    assert not out.exists()
