"""How every experiment writes its JSON result (``--out``): one format, parent folders made."""

from __future__ import annotations

import json
from pathlib import Path


def write_result(out: str | Path | None, result: dict) -> None:
    """Write ``result`` as indented JSON to ``out`` (nothing when ``out`` is empty)."""
    if not out:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
