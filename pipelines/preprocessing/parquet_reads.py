"""``ray.data.read_parquet`` with a footer-reader pool sized for our inputs, not for a large cluster.

Ray Data (2.60) lists a parquet read's files by reading their footers on a pool of actors it starts
for every execution of the read (each epoch, each restarted attempt): 32 by default, each a Python
process that costs ~3 CPU-s to start. On a small cluster reading a few shards that is most of the
read's cost: a two-node training test ran 29 of them for one parquet file (95 CPU-s). One actor
drives up to 128 footer reads at once (Ray's I/O concurrency per actor), ample for the shard counts
preprocessing writes. Ray reads the pool size only from the environment of the process that plans
the read, so it is set around the call; a ``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`` the user has set
is left as it is (for a read of many thousands of files on a large cluster).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import ray.data

FOOTER_READERS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FOOTER_READERS = 1


def read_parquet(paths: str | list[str], **kwargs: Any) -> ray.data.Dataset:
    """``ray.data.read_parquet(paths, **kwargs)`` whose executions read footers on ``FOOTER_READERS`` actors."""
    if FOOTER_READERS_ENV in os.environ:
        return ray.data.read_parquet(paths, **kwargs)
    # Ray also reads the variable once, into its module default, when the indexer's module is first
    # imported: import it before setting it, or every later read in this process would take ours
    importlib.import_module("ray.data._internal.datasource_v2.formats.parquet.footer_file_indexer")
    os.environ[FOOTER_READERS_ENV] = str(FOOTER_READERS)
    try:
        return ray.data.read_parquet(paths, **kwargs)
    finally:
        os.environ.pop(FOOTER_READERS_ENV, None)
