"""The gateway's K tgtd processes as one ``LocalTargets`` (reconcile.py): a TgtdPool whose
placements are kept in a file on the gateway host (it has no database), and whose failures
stay with one process: a target on a dead tgtd is reported failed (the server's plans skip
this gateway for it) while the other processes' targets stay applied and the gateway keeps
heartbeating."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bmi_server.adapters.tgt.pool import TgtdPool
from bmi_server.adapters.tgt.tgtadm import LiveTarget
from bmi_server.core.errors import FailedPrecondition, Unavailable
from bmi_server.core.models import TargetSpec

R = TypeVar("R")


class FilePlacements:
    """PlacementStore in a JSON file (iqn -> process), rewritten whole (write, fsync,
    rename) on every change: a gateway holds hundreds of targets, not millions."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._map: dict[str, int] = self._load()

    def _load(self) -> dict[str, int]:
        """The file's placements; none if there is no file. Anything but an object of
        IQNs to process numbers (0, 1...) is refused, not guessed at."""
        try:
            loaded = json.loads(self._path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise self._unusable(str(exc)) from None
        if not isinstance(loaded, dict):
            raise self._unusable("not a JSON object")
        for iqn, process in loaded.items():
            if isinstance(process, bool) or not isinstance(process, int) or process < 0:
                raise self._unusable(f"{iqn!r} is placed on {process!r}, not a process number")
        return loaded

    def _unusable(self, why: str) -> FailedPrecondition:
        return FailedPrecondition(
            f"placement_file {self._path} is unusable ({why}): move it away and bmi-gateway "
            "finds each target on the tgtd process that exports it")

    def _save(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(self._map, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path)

    def placement(self, iqn: str) -> int | None:
        with self._lock:
            return self._map.get(iqn)

    def place(self, iqn: str, process: int) -> int:
        with self._lock:
            if iqn not in self._map:
                self._map[iqn] = process
                self._save()
            return self._map[iqn]

    def unplace(self, iqn: str) -> None:
        with self._lock:
            if self._map.pop(iqn, None) is not None:
                self._save()

    def placements(self) -> dict[str, int]:
        with self._lock:
            return dict(self._map)

    def placement_counts(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for process in self.placements().values():
            counts[process] = counts.get(process, 0) + 1
        return counts


class GatewayTgtds(TgtdPool):
    """A pool with the extra calls bmi-gateway makes (``LocalTargets``)."""

    def live_targets(self) -> dict[str, LiveTarget]:
        """Every process's targets (a target's own process wins over a stray copy);
        Unavailable only if no process answers."""
        placed = self._store.placements()
        merged: dict[str, LiveTarget] = {}
        answered = 0
        last: Unavailable | None = None
        for process in range(self.processes):
            try:
                live = self.driver(process).live_targets()
            except Unavailable as exc:
                last = exc
                continue
            answered += 1
            for iqn, target in live.items():
                if iqn not in placed and process:
                    # Found where it runs though unrecorded (placements file lost): keep it.
                    placed[iqn] = self._store.place(iqn, process)
                if placed.get(iqn, 0) == process or iqn not in merged:
                    merged[iqn] = target
        if not answered and last is not None:
            raise last
        return merged

    def backing_store(self, spec: TargetSpec) -> str:
        return self.driver(0).backing_store(spec)

    def unbind_initiator(self, iqn: str, entry: str) -> None:
        self._alone(lambda: self.driver(self.placement(iqn)).unbind_initiator(iqn, entry))

    def unbind_account(self, iqn: str, user: str) -> None:
        self._alone(lambda: self.driver(self.placement(iqn)).unbind_account(iqn, user))

    def create_export(self, spec: TargetSpec) -> None:
        self._alone(lambda: super(GatewayTgtds, self).create_export(spec))

    def remove_export(self, iqn: str) -> None:
        self._alone(lambda: super(GatewayTgtds, self).remove_export(iqn))

    def _alone(self, call: Callable[[], R]) -> R:
        """Unavailable from one process becomes that target's failure while another
        process answers (reconcile.apply stops at Unavailable: the whole tgtd is gone)."""
        try:
            return call()
        except Unavailable as exc:
            if self.processes > 1 and any(self._answers(p) for p in range(self.processes)):
                raise FailedPrecondition(f"its tgtd process is down: {exc.message}") from None
            raise

    def _answers(self, process: int) -> bool:
        try:
            self.driver(process).sessions()
        except Unavailable:
            return False
        return True
