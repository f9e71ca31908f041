"""`ray job submit` of pipelines/train.py against a `ray start` cluster on this machine: two nodes,
of which one is lost mid-run; the job resumes from its S3 checkpoint, ends and registers the scorer.

Every node is its own `ray start --block` process group, started here and stopped by signalling
exactly that process (never `ray stop`, which would end every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, TypeVar

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
T = TypeVar("T")


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


def wait_for(probe: Callable[[], T], what: str, timeout: float, alive: Callable[[], bool] = lambda: True,
             context: Callable[[], str] = lambda: "") -> T:
    """``probe()``'s first value that is not a LookupError; fails after ``timeout`` s or once ``alive()`` is false."""
    deadline = time.time() + timeout
    while True:
        try:
            return probe()
        except LookupError:
            if time.time() > deadline or not alive():
                raise AssertionError(f"gave up waiting for {what}: {context()[-3000:]}") from None
            time.sleep(0.25)


class LocalCluster:
    """Ray nodes on this machine, each a `ray start --block` in its own session, stopped by its own PID.

    The dashboard (job API) listens on 127.0.0.1. The nodes take the machine's address: the switch that
    pins a node to 127.0.0.1 (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`) also makes `ray start --address`
    refuse to add a node, and a 127.0.0.1 address is rewritten to the machine's own by Ray."""

    def __init__(self, log_dir: Path) -> None:
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    # on SIGTERM a node otherwise drains for up to 30 s (for Serve replicas; these run none):
                    # the finished job's leases keep it from going idle, so every teardown waited the whole 30 s
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}  # nodes may join (the Makefile pins 127.0.0.1)
        self.log_dir = log_dir
        self.nodes: dict[str, subprocess.Popen] = {}
        self.temp_dirs: list[Path] = []
        self.gcs_address = self.dashboard = ""

    def log(self, name: str) -> str:
        return (self.log_dir / f"ray-start-{name}.log").read_text()

    def _start(self, name: str, options: list[str]) -> None:
        temp_dir = Path("/tmp") / f"ray{os.getpid()}-{name}"  # short: socket paths have a length limit
        self.temp_dirs.append(temp_dir)
        command = [
            str(BIN / "ray"), "start", "--block", *options, "--temp-dir", str(temp_dir), "--disable-usage-stats",
            "--dashboard-agent-listen-port", str(free_port()),  # its default (52365) would clash between nodes
            "--min-worker-port", "0", "--max-worker-port", "0",  # workers on random ports, no shared range
        ]
        with open(self.log_dir / f"ray-start-{name}.log", "w") as log:
            self.nodes[name] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def _wait_up(self, name: str, probe: Callable[[], T]) -> T:
        return wait_for(probe, f"ray start ({name})", 90, alive=lambda: self.nodes[name].poll() is None,
                        context=lambda: self.log(name))

    def start_head(self, num_cpus: int) -> str:
        """The head node (its dashboard, the job submission address, is ``self.dashboard``); returns its node id."""
        port, dashboard = free_port(), free_port()
        self._start("head", [
            "--head", "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
            "--ray-client-server-port", str(free_port()), "--num-cpus", str(num_cpus),
        ])
        self.gcs_address, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}"

        def api_up() -> None:
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
            except OSError as exc:
                raise LookupError(str(exc)) from exc

        self._wait_up("head", api_up)
        return self._wait_up("head", lambda: self.node_id("head"))

    def add_node(self, name: str, num_cpus: int) -> str:
        """A node joining the head, carrying a custom resource ``{name: 1}``; returns its node id."""
        self._start(name, ["--address", self.gcs_address, "--num-cpus", str(num_cpus), "--resources", json.dumps({name: 1})])
        return self._wait_up(name, lambda: self.node_id(name))

    def node_id(self, name: str) -> str:
        """The alive node started as ``name`` (LookupError until it has joined)."""
        from ray.util.state import list_nodes
        from ray.util.state.exception import RayStateApiException

        try:
            nodes = list_nodes(address=self.dashboard, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
        except (OSError, RayStateApiException) as exc:  # the state API not up yet
            raise LookupError(str(exc)) from exc
        for node in nodes:
            if (node.is_head_node if name == "head" else name in (node.resources_total or {})):
                return node.node_id
        raise LookupError(name)

    def raylet_pid(self, name: str) -> int:
        """The raylet of node ``name``: a child process of its `ray start --block`, found in /proc."""
        parent = self.nodes[name].pid
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:  # gone meanwhile
                continue
            comm, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
            if comm == "raylet" and int(fields[1]) == parent:
                return int(stat.parent.name)
        raise LookupError(f"no raylet among the children of ray start ({name}, pid {parent})")

    def stop(self, name: str) -> None:
        process = self.nodes.pop(name)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # `ray start --block` drains and stops its own processes
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # only the group this cluster started
            process.wait()

    def close(self) -> None:
        for name in reversed(list(self.nodes)):  # the head last
            self.stop(name)
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path):
    cluster = LocalCluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.close()


