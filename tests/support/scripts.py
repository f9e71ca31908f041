"""Load a repository script (experiments/, bench/) as a module, to call its functions in-process:
scripts are not packages, so they cannot be imported by name."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent.parent


def load_script(relative: str) -> ModuleType:
    """The module of ``ROOT / relative`` (e.g. ``"experiments/compare_scorers.py"``), executed once per call,
    with its folder importable as when it runs as a script (experiments import their siblings)."""
    path = ROOT / relative
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
