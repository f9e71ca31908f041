"""The lmms-eval plug-in, run by lmms-eval itself: a local task via --include_path (no hub), the
model found through the ``lmms_eval.models`` entry point, AutoSelect and a baseline at a budget.

lmms-eval pins packages this project cannot share (torchvision, wandb), so it lives in its own
venv that sees this project's packages (`make lmms-env`); the test skips, saying so, without it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from autoselect import AutoSelectConfig, AutoSelectModel
from autoselect.testing import build_tiny_llava
from autoselect.testing.synthetic import COLOURS, QUESTION, marker_image

ROOT = Path(__file__).resolve().parent.parent
LMMS_PYTHON = ROOT / ".cache" / "lmms-venv" / "bin" / "python"
pytestmark = pytest.mark.skipif(not LMMS_PYTHON.exists(), reason="no lmms-eval venv: run `make lmms-env`")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A markers task in LLaVA conversation format with absolute image paths, plus a saved scorer."""
    root = tmp_path_factory.mktemp("lmms")
    rng = np.random.default_rng(0)
    records = []
    for i in range(6):
        colour = list(COLOURS)[i % len(COLOURS)]
        image, _ = marker_image(rng, colour)
        path = root / f"{i}.png"
        image.save(path)
        records.append({"id": str(i), "image": str(path), "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": colour}]})
    (root / "markers.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    shutil.copy(ROOT / "pipelines" / "evaluation" / "lmms_tasks" / "utils.py", tasks / "utils.py")
    template = (ROOT / "pipelines" / "evaluation" / "lmms_tasks" / "autoselect_fmnist.yaml").read_text()
    (tasks / "autoselect_markers.yaml").write_text(
        template.replace("task: autoselect_fmnist", "task: autoselect_markers")
        .replace(".cache/corpora/fashion_mnist.heldout.jsonl", str(root / "markers.jsonl"))
    )
    vlm, _ = build_tiny_llava(seed=0)
    torch.manual_seed(0)
    AutoSelectModel.attach(vlm, AutoSelectConfig(budget=16)).save_pretrained(root / "scorer")
    return root


def run_lmms_eval(task_dir: Path, model_args: str, out: Path) -> dict:
    command = [
        str(LMMS_PYTHON), "-m", "lmms_eval", "eval", "--model", "autoselect", "--model_args", model_args,
        "--tasks", "autoselect_markers", "--include_path", str(task_dir / "tasks"), "--batch_size", "1",
        "--device", "cpu", "--output_path", str(out), "--log_samples",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(task_dir / "hf")}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = sorted(out.rglob("*results*.json"))
    assert results, f"no results file under {out}: {done.stdout[-2000:]}"
    return json.loads(results[-1].read_text())


@pytest.mark.parametrize("pruner", ["autoselect", "random"])
def test_lmms_eval_runs_a_local_task_with_the_plugin(task_dir, pruner, tmp_path):
    args = f"pretrained=autoselect-testing/tiny-llava,pruner={pruner},budget=8"
    if pruner == "autoselect":
        args += f",autoselect={task_dir / 'scorer'}"
    report = run_lmms_eval(task_dir, args, tmp_path / "out")
    metrics = report["results"]["autoselect_markers"]
    accuracy = next(v for k, v in metrics.items() if k.startswith("accuracy") and "stderr" not in k)
    assert 0.0 <= accuracy <= 1.0
    samples = sorted(tmp_path.joinpath("out").rglob("*autoselect_markers*.jsonl"))
    assert samples, "--log_samples wrote nothing"
    logged = [json.loads(line) for line in samples[-1].read_text().splitlines() if line.strip()]
    assert len(logged) == 6  # every document was answered
