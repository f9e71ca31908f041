"""Training-free visual-token pruning baselines behind one interface, so an evaluation run can
compare them with AutoSelect on the same batches.

Every pruner wraps one VLM instance (nothing is patched process-wide) and offers
``forward(budget=None, **batch)``, ``generate(budget=None, **batch, ...)``, ``default_budget`` and
``last_selection`` (a `Selection`: K sorted indices per image). The pre-LLM ones (random, uniform,
pooled, visionzip, divprune) are `PrunedVLM`s, like `AutoSelectModel` at inference; FastV acts inside the
LLM (see its module for how its outputs differ). AutoSelect needs trained weights, so the caller
builds it with ``AutoSelectModel.from_pretrained(directory, vlm)``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from autoselect.pruned import PrunedVLM
from autoselect.pruners.divprune import DivPrune
from autoselect.pruners.fastv import FastV
from autoselect.pruners.pooled import PooledGrid
from autoselect.pruners.random import RandomPruner
from autoselect.pruners.uniform import UniformPruner
from autoselect.pruners.visionzip import VisionZip

Pruner = PrunedVLM | FastV

PRUNERS: dict[str, type[PrunedVLM] | type[FastV]] = {
    "random": RandomPruner,
    "uniform": UniformPruner,
    "pooled": PooledGrid,
    "fastv": FastV,
    "visionzip": VisionZip,
    "divprune": DivPrune,
}


def available_pruners() -> list[str]:
    return sorted(PRUNERS)


def build_pruner(name: str, vlm: nn.Module, budget: int | float, **kwargs: Any) -> Pruner:
    """The baseline ``name`` on ``vlm`` keeping ``budget`` visual tokens per image (K or a ratio of N),
    in eval mode. ``kwargs`` go to its class (e.g. ``seed``, ``layer``, ``contextual_ratio``)."""
    if name == "autoselect":
        raise ValueError("AutoSelect is trained, not a baseline: use AutoSelectModel.from_pretrained(directory, vlm)")
    if name not in PRUNERS:
        raise ValueError(f"unknown pruner {name!r}; available: {', '.join(available_pruners())}")
    return PRUNERS[name](vlm, budget, **kwargs).eval()


__all__ = [
    "PRUNERS",
    "DivPrune",
    "FastV",
    "PooledGrid",
    "Pruner",
    "RandomPruner",
    "UniformPruner",
    "VisionZip",
    "available_pruners",
    "build_pruner",
]
