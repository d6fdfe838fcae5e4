"""Shared measuring helpers: every figure is a ratio to a baseline from the same run."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

FULL = os.environ.get("BENCH_SCALE", "quick") == "full"


def scale(quick, full):
    return full if FULL else quick


@dataclass
class Figure:
    """One row of the results table."""

    benchmark: str
    metric: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    goal: str = ""
    ok: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.value / self.baseline if self.baseline else None

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


@dataclass
class Results:
    figures: list[Figure] = field(default_factory=list)
    series: dict[str, dict[str, list[tuple[float, float]]]] = field(default_factory=dict)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        print(f"  {figure.benchmark}: {figure.metric} = {figure.value:.4g} {figure.unit}"
              + (f" (x{figure.ratio:.2f} of {figure.baseline_name})" if figure.ratio else ""),
              flush=True)
        return figure


def timed(call: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def window(values: list[float], end: int, size: int = 10) -> float:
    """Median cost of the ``size`` operations ending at the ``end``-th (1-based)."""
    return median(values[max(0, end - size) : end])
