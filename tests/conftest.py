"""Session fixtures shared by the test files: a local Ray cluster, an in-process S3, a tiny LLaVA.

Each is started once per session and stopped by exactly the handle that started it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

# What `dtype: auto` assumes of the CPU, pinned for the whole suite (and the Ray workers and
# subprocesses it starts, which inherit it): float32, as on an AVX2-only CPU, so no outcome depends
# on whether the machine has native bf16. `AUTOSELECT_CPU_BF16=1 make test` runs it the other way.
os.environ.setdefault("AUTOSELECT_CPU_BF16", "0")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the tree under test first, whichever checkout the venv installed
    sys.path.insert(0, str(ROOT))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The multi-node tests first: they start clusters of their own, which would otherwise share the
    2 CPUs with the session's local Ray (``ray_local``), whose idle processes use about a tenth of
    them once Ray Data has run."""
    items.sort(key=lambda item: item.get_closest_marker("multi_node") is None)  # stable: order kept


@pytest.fixture(scope="session")
def ray_local() -> Iterator[Any]:
    """One 2-CPU local Ray instance for the session (worker start-up dominates Ray test time)."""
    import ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process; ray_local owns the cluster")
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        runtime_env={"env_vars": {"PYTHONPATH": python_path}},  # workers import pipelines/ whatever the cwd
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass(frozen=True)
class MotoS3:
    """A running moto S3 server: its endpoint, a boto3 client and the (fake) credentials."""

    endpoint_url: str
    client: Any
    access_key: str = "testing"
    secret_key: str = "testing"
    region: str = "us-east-1"

    @property
    def env(self) -> dict[str, str]:
        """AWS variables a test can apply with ``monkeypatch.setenv`` (the fixture sets none)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """An in-memory S3 on 127.0.0.1 with a free port; no environment variable is changed."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        yield MotoS3(endpoint_url=endpoint, client=client)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """A saved tiny LLaVA (model + processor) folder, built offline once per session."""
    from autoselect.testing import save_tiny_llava

    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))
