"""Shared measuring helpers: every figure is a ratio to a baseline from the same run."""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
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


@contextlib.contextmanager
def thread_budget(threads: int) -> Iterator[None]:
    """Raise the kernel's thread limits (root) so ``threads`` more fit, as
    contrib/sysctl.d/90-bmi-tgt.conf does on a BMI host; put them back afterwards.

    Each LUN in tgtd is a Ceph client with its threads: a series of 1000 nodes needs more
    thread ids than Linux's default pid_max (32768), which every process here shares."""
    limits = {name: Path(f"/proc/sys/kernel/{name}") for name in ("pid_max", "threads-max")}
    before = {name: int(path.read_text()) for name, path in limits.items()}
    wanted = max(32768, threads * 2)
    raised = {}
    for name, path in limits.items():
        if before[name] < wanted:
            try:
                path.write_text(str(wanted))
                raised[name] = before[name]
            except OSError as e:
                print(f"bench: cannot raise kernel.{name} to {wanted} ({e}); "
                      "large series may run out of threads", flush=True)
    if raised:
        print(f"bench: raised {', '.join(f'kernel.{n}' for n in raised)} to {wanted} "
              "for this run", flush=True)
    try:
        yield
    finally:
        for name, value in raised.items():
            with contextlib.suppress(OSError):
                limits[name].write_text(str(value))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU time of this process's finished children (e.g. qemu-img runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def with_cpu(pid: int, call: Callable[[], T]) -> tuple[T, float]:
    """``call()``'s result and the CPU seconds process ``pid`` used meanwhile."""
    before = cpu_seconds(pid)
    result = call()
    return result, cpu_seconds(pid) - before
