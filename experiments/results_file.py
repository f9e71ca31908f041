"""How every experiment writes its JSON result (``--out``): one format, parent folders made, and
one way to summarise a measure in it."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pipelines.evaluation.stats import stderr_of_mean


def mean_se(values: list[float]) -> dict[str, float | None]:
    """Mean, standard error and count of the defined (non-NaN) values; None where undefined."""
    kept = [v for v in values if not math.isnan(v)]
    stderr = stderr_of_mean(kept)
    return {"mean": round(sum(kept) / len(kept), 4) if kept else None,
            "stderr": None if stderr is None else round(stderr, 4), "n": len(kept)}


def write_result(out: str | Path | None, result: dict) -> None:
    """Write ``result`` as indented JSON to ``out`` (nothing when ``out`` is empty)."""
    if not out:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
