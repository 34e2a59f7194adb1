"""Percentiles and summaries shared by generators and the report."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

PERCENTILES = (50.0, 75.0, 90.0, 95.0, 99.0, 99.9)


def percentile(ordered: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile of sorted values (nearest rank); NaN when empty."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def latency_summary(samples_ns: Sequence[int]) -> dict[str, Any]:
    """Latency samples (ns) → count, mean and percentiles in milliseconds."""
    ordered = sorted(samples_ns)
    out: dict[str, Any] = {"count": len(ordered)}
    if not ordered:
        return out
    out["mean_ms"] = statistics.fmean(ordered) / 1e6
    for pct in PERCENTILES:
        out[f"p{pct:g}_ms"] = percentile(ordered, pct) / 1e6
    out["max_ms"] = ordered[-1] / 1e6
    out["min_ms"] = ordered[0] / 1e6
    return out


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max, and quartiles of one figure across rounds."""
    clean = sorted(v for v in values if not math.isnan(v))
    if not clean:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    q1, q3 = (
        (clean[0], clean[-1])
        if len(clean) < 4
        else tuple(statistics.quantiles(clean, n=4, method="inclusive")[i] for i in (0, 2))
    )
    return {
        "median": statistics.median(clean),
        "min": clean[0],
        "max": clean[-1],
        "q1": q1,
        "q3": q3,
        "n": len(clean),
    }