def submit_command(address: str, tmp_path: Path, data: Path, overrides: list[str], options: list[str] = ()) -> list[str]:
    """`ray job submit` of pipelines/train.py on the tiny LLaVA, tracked in a sqlite MLflow under ``tmp_path``."""
    settings = [
        f"data.train={data}", "data.batch_size=2",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"mlflow.artifact_location={(tmp_path / 'artifacts').as_uri()}", "mlflow.log_system_metrics=false",
        *overrides,
    ]
    return [
        str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), *options, "--",
        "python", "pipelines/train.py", "--config", "pipelines/configs/tiny-llava.yaml",
        *[part for setting in settings for part in ("--set", setting)],
    ]


BUCKET = "multinode"
STEPS, EVERY = 10, 2  # planned steps, checkpoint interval


def train_worker_nodes(dashboard: str, state: str) -> list[str]:
    """The node of every Ray Train worker actor in ``state`` (ALIVE, DEAD)."""
    from ray.util.state import list_actors
    from ray.util.state.exception import RayStateApiException

    try:
        actors = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", state)],
                             raise_on_missing_output=False)
    except (OSError, RayStateApiException) as exc:  # a busy dashboard: ask again
        raise LookupError(str(exc)) from exc
    return [actor.node_id for actor in actors]


def last_logged_step(mlflow_db: Path) -> int:
    """The newest step whose loss is in the (sqlite) MLflow store; LookupError while none is."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{mlflow_db}?mode=ro", uri=True, timeout=1)) as db:
            (step,) = db.execute("select max(step) from metrics where key = 'loss'").fetchone()
    except sqlite3.Error as exc:  # not created yet, or busy
        raise LookupError(str(exc)) from exc
    if step is None:
        raise LookupError("no step logged yet")
    return int(step)


def registered_checkpoint_step(s3) -> int:
    """The step of the newest checkpoint Ray Train has registered (its checkpoint manager's snapshot
    in the run's storage folder); LookupError before the first."""
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET, Prefix="ray/").get("Contents", [])]
    snapshots = [key for key in keys if key.endswith("/checkpoint_manager_snapshot.json")]
    if not snapshots:
        raise LookupError("no checkpoint registered yet")
    state = json.loads(s3.get_object(Bucket=BUCKET, Key=snapshots[0])["Body"].read())
    return int(state["latest_checkpoint_result"]["metrics"]["step"])


