"""Gateway mode: iSCSI targets served by `bmi-gateway` daemons on gateway hosts.

The server never touches a tgtd here. It keeps the *desired* targets of every gateway in
the state store, each disk assigned to ``replicas`` gateways (the least loaded live ones),
and the gateways follow that set over a watch stream and report back. Everything goes
through the store, so any server replica can serve any gateway.

- Revisions: every change of a gateway's desired set gets the next value of one global
  counter. A watch starts with a snapshot (``reset``) at the current revision and then
  sends changes after it; a gateway reconnecting with the revision it has resumes there
  unless removals it missed were pruned meanwhile, in which case it gets a snapshot again.
- Liveness: a gateway is live while its last heartbeat is younger than ``expiry_seconds``.
  Boot plans list only live gateways that reported the target applied. A gateway that
  restarts (a new ``incarnation``) has its targets marked pending until it reports again.
- Provision: ``create_export`` returns once at least one assigned gateway reports the target
  applied, and fails (the provisioner rolls back) when all report failure or none does
  within ``apply_timeout_seconds``. ``remove_export`` returns once every live assigned
  gateway confirmed the removal (the disk's volume can be deleted only after tgtd closed it).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from .errors import FailedPrecondition, InvalidArgument, Unavailable
from .models import (
    Assignment,
    ExportStatus,
    Gateway,
    TargetReport,
    TargetSpec,
    WatchBatch,
    utcnow,
)
from .ports import GatewayStateStore

log = logging.getLogger(__name__)

_GATEWAY_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{0,62}")
_PORTAL = re.compile(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}")
MAX_PORTALS = 64  # a gateway with several tgtd processes has a portal (or a few) each
MAX_DETAIL = 300


def check_gateway_name(name: str) -> str:
    if not _GATEWAY_NAME.fullmatch(name or ""):
        raise InvalidArgument(
            f"gateway name {name[:80]!r} is invalid: lower-case letters, digits, '.' and '-'"
        )
    return name


def check_portals(portals: Iterable[str]) -> tuple[str, ...]:
    portals = tuple(portals)
    if not portals:
        raise InvalidArgument("a gateway must announce at least one portal (host:port)")
    if len(portals) > MAX_PORTALS:
        raise InvalidArgument(f"at most {MAX_PORTALS} portals per gateway")
    for portal in portals:
        if not _PORTAL.fullmatch(portal) or not 0 < int(portal.rpartition(":")[2]) < 65536:
            raise InvalidArgument(f"portal {portal[:80]!r} is not host:port")
    return portals


class ChangeSignal:
    """Wakes waiters in this process when desired targets or reports change. Other server
    replicas' changes are seen by polling the store (``poll_seconds``)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0

    def notify(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    @property
    def generation(self) -> int:
        return self._generation

    def wait(self, seen: int, timeout: float) -> int:
        with self._cond:
            self._cond.wait_for(lambda: self._generation != seen, timeout)
            return self._generation


@dataclass
class GatewayPolicy:
    replicas: int = 2
    heartbeat_seconds: float = 5.0
    expiry_seconds: float = 15.0
    apply_timeout_seconds: float = 30.0
    poll_seconds: float = 1.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise InvalidArgument("gateway_replicas must be at least 1")
        if self.expiry_seconds <= self.heartbeat_seconds:
            raise InvalidArgument("gateway_expiry_seconds must exceed gateway_heartbeat_seconds")


@dataclass
class GatewayExports:
    """The TargetDriver of gateway mode, and where nodes are told to log in."""

    store: GatewayStateStore
    policy: GatewayPolicy = field(default_factory=GatewayPolicy)
    signal: ChangeSignal = field(default_factory=ChangeSignal)
    clock: Callable[[], datetime] = utcnow
    monotonic: Callable[[], float] = time.monotonic

    # -- liveness and placement ----------------------------------------------------------

    def live_gateways(self) -> dict[str, Gateway]:
        horizon = self.clock() - timedelta(seconds=self.policy.expiry_seconds)
        return {g.name: g for g in self.store.list_gateways() if g.heartbeat_time > horizon}

    def _place(self, live: dict[str, Gateway], exclude: Iterable[str] = ()) -> list[str]:
        """The least-loaded live gateways (ties by name), up to ``replicas``."""
        load = self.store.load()
        skip = set(exclude)
        ranked = sorted((load.get(n, 0), n) for n in live if n not in skip)
        return [name for _, name in ranked[: self.policy.replicas]]

    # -- TargetDriver ------------------------------------------------------------------------

    def create_export(self, spec: TargetSpec) -> None:
        live = self.live_gateways()
        current = [a for a in self.store.assignments(spec.iqn) if not a.removed]
        gateways = [a.gateway for a in current] or self._place(live)
        if not gateways:
            raise Unavailable("no live iSCSI gateway to export the disk through")
        self.store.assign(spec, gateways)
        self.signal.notify()
        self._wait_applied(spec.iqn)

    def _wait_applied(self, iqn: str) -> None:
        deadline = self.monotonic() + self.policy.apply_timeout_seconds
        seen = self.signal.generation
        while True:
            rows = [a for a in self.store.assignments(iqn) if not a.removed]
            if any(a.status is ExportStatus.APPLIED for a in rows):
                return
            live = self.live_gateways()
            hopeful = [a for a in rows if a.gateway in live and a.status is ExportStatus.PENDING]
            if not hopeful:  # every assigned gateway failed it or died: waiting is pointless
                raise FailedPrecondition(
                    f"no gateway could export {iqn}: " + _describe(rows, live)
                )
            left = deadline - self.monotonic()
            if left <= 0:
                raise Unavailable(
                    f"no gateway exported {iqn} within {self.policy.apply_timeout_seconds:g} s "
                    f"({_describe(rows, live)})"
                )
            seen = self.signal.wait(seen, min(left, self.policy.poll_seconds))

    def remove_export(self, iqn: str) -> None:
        if not self.store.assignments(iqn):
            return
        self.store.unassign(iqn)
        self.signal.notify()
        deadline = self.monotonic() + self.policy.apply_timeout_seconds
        seen = self.signal.generation
        while True:
            live = self.live_gateways()
            waiting = [a for a in self.store.assignments(iqn) if a.gateway in live]
            if not waiting:
                return  # dead gateways' tgtds are gone with them; they re-converge on return
            left = deadline - self.monotonic()
            if left <= 0:
                raise Unavailable(
                    f"gateways {', '.join(a.gateway for a in waiting)} did not remove {iqn} "
                    f"within {self.policy.apply_timeout_seconds:g} s"
                )
            seen = self.signal.wait(seen, min(left, self.policy.poll_seconds))

    def ensure_exports(
        self,
        specs: Iterable[TargetSpec],
        still_wanted: Callable[[str], bool] | None = None,
    ) -> list[str]:
        """Make sure every spec is desired somewhere: one whose gateways are all dead gets
        the least-loaded live ones added (its old ones keep it, for when they return).
        Assignments no spec names are reported as strays, never removed here (a
        provisioning in flight has one before its node is provisioned). ``still_wanted``
        is asked again before adding gateways to a spec (it may have been removed since)."""
        live = self.live_gateways()
        specs = list(specs)
        rows: dict[str, list[Assignment]] = {}
        for row in self.store.all_assignments():
            rows.setdefault(row.iqn, []).append(row)
        changed = False
        for spec in specs:
            mine = rows.get(spec.iqn, [])
            if any(a.gateway in live for a in mine):
                continue
            extra = self._place(live, exclude=[a.gateway for a in mine])
            if extra and (still_wanted is None or still_wanted(spec.iqn)):
                log.warning("target %s has no live gateway: adding %s", spec.iqn,
                            ", ".join(extra))
                self.store.assign(spec, [*(a.gateway for a in mine), *extra])
                changed = True
        if changed:
            self.signal.notify()
        wanted = {s.iqn for s in specs}
        return sorted(iqn for iqn in rows if iqn not in wanted)

    def list_exports(self) -> list[str]:
        return sorted({a.iqn for a in self.store.all_assignments()})

    def portals(self) -> list[str]:
        return [p for g in sorted(self.live_gateways().values(), key=lambda g: g.name)
                for p in g.portals]

    def has_session(self, iqn: str) -> bool:
        live = self.live_gateways()
        return any(a.logged_in and a.gateway in live for a in self.store.assignments(iqn))

    def sessions(self) -> set[str]:
        """What the live gateways' last heartbeats said (one read of every assignment)."""
        live = self.live_gateways()
        return {a.iqn for a in self.store.all_assignments()
                if a.logged_in and not a.removed and a.gateway in live}

    # -- where nodes log in ----------------------------------------------------------------

    def portals_for(self, iqn: str) -> list[str]:
        """Portals of the live gateways that applied the target; the order differs per
        target (a stable hash), so first choices spread over the gateways."""
        live = self.live_gateways()
        ready = [a for a in self.store.assignments(iqn)
                 if not a.removed and a.status is ExportStatus.APPLIED and a.gateway in live]
        ready.sort(key=lambda a: hashlib.sha256(f"{iqn} {a.gateway}".encode()).digest())
        # A gateway with several tgtd processes reported the one portal the target is on.
        return [p for a in ready for p in (a.portals or live[a.gateway].portals)]


def _describe(rows: list[Assignment], live: dict[str, Gateway] | None = None) -> str:
    if not rows:
        return "no gateway assigned"
    return "; ".join(
        f"{a.gateway}: {a.status.value}" + (f" ({a.detail})" if a.detail else "")
        + ("" if live is None or a.gateway in live else ", gateway down")
        for a in rows
    )


class GatewayDirectory:
    """What GatewayService does for gateways: heartbeats, watches, reports."""

    def __init__(self, exports: GatewayExports) -> None:
        self._exports = exports
        self._store = exports.store
        self._signal = exports.signal
        self.policy = exports.policy

    def heartbeat(self, name: str, portals: Iterable[str], incarnation: str,
                  logged_in: Iterable[str]) -> None:
        check_gateway_name(name)
        gateway = Gateway(name, check_portals(portals), self._exports.clock(), incarnation[:64])
        if self._store.save_gateway(gateway):
            log.info("gateway %s (re)started: portals %s", name, ", ".join(gateway.portals))
            self._signal.notify()
        self._store.record_sessions(name, list(logged_in))

    def report(self, name: str, reports: Iterable[TargetReport]) -> None:
        check_gateway_name(name)
        self._store.record(name, [
            TargetReport(r.iqn, r.revision, r.status,
                         "".join(c if c.isprintable() else " " for c in r.detail)[:MAX_DETAIL],
                         check_portals(r.portals) if r.portals else ())
            for r in reports
        ])
        self._signal.notify()

    def watch(self, name: str, revision: int, active: Callable[[], bool]) -> Iterator[WatchBatch]:
        """A snapshot (unless ``revision`` can be resumed), then batches of changes, until
        ``active`` says the caller left."""
        check_gateway_name(name)
        if revision < 0:
            raise InvalidArgument("revision must not be negative")
        resumed = self._store.changes(name, revision) if revision else None
        if resumed is None:
            revision, targets = self._store.snapshot(name)
            yield WatchBatch(revision, True, tuple(targets))
        else:
            revision, changes = resumed
            yield WatchBatch(revision, False, tuple(changes))
        seen = self._signal.generation
        while active():
            seen = self._signal.wait(seen, self.policy.poll_seconds)
            step = self._store.changes(name, revision)
            if step is None:  # fell behind pruning: start over with a full set
                revision, targets = self._store.snapshot(name)
                yield WatchBatch(revision, True, tuple(targets))
                continue
            new_revision, changes = step
            if changes:
                revision = new_revision
                yield WatchBatch(revision, False, tuple(changes))

    def prune_dead(self) -> int:
        """Forget removals dead gateways never confirmed (they get a snapshot on return)."""
        live = self._exports.live_gateways()
        dead = [g.name for g in self._store.list_gateways() if g.name not in live]
        return self._store.prune_removals(dead) if dead else 0
