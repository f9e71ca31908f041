"""Standard errors over examples, as lmms-eval reports them next to every score."""

from __future__ import annotations

import math
from typing import Sequence


def stderr_of_mean(values: Sequence[float]) -> float | None:
    """Sample standard deviation of ``values`` over sqrt(n); None below 2 values (undefined)."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def stderr_of_ratio(numerators: Sequence[float], denominators: Sequence[float]) -> float | None:
    """Standard error of ``sum(numerators) / sum(denominators)`` (a token-weighted mean) by the
    delta method, so examples with more tokens weigh as they do in the ratio itself."""
    n = len(numerators)
    if n < 2:
        return None
    ratio = sum(numerators) / sum(denominators)
    residuals = [a - ratio * b for a, b in zip(numerators, denominators)]
    return stderr_of_mean(residuals) / (sum(denominators) / n)
