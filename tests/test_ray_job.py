"""`ray job submit` of pipelines/train.py against a `ray start --head` cluster on loopback.

The cluster is its own process group started here and stopped by signalling exactly that
`ray start --block` process (never `ray stop`, which would end every Ray on the machine).
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from autoselect.data import encode_example
from autoselect.testing import build_tiny_llava
from autoselect.testing.synthetic import COLOURS, marker_image, messages
from pipelines.preprocessing.shards import OK, encoded_schema, example_columns, to_table

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_shards(directory: Path, count: int) -> None:
    """Training shards in the preprocess layout, written directly (no Ray Data needed here)."""
    _, processor = build_tiny_llava(seed=0)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        colour = list(COLOURS)[i % len(COLOURS)]
        image, _ = marker_image(rng, colour)
        example = encode_example(processor, messages(colour), [image])
        rows.append({"id": f"m{i}", "source": "synthetic", "status": OK, "detail": "", **example_columns(example)})
    directory.mkdir(parents=True)
    pq.write_table(to_table(rows, encoded_schema({"pixel_values": pa.float32()})), directory / "part-0.parquet")


@pytest.fixture
def ray_head(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    dashboard = free_port()
    temp_dir = Path("/tmp") / f"rayjob-{os.getpid()}"  # short: socket paths have a length limit
    command = [
        str(BIN / "ray"), "start", "--head", "--block", "--port", str(free_port()),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
        "--num-cpus", "2", "--temp-dir", str(temp_dir), "--disable-usage-stats",
    ]
    log = open(tmp_path / "ray-start.log", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError:
                if time.time() > deadline or process.poll() is not None:
                    raise RuntimeError(f"ray start did not come up: {(tmp_path / 'ray-start.log').read_text()[-2000:]}")
                time.sleep(1)
        yield address, env
    finally:
        process.send_signal(signal.SIGTERM)  # `ray start --block` drains and stops its own processes
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # only the group this fixture started
            process.wait()
        log.close()


def test_ray_job_submit_runs_training_to_completion(ray_head, tmp_path):
    address, env = ray_head
    data = tmp_path / "shards"
    write_shards(data, 16)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = [
        str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
        "python", "pipelines/train.py", "--config", "pipelines/configs/tiny-llava.yaml",
        "--set", f"data.train={data}", "--set", "data.batch_size=2",
        "--set", "optim.steps=4", "--set", "optim.checkpoint_every=2",
        "--set", f"ray.storage_path={tmp_path / 'ray'}",
        "--set", f"mlflow.tracking_uri={tracking}",
        "--set", f"mlflow.artifact_location={(tmp_path / 'artifacts').as_uri()}",
        "--set", "mlflow.log_system_metrics=false",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=420)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "succeeded" in output, output[-4000:]
    assert "registered autoselect-tiny-llava version 1" in output, output[-4000:]
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        versions = db.execute("select name, version from model_versions").fetchall()
    assert versions == [("autoselect-tiny-llava", 1)]
