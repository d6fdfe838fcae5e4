"""The gateway daemon: keeps the local tgtd equal to what the server wants here.

Three loops share one state: the *watch* follows the server's stream of desired targets
(reconnecting with backoff and resuming at the last revision), the *heartbeat* keeps the
gateway live (only while tgtd answers: a gateway whose tgtd is down must drop out of boot
plans), and the *reconciler* converges tgtd on every change and every ``audit_seconds``
(which is how a tgtd restart is noticed and repaired), then reports outcomes.

Safety: nothing is created or removed before the first full set arrived from the server,
and a lost server changes nothing: tgtd keeps exporting what it has (nodes keep their
disks) until the server is back and says otherwise.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from bmi_client.client import retry_after

from bmi_server.core.errors import Unavailable
from bmi_server.core.models import ExportStatus, TargetReport, TargetSpec, WatchBatch

from .reconcile import Kind, LocalTargets, apply, plan

log = logging.getLogger(__name__)

INITIAL_BACKOFF = 0.5


@dataclass
class Backoff:
    """Exponential backoff with jitter: 0.5 s, 1 s, 2 s, ... up to ``maximum``."""

    maximum: float = 30.0
    current: float = INITIAL_BACKOFF

    def next(self) -> float:
        delay = self.current * random.uniform(0.8, 1.2)
        self.current = min(self.current * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self.current = INITIAL_BACKOFF


class GatewayDaemon:
    def __init__(
        self,
        name: str,
        portals: Sequence[str],
        driver: LocalTargets,
        client,
        *,
        prefix: str,
        audit_seconds: float = 10.0,
        reconnect_max_seconds: float = 30.0,
    ) -> None:
        self.name = name
        self.portals = tuple(portals)
        self.incarnation = secrets.token_hex(8)
        self._driver = driver
        # Several tgtd processes: each target is on one of them (its portals are reported).
        where = getattr(driver, "portals_for", None)
        self._portals_of = (lambda iqn: tuple(where(iqn))) if where else (lambda iqn: ())
        self._client = client
        self._prefix = prefix
        self._audit = audit_seconds
        self._reconnect_max = reconnect_max_seconds
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.stop_event = threading.Event()
        # Guarded by _lock:
        self._desired: dict[str, tuple[TargetSpec, int]] = {}
        self._removals: dict[str, int] = {}  # iqn -> revision of its removal
        self.revision = 0
        self.synced = False  # a full set has arrived
        self._applied: dict[str, TargetSpec] = {}  # what this run applied, per target
        self._reported: dict[str, tuple[int, ExportStatus | None, str]] = {}
        self.tgtd_ok = False
        self.logged_in: frozenset[str] = frozenset()
        self._heartbeat_seconds = 5.0
        self._server_lost = False

    # -- the watch stream ------------------------------------------------------------------

    def on_batch(self, batch: WatchBatch) -> None:
        with self._lock:
            if batch.reset:
                self._desired.clear()
                self._removals.clear()
                self._reported.clear()  # re-report everything once per new stream
            for change in batch.changes:
                if change.spec is None:
                    self._desired.pop(change.iqn, None)
                    self._removals[change.iqn] = change.revision
                else:
                    self._desired[change.iqn] = (change.spec, change.revision)
                    self._removals.pop(change.iqn, None)
            self.revision = batch.revision
            self.synced = self.synced or batch.reset
        self._wake.set()

    def _watch_loop(self) -> None:
        backoff = Backoff(self._reconnect_max)
        while not self.stop_event.is_set():
            try:
                for batch in self._client.watch(self.name, self.revision):
                    self.on_batch(batch)
                    backoff.reset()
                    if self.stop_event.is_set():
                        return
                log.warning("watch stream ended; reconnecting")
            except Exception as exc:  # grpc.RpcError mostly; never let the loop die
                if self.stop_event.is_set():
                    return
                log.warning("watch failed (%s); reconnecting", _short(exc))
                # A busy server says how long to stay away (admission control's hint).
                hint = retry_after(exc) if isinstance(exc, grpc.RpcError) else None
                if hint is not None:
                    self.stop_event.wait(hint * random.uniform(1.0, 1.5))
                    continue
            self.stop_event.wait(backoff.next())

    # -- heartbeats --------------------------------------------------------------------------

    def heartbeat_once(self) -> bool:
        if not self.tgtd_ok:
            return False  # let the gateway expire: nodes must not be sent to a dead tgtd
        try:
            seconds, _ = self._client.heartbeat(self.name, self.portals, self.incarnation,
                                                self.logged_in)
        except Exception as exc:
            # Once per outage at WARNING: a server down for an hour is one line, not 700.
            log.log(logging.DEBUG if self._server_lost else logging.WARNING,
                    "heartbeat failed: %s", _short(exc))
            self._server_lost = True
            return False
        if self._server_lost:
            log.info("server reachable again")
        self._server_lost = False
        self._heartbeat_seconds = max(1.0, float(seconds or 5))
        return True

    def _heartbeat_loop(self) -> None:
        backoff = Backoff(self._reconnect_max)
        failures = 0
        while not self.stop_event.is_set():
            if self.heartbeat_once():
                backoff.reset()
                failures = 0
                delay = self._heartbeat_seconds
            else:
                failures += 1
                if failures == 3:  # the server may be gone while the stream looks open
                    self._client.cancel_watch()
                delay = min(backoff.next(), self._heartbeat_seconds)
            self.stop_event.wait(delay)

    # -- convergence -------------------------------------------------------------------------

    def reconcile_once(self) -> None:
        try:
            live = self._driver.live_targets()
        except Unavailable as exc:
            if self.tgtd_ok:
                log.error("tgtd unreachable, heartbeats paused: %s", exc.message)
            self.tgtd_ok = False
            return
        if not self.tgtd_ok:
            log.info("tgtd reachable")
        self.tgtd_ok = True
        with self._lock:
            if not self.synced:
                self.logged_in = frozenset(i for i, t in live.items() if t.sessions)
                return
            desired = {iqn: spec for iqn, (spec, _) in self._desired.items()}
            applied = dict(self._applied)
        steps = plan(desired, live, applied, prefix=self._prefix,
                     backing_store=self._driver.backing_store)
        lost = [s.iqn for s in steps if s.kind is Kind.CREATE and s.iqn in applied]
        if lost:  # tgtd restarted: stop being listed for them until they are back
            log.warning("tgtd lost %d targets; re-creating them", len(lost))
            with self._lock:
                for iqn in lost:
                    self._applied.pop(iqn, None)
                reports = self._reports({iqn: "lost by tgtd; being re-created" for iqn in lost},
                                        set())
            self._send([r for r in reports if r.iqn in lost])
        try:
            outcome = apply(steps, self._driver)
        except Unavailable as exc:
            log.error("tgtd became unreachable while converging: %s", exc.message)
            self.tgtd_ok = False
            return
        with self._lock:
            for iqn in outcome.removed:
                self._applied.pop(iqn, None)
            for iqn in outcome.failed:
                self._applied.pop(iqn, None)
            self._applied.update(outcome.applied)
            present = (set(live) - set(outcome.removed)) | set(outcome.applied)
            self.logged_in = frozenset(
                iqn for iqn, t in live.items() if t.sessions and iqn in self._desired
            )
            reports = self._reports(outcome.failed, present)
        if reports:
            self._send(reports)

    def _reports(self, failed: dict[str, str], present: set[str]) -> list[TargetReport]:
        """Reports that differ from what the server was told (call with _lock held).
        ``present``: the targets tgtd holds after this round."""
        out = []
        for iqn, (spec, revision) in self._desired.items():
            if iqn in failed:
                out.append(TargetReport(iqn, revision, ExportStatus.FAILED, failed[iqn]))
            elif self._applied.get(iqn) == spec and iqn in present:
                out.append(TargetReport(iqn, revision, ExportStatus.APPLIED,
                                        portals=self._portals_of(iqn)))
        for iqn, revision in self._removals.items():
            if iqn not in present:
                out.append(TargetReport(iqn, revision, None))
        return [r for r in out
                if self._reported.get(r.iqn) != (r.revision, r.status, r.detail)]

    def _send(self, reports: list[TargetReport]) -> None:
        try:
            self._client.report(self.name, reports)
        except Exception as exc:
            log.warning("could not report %d outcomes (retried next round): %s",
                        len(reports), _short(exc))
            return
        with self._lock:
            for r in reports:
                if r.status is None:  # a confirmed removal is done with
                    if self._removals.get(r.iqn) == r.revision:
                        del self._removals[r.iqn]
                    self._reported.pop(r.iqn, None)
                else:
                    self._reported[r.iqn] = (r.revision, r.status, r.detail)

    def _reconcile_loop(self) -> None:
        while not self.stop_event.is_set():
            self._wake.wait(self._audit)
            self._wake.clear()
            if self.stop_event.is_set():
                return
            try:
                self.reconcile_once()
            except Exception:  # keep converging; the next round may succeed
                log.exception("reconcile round failed")

    # -- running -----------------------------------------------------------------------------

    def run(self) -> None:
        """Until ``stop()``: wait for tgtd, announce the gateway, then follow the server."""
        backoff = Backoff(self._reconnect_max)
        while not self.stop_event.is_set():
            self.reconcile_once()  # not synced yet: only checks tgtd and sessions
            if self.heartbeat_once():
                break
            self.stop_event.wait(backoff.next())
        log.info("gateway %s announced (portals %s)", self.name, ", ".join(self.portals))
        threads = [threading.Thread(target=loop, name=loop.__name__.strip("_"), daemon=True)
                   for loop in (self._watch_loop, self._heartbeat_loop)]
        for thread in threads:
            thread.start()
        self._reconcile_loop()
        for thread in threads:
            thread.join(5)

    def stop(self) -> None:
        self.stop_event.set()
        self._wake.set()
        self._client.cancel_watch()


def _short(exc: Exception) -> str:
    details = getattr(exc, "details", None)
    if callable(details):
        code = exc.code() if callable(getattr(exc, "code", None)) else ""
        return f"{getattr(code, 'name', code)}: {details()}"
    return str(exc) or type(exc).__name__
