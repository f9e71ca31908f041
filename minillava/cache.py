"""Build a folder once per set of inputs: a manifest records what it was built from.

A folder is rebuilt only when the recorded inputs differ (or it has no manifest), and it is built
in a sibling staging folder that replaces it at the end, so an interrupted build never leaves a
folder that looks finished. Processes on one machine that want the same folder at once (two Serve
replicas, two Ray Train workers resolving the built-in mini-LLaVA) take turns on a lock file beside
it: one builds, the others then find the manifest and reuse the folder.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

MANIFEST_NAME = "build_manifest.json"


@dataclass(frozen=True)
class Built:
    path: Path
    rebuilt: bool
    inputs: dict[str, Any]


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST_NAME
    return json.loads(path.read_text()) if path.is_file() else None


@contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``directory`` (released when the process ends, whatever happens)."""
    with open(directory.parent / f".{directory.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_build(directory: str | Path, inputs: dict[str, Any], build: Callable[[Path], Any], force: bool = False) -> Built:
    """``build(staging_dir)`` unless ``directory`` was already built from exactly ``inputs``."""
    directory = Path(directory)
    inputs = json.loads(json.dumps(inputs))  # compare in the form the manifest stores
    manifest = read_manifest(directory)
    if not force and manifest is not None and manifest.get("inputs") == inputs:
        return Built(directory, False, inputs)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(directory):
        manifest = read_manifest(directory)  # another process may have built it while we waited
        if not force and manifest is not None and manifest.get("inputs") == inputs:
            return Built(directory, False, inputs)
        if directory.exists() and manifest is None and any(directory.iterdir()):
            raise FileExistsError(f"{directory} is not empty and was not made by this build; refusing to overwrite it")

        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".partial", dir=directory.parent))
        staging.chmod(0o755)  # mkdtemp makes it private; the result is a normal shared folder
        try:
            started = time.perf_counter()
            build(staging)
            record = {"inputs": inputs, "build_seconds": round(time.perf_counter() - started, 2)}
            (staging / MANIFEST_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            if directory.exists():
                shutil.rmtree(directory)
            staging.rename(directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return Built(directory, True, inputs)
