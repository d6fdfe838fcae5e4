"""TargetDriver and PortalSource over K tgtd processes on one host.

One tgtd adds LUNs one at a time in its single management thread, and an idle tgtd's CPU
grows faster than its rbd LUNs (docs/capacity.md): both are per process, so a host runs
K tgtds, each with its own portal and control socket, and this pool spreads targets over
them.

- **Placement.** A new target goes to the process with the fewest targets among the first
  ``active`` (ties: the lowest index) and stays there: the placement is recorded (the
  ``PlacementStore``, the database in local mode) *before* the target is made, so every
  replica and every restart finds it, and removed *after* the target is gone. A target
  without a record is on process 0, where a site that ran one tgtd had all of them; the
  audit writes those records.
- **K changes.** More processes: new targets fill the new ones. Fewer: processes beyond
  ``active`` that still hold placements keep being driven (the caller runs them; see
  ``processes_needed``) but get no new targets; they drain as nodes are deprovisioned.
- **Failure of one process** is its targets' alone: the audit, the session poll and the
  sweep go on for the others, and the audit re-creates a restarted process's targets on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from bmi_server.core.errors import BmiError, FailedPrecondition, Unavailable
from bmi_server.core.models import TargetSpec

from .tgtadm import TgtTargetDriver

log = logging.getLogger(__name__)


class PlacementStore(Protocol):
    """Which process exports each target (production: adapters/sql/placement_store.py)."""

    def placement(self, iqn: str) -> int | None: ...

    def place(self, iqn: str, process: int) -> int:
        """Record ``iqn`` on ``process`` unless it is placed already; the placement."""

    def unplace(self, iqn: str) -> None: ...

    def placements(self) -> dict[str, int]: ...

    def placement_counts(self) -> dict[int, int]: ...


def processes_needed(active: int, counts: dict[int, int]) -> int:
    """How many processes must run: ``active``, or more while a process beyond it still
    holds targets (K was lowered)."""
    return max([active, *(p + 1 for p, n in counts.items() if n)])


class TgtdPool:
    """``drivers[i]`` drives process i; ``advertised[i]`` are the portals nodes reach it
    at. New targets go to processes ``0..active-1``."""

    def __init__(
        self,
        drivers: Sequence[TgtTargetDriver],
        advertised: Sequence[Sequence[str]],
        store: PlacementStore,
        active: int | None = None,
    ) -> None:
        if not drivers or len(advertised) != len(drivers):
            raise ValueError("one list of advertised portals per tgtd process")
        self._drivers = list(drivers)
        self._advertised = [list(p) for p in advertised]
        self._store = store
        self._active = min(active or len(drivers), len(drivers))
        # One process: every target is process 0's without a record, so none is written
        # (no statement added to a provision or a boot script); K raised later still works.
        self._single = len(self._drivers) == 1

    @property
    def processes(self) -> int:
        return len(self._drivers)

    def driver(self, process: int) -> TgtTargetDriver:
        return self._drivers[process]

    # --- placement ------------------------------------------------------------------------

    def placement(self, iqn: str) -> int:
        """The process that exports (or is to export) ``iqn``; 0 if none was recorded."""
        if self._single:
            return 0
        process = self._store.placement(iqn)
        return 0 if process is None else process

    def _driver_of(self, process: int) -> TgtTargetDriver:
        if not 0 <= process < len(self._drivers):
            raise FailedPrecondition(
                f"a target is placed on tgtd process {process}, but only {len(self._drivers)} "
                "run here: raise tgtd_processes (targets never move between processes)")
        return self._drivers[process]

    # --- TargetDriver ---------------------------------------------------------------------

    def create_export(self, spec: TargetSpec) -> None:
        if self._single:
            self._drivers[0].create_export(spec)
            return
        recorded = self._store.placement(spec.iqn)
        if recorded is not None:
            self._driver_of(recorded).create_export(spec)
            return
        counts = self._store.placement_counts()
        order = sorted(range(self._active), key=lambda p: (counts.get(p, 0), p))
        for attempt, choice in enumerate(order):
            process = self._store.place(spec.iqn, choice)
            try:
                self._driver_of(process).create_export(spec)
                return
            except BaseException as exc:
                if process != choice:
                    raise  # another replica's placement: its own to undo
                self._unplace_quietly(spec.iqn)
                # A dead process must not fail provisionings the others can take.
                if not isinstance(exc, Unavailable) or attempt == len(order) - 1:
                    raise
                log.warning("tgtd process %d is down; placing %s on the next", process,
                            spec.iqn)

    def _unplace_quietly(self, iqn: str) -> None:
        try:
            self._store.unplace(iqn)
        except BmiError:
            log.warning("placement of %s left behind (dropped with the target)", iqn)

    def remove_export(self, iqn: str) -> None:
        if self._single:
            self._drivers[0].remove_export(iqn)
            self._store.unplace(iqn)  # a record left from when K was larger
            return
        recorded = self._store.placement(iqn)
        process = 0 if recorded is None else recorded
        if process < len(self._drivers):
            self._drivers[process].remove_export(iqn)
        # Target first, record last: a crash in between leaves a record of nothing, which
        # the next remove (reconcile repeats it) drops.
        if recorded is not None:
            self._store.unplace(iqn)

    def ensure_exports(
        self,
        specs: Iterable[TargetSpec],
        still_wanted: Callable[[str], bool] | None = None,
    ) -> list[str]:
        specs = list(specs)
        if self._single:
            return self._drivers[0].ensure_exports(specs, still_wanted)
        placed = self._store.placements()
        groups: dict[int, list[TargetSpec]] = {p: [] for p in range(len(self._drivers))}
        problems: list[str] = []
        for spec in specs:
            process = placed.get(spec.iqn)
            if process is None:
                # Made before placements were recorded (one tgtd): it is on process 0.
                process = self._store.place(spec.iqn, 0)
            if process >= len(self._drivers):
                problems.append(f"{spec.iqn} is placed on tgtd process {process}, which "
                                "does not run here")
                continue
            groups[process].append(spec)
        strays: list[str] = []
        down: list[str] = []
        for process, group in groups.items():
            try:
                strays += self._drivers[process].ensure_exports(group, still_wanted)
            except Unavailable as exc:  # that process alone: the others go on
                down.append(f"tgtd process {process}: {exc.message}")
            except FailedPrecondition as exc:
                problems.append(f"tgtd process {process}: {exc.message}")
        if down:
            raise Unavailable("; ".join(down + problems))
        if problems:
            raise FailedPrecondition("; ".join(problems))
        return sorted(set(strays))

    def list_exports(self) -> list[str]:
        exports: set[str] = set()
        for driver in self._drivers:
            exports.update(driver.list_exports())
        return sorted(exports)

    def portals(self) -> list[str]:
        """Every process's advertised portals (for logs; nodes get ``portals_for``)."""
        return [p for portals in self._advertised for p in portals]

    def advertised(self) -> list[list[str]]:
        """The advertised portals of each process."""
        return [list(p) for p in self._advertised]

    def has_session(self, iqn: str) -> bool:
        process = self.placement(iqn)
        if process >= len(self._drivers):
            return False
        try:
            return self._drivers[process].has_session(iqn)
        except Unavailable:
            return False  # that tgtd is down: nobody is logged in to it

    def sessions(self) -> set[str]:
        """Logged-in targets of every process that answers; Unavailable only if none does
        (a dead tgtd's sessions are over: its TCP connections closed with it)."""
        live: set[str] = set()
        answered = 0
        last: Unavailable | None = None
        for driver in self._drivers:
            try:
                live |= driver.sessions()
                answered += 1
            except Unavailable as exc:
                last = exc
        if not answered and last is not None:
            raise last
        return live

    # --- PortalSource ---------------------------------------------------------------------

    def portals_for(self, iqn: str) -> list[str]:
        process = self.placement(iqn)
        return list(self._advertised[process]) if process < len(self._advertised) else []

    # --- metrics --------------------------------------------------------------------------

    def process_targets(self) -> list[int | None]:
        """BMI's targets each process holds now (None: it does not answer)."""
        counts: list[int | None] = []
        for driver in self._drivers:
            try:
                counts.append(len(driver.list_exports()))
            except Unavailable:
                counts.append(None)
        return counts