@pytest.mark.slow
@pytest.mark.multi_node
def test_training_across_two_nodes_resumes_after_one_is_lost(cluster, moto_s3, tmp_path):
    """One worker per node (STRICT_SPREAD). Between two checkpoints the second node's raylet is
    SIGKILLed (the node is gone, its worker with it) and a replacement node joins, as an autoscaler
    would start one: the job restarts its worker group on the head and the new node from the last
    checkpoint on S3 and ends at the planned step. Prints steps lost and time to resume."""
    head = cluster.start_head(num_cpus=2)  # 0.5 for a worker, the rest for Ray Data's read tasks
    second = cluster.add_node("second", num_cpus=1)
    data = tmp_path / "shards"
    write_shards(data, 2 * 2 * STEPS)  # one epoch: 2 workers x 2 rows a step (an epoch restarts the input)
    moto_s3.client.create_bucket(Bucket=BUCKET)
    command = submit_command(cluster.dashboard, tmp_path, data, [
        f"optim.steps={STEPS}", f"optim.checkpoint_every={EVERY}", "optim.log_every=1",
        "ray.num_workers=2", "ray.cpus_per_worker=0.5", "ray.placement_strategy=STRICT_SPREAD",
        f"ray.storage_path=s3://{BUCKET}/ray", "ray.max_failures=1",
    ], ["--runtime-env-json", json.dumps({"env_vars": moto_s3.env})])  # the job's S3 (moto) settings

    def spread_group() -> list[str]:
        nodes = train_worker_nodes(cluster.dashboard, "ALIVE")
        if len(nodes) < 2:
            raise LookupError(nodes)
        return nodes

    def past_a_checkpoint() -> int:  # a checkpoint registered and training gone on beyond it
        step = registered_checkpoint_step(moto_s3.client)
        if last_logged_step(tmp_path / "mlflow.db") <= step:
            raise LookupError(step)
        return step

    job_log = tmp_path / "job.log"
    with open(job_log, "w") as log:
        job = subprocess.Popen(command, env=cluster.env, stdout=log, stderr=subprocess.STDOUT)
    running, output = (lambda: job.poll() is None), job_log.read_text
    try:
        assert sorted(wait_for(spread_group, "the worker group", 480, running, output)) == sorted([head, second])
        checkpointed = wait_for(past_a_checkpoint, "a step after a checkpoint", 480, running, output)
        raylet = cluster.raylet_pid("second")
        killed_at = time.time()
        os.kill(raylet, signal.SIGKILL)
        # its `ray start --block` sees the raylet die, ends the node's other processes and exits
        assert cluster.nodes["second"].wait(timeout=30) != 0, cluster.log("second")[-2000:]
        cluster.stop("second")
        replacement = cluster.add_node("replacement", num_cpus=1)
        joined = time.time() - killed_at
        assert job.wait(timeout=600) == 0, output()[-4000:]
    finally:
        if running():
            job.kill()  # the submitting client only; the job itself ends with the cluster
            job.wait()
    text = output()
    assert "succeeded" in text, text[-4000:]
    # the driver registered the final scorer, once, after the restart
    assert "registered autoselect-tiny-llava version 1" in text, text[-4000:]
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as db:
        assert db.execute("select name, version from model_versions").fetchall() == [("autoselect-tiny-llava", 1)]
    # both groups were spread: the first over head + second, the restarted one over head + replacement
    assert set(filter(None, train_worker_nodes(cluster.dashboard, "DEAD"))) == {head, second, replacement}

    from mlflow.tracking import MlflowClient

    run_id = re.search(r"MLflow run (\w+) at", text).group(1)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # every logged step carries the step its group resumed from: -1 for the first group
    history = sorted(client.get_metric_history(run_id, "resumed_from_step"), key=lambda m: (m.timestamp, m.step))
    before = [m for m in history if m.value < 0]
    after = [m for m in history if m.value >= 0]
    assert before and after, [(m.step, m.value) for m in history]
    resumed = int(after[0].value)
    assert {int(m.value) for m in after} == {resumed}  # one restart
    assert client.get_run(run_id).data.tags["resumed_from_step"] == str(resumed)
    killed_step = max(m.step for m in before)  # the last step the first group finished
    assert checkpointed <= resumed <= killed_step < STEPS and resumed % EVERY == 0
    assert after[0].step == resumed + 1  # training went on from the checkpoint's step
    assert sorted({m.step for m in client.get_metric_history(run_id, "loss")}) == list(range(1, STEPS + 1))
    assert max(m.step for m in after) == STEPS
    time_to_resume = after[0].timestamp / 1000 - killed_at
    print(f"\ntwo nodes, second node's raylet killed after step {killed_step} of {STEPS}: resumed from the "
          f"step-{resumed} checkpoint, {killed_step - resumed} step(s) lost; first step after the restart "
          f"{time_to_resume:.1f} s after the kill (replacement node joined after {joined:.1f} s)")
