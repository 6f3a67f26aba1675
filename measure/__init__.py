"""Statistics shared by every benchmark, load test and lab report: one definition each.

This package sits on the ground floor: it imports nothing of qmig's, so the broker's
benchmarks, the load tests and the migration reports all compute their p95/p99 the same way
and their published figures can be compared.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float | None:
    """The nearest-rank percentile: the smallest value with at least ``q`` % of values <= it.

    ``q`` is in 0..100 (0 gives the minimum, 100 the maximum); None when there are no
    values.  Nearest rank reports a value that was really observed (no interpolation), the
    usual choice for latency; ``values`` need not be sorted.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in 0..100, not {q}")
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def distribution(values: Iterable[float], digits: int = 3) -> dict[str, float | int | None]:
    """Count, minimum, p50, p90, p99 and maximum of ``values``, rounded to ``digits``."""
    ordered = sorted(values)

    def at(q: float) -> float | None:
        value = percentile(ordered, q)
        return None if value is None else round(value, digits)

    return {"n": len(ordered), "min": at(0), "p50": at(50), "p90": at(90), "p99": at(99),
            "max": at(100)}  # fmt: skip
