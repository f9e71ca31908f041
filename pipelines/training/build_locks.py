"""A warning for the one silent hang of DeepSpeed on CPU: a stale op-build lock.

``deepspeed.init_distributed`` on CPU JIT-builds its shared-memory op (``deepspeed_shm_comm``)
through torch's ``cpp_extension``, which waits, without a timeout or a line of output, for the
``lock`` file of any build in progress. A build that was killed (a timed-out test, Ctrl-C) leaves
that file behind and every later run waits forever. A live build holds it for about a minute, so
a lock older than ``STALE_AFTER_S`` is named, with what to do, before the wait starts.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

OP = "deepspeed_shm_comm"
STALE_AFTER_S = 300.0


def build_lock(name: str = OP) -> Path:
    """Where torch's ``cpp_extension`` keeps the build lock of op ``name`` (TORCH_EXTENSIONS_DIR or
    its default root, as ``torch.utils.cpp_extension`` resolves it)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False)) / "lock"


def warn_if_stale() -> str | None:
    """Warn (and return the message) when the build lock exists and was last touched over STALE_AFTER_S ago."""
    lock = build_lock()
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return None
    if age < STALE_AFTER_S:
        return None
    message = (f"{lock} is {age / 60:.0f} min old: DeepSpeed's op build will wait for it forever. It is left "
               f"behind by a build that was killed; if no other process on this machine is building {OP}, "
               f"delete it (rm {lock}).")
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    print(f"WARNING: {message}", flush=True)
    return message
