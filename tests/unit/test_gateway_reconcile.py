"""bmi-gateway's convergence (plan + apply) and daemon state, against an in-memory tgtd."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from bmi_gateway.daemon import GatewayDaemon
from bmi_gateway.reconcile import Kind, apply, plan
from bmi_server.adapters.tgt.tgtadm import LiveTarget
from bmi_server.core.errors import FailedPrecondition, Unavailable
from bmi_server.core.models import ExportStatus, TargetChange, TargetSpec, WatchBatch

PREFIX = "iqn.2026-11.org.moc.bmi:"
FOREIGN = "iqn.2001-04.com.example:storage"


def spec(n: int, secret: str = "secret-1", volume: str = "", drive: str = "") -> TargetSpec:
    return TargetSpec(iqn=f"{PREFIX}dsk-{n}", volume=volume or f"bmi-dsk-{n}",
                      initiator_iqn=f"iqn.2026-11.org.moc.bmi.node:{n}", chap_user=f"bmi-dsk-{n}",
                      chap_secret=secret, config_volume=drive)


@dataclass
class FakeTarget:
    volume: str
    accounts: set[str] = field(default_factory=set)
    acl: set[str] = field(default_factory=set)
    secret: str = ""
    sessions: int = 0
    drive: str = ""  # LUN 2's volume


class FakeTgt:
    """The LocalTargets port in memory; every call recorded."""

    def __init__(self) -> None:
        self.targets: dict[str, FakeTarget] = {}
        self.calls: list[tuple[str, str]] = []
        self.down = False
        self.broken_volumes: set[str] = set()

    def _up(self) -> None:
        if self.down:
            raise Unavailable("tgtd not reachable")

    def live_targets(self) -> dict[str, LiveTarget]:
        self._up()
        return {
            iqn: LiveTarget(tid, iqn, {1, 2} if t.drive else {1}, set(t.accounts), set(t.acl),
                            {1: f"rbd/{t.volume}", **({2: f"rbd/{t.drive}"} if t.drive else {})},
                            t.sessions)
            for tid, (iqn, t) in enumerate(sorted(self.targets.items()), 1)
        }

    def backing_store(self, spec: TargetSpec) -> str:
        return f"rbd/{spec.volume}"

    def create_export(self, spec: TargetSpec) -> None:
        self._up()
        self.calls.append(("create", spec.iqn))
        if spec.volume in self.broken_volumes:
            raise FailedPrecondition(f"cannot export rbd/{spec.volume}: no such volume")
        target = self.targets.setdefault(spec.iqn, FakeTarget(spec.volume))
        target.drive = target.drive or spec.config_volume  # a LUN is never replaced
        target.accounts.add(spec.chap_user)
        target.acl.add(spec.initiator_iqn)
        target.secret = spec.chap_secret

    def remove_export(self, iqn: str) -> None:
        self._up()
        self.calls.append(("remove", iqn))
        self.targets.pop(iqn, None)

    def unbind_initiator(self, iqn: str, entry: str) -> None:
        self.calls.append(("unbind-acl", f"{iqn} {entry}"))
        self.targets[iqn].acl.discard(entry)

    def unbind_account(self, iqn: str, user: str) -> None:
        self.calls.append(("unbind-account", f"{iqn} {user}"))
        self.targets[iqn].accounts.discard(user)

    def matches(self, s: TargetSpec) -> bool:
        t = self.targets.get(s.iqn)
        return (t is not None and t.volume == s.volume and t.accounts == {s.chap_user}
                and t.acl == {s.initiator_iqn} and t.secret == s.chap_secret
                and t.drive == s.config_volume)


def converge(tgt: FakeTgt, desired: list[TargetSpec], applied=None):
    steps = plan({s.iqn: s for s in desired}, tgt.live_targets(), applied or {},
                 prefix=PREFIX, backing_store=tgt.backing_store)
    return steps, apply(steps, tgt)


def test_converges_from_empty_and_then_has_nothing_to_do():
    tgt = FakeTgt()
    want = [spec(1), spec(2)]
    steps, outcome = converge(tgt, want)
    assert [s.kind for s in steps] == [Kind.CREATE, Kind.CREATE]
    assert all(tgt.matches(s) for s in want)
    assert outcome.applied == {s.iqn: s for s in want}
    steps, _ = converge(tgt, want, applied=outcome.applied)
    assert steps == []


def test_removes_owned_strays_and_never_touches_foreign_targets():
    tgt = FakeTgt()
    tgt.targets[FOREIGN] = FakeTarget("other", acl={"ALL"})
    tgt.targets[spec(9).iqn] = FakeTarget("bmi-dsk-9", {"bmi-dsk-9"}, {"x"})
    _, outcome = converge(tgt, [spec(1)])
    assert outcome.removed == [spec(9).iqn]
    assert FOREIGN in tgt.targets and tgt.targets[FOREIGN].acl == {"ALL"}
    assert not any(FOREIGN in what for _, what in tgt.calls)
    assert set(tgt.targets) == {FOREIGN, spec(1).iqn}


def test_fixes_acl_and_chap_drift_without_removing_the_target():
    tgt = FakeTgt()
    s = spec(1)
    _, outcome = converge(tgt, [s])
    target = tgt.targets[s.iqn]
    target.acl |= {"ALL", "iqn.1993-08.org.debian:intruder"}  # someone opened it up
    target.accounts.add("someone-else")
    target.accounts.discard(s.chap_user)  # and dropped BMI's CHAP binding
    target.sessions = 1
    steps, _ = converge(tgt, [s], applied=outcome.applied)
    assert [st.kind for st in steps] == [Kind.REPAIR]
    assert steps[0].extra_acl == ("ALL", "iqn.1993-08.org.debian:intruder")
    assert steps[0].extra_accounts == ("someone-else",)
    assert tgt.matches(s)
    assert ("remove", s.iqn) not in tgt.calls  # the logged-in initiator keeps its session


def test_a_changed_secret_or_a_first_pass_resets_chap():
    tgt = FakeTgt()
    _, outcome = converge(tgt, [spec(1)])
    changed = spec(1, secret="secret-2")
    steps, _ = converge(tgt, [changed], applied=outcome.applied)
    assert [st.kind for st in steps] == [Kind.REPAIR] and tgt.matches(changed)
    # A new daemon run has applied nothing yet: it cannot see the secret tgtd holds.
    tgt.targets[changed.iqn].secret = "tampered"
    steps, _ = converge(tgt, [changed], applied={})
    assert "not applied by this run" in steps[0].why and tgt.matches(changed)


def test_a_target_backed_by_the_wrong_volume_is_replaced():
    tgt = FakeTgt()
    s = spec(1)
    tgt.targets[s.iqn] = FakeTarget("bmi-dsk-old", {s.chap_user}, {s.initiator_iqn})
    steps, _ = converge(tgt, [s])
    assert [st.kind for st in steps] == [Kind.REPLACE]
    assert tgt.calls[:2] == [("remove", s.iqn), ("create", s.iqn)]
    assert tgt.matches(s)


def test_a_missing_config_drive_lun_is_added_in_place():
    tgt = FakeTgt()
    s = spec(1, drive="bmi-cfg-1")
    _, outcome = converge(tgt, [s])
    assert tgt.matches(s) and tgt.live_targets()[s.iqn].luns == {1, 2}
    tgt.targets[s.iqn].drive = ""  # LUN 2 lost
    steps, _ = converge(tgt, [s], applied=outcome.applied)
    assert [(st.kind, st.why) for st in steps] == [(Kind.REPAIR, "incomplete")]
    assert ("remove", s.iqn) not in tgt.calls and tgt.matches(s)


@pytest.mark.parametrize("live_drive, wanted, why", [
    ("bmi-cfg-old", "bmi-cfg-1", "LUN 2 is rbd/bmi-cfg-old, not rbd/bmi-cfg-1"),
    ("bmi-cfg-old", "", "LUN 2 is rbd/bmi-cfg-old, not wanted"),
])  # fmt: skip
def test_a_config_drive_lun_on_the_wrong_volume_replaces_the_target(live_drive, wanted, why):
    tgt = FakeTgt()
    s = spec(1, drive=wanted)
    tgt.targets[s.iqn] = FakeTarget(s.volume, {s.chap_user}, {s.initiator_iqn}, drive=live_drive)
    steps, _ = converge(tgt, [s])
    assert [(st.kind, st.why) for st in steps] == [(Kind.REPLACE, why)]
    assert tgt.calls[:2] == [("remove", s.iqn), ("create", s.iqn)] and tgt.matches(s)


def test_one_failing_target_does_not_stop_the_others():
    tgt = FakeTgt()
    tgt.broken_volumes.add("bmi-dsk-1")
    _, outcome = converge(tgt, [spec(1), spec(2)])
    assert "no such volume" in outcome.failed[spec(1).iqn]
    assert list(outcome.applied) == [spec(2).iqn]


def test_tgtd_down_stops_the_round():
    tgt = FakeTgt()
    steps = plan({spec(1).iqn: spec(1)}, {}, {}, prefix=PREFIX, backing_store=tgt.backing_store)
    tgt.down = True
    with pytest.raises(Unavailable):
        apply(steps, tgt)


# -- the daemon's state ----------------------------------------------------------------------


class FakeServer:
    """GatewayClient's calls, recorded."""

    def __init__(self) -> None:
        self.heartbeats: list[tuple] = []
        self.reports: list = []
        self.fail_reports = False

    def heartbeat(self, name, portals, incarnation, logged_in):
        self.heartbeats.append((name, tuple(portals), incarnation, frozenset(logged_in)))
        return 5, 15

    def report(self, name, reports):
        if self.fail_reports:
            raise ConnectionError("server down")
        self.reports.extend(reports)

    def cancel_watch(self):
        pass

    def outcomes(self):
        return {(r.iqn, r.revision): r.status for r in self.reports}


def daemon(tgt: FakeTgt, server: FakeServer) -> GatewayDaemon:
    return GatewayDaemon("gw1", ["10.0.0.1:3260"], tgt, server, prefix=PREFIX)


def full_set(revision: int, *specs: tuple[TargetSpec, int]) -> WatchBatch:
    return WatchBatch(revision, True, tuple(TargetChange(r, s.iqn, s) for s, r in specs))


def test_nothing_changes_before_the_first_full_set():
    tgt, server = FakeTgt(), FakeServer()
    tgt.targets[spec(5).iqn] = FakeTarget("bmi-dsk-5", sessions=1)  # a node is using it
    d = daemon(tgt, server)
    d.reconcile_once()
    assert tgt.calls == [] and spec(5).iqn in tgt.targets
    assert d.heartbeat_once() and server.heartbeats[0][3] == {spec(5).iqn}


def test_full_set_then_changes_converge_and_are_reported_once():
    tgt, server = FakeTgt(), FakeServer()
    d = daemon(tgt, server)
    tgt.targets[spec(5).iqn] = FakeTarget("bmi-dsk-5")
    d.on_batch(full_set(3, (spec(1), 2), (spec(2), 3)))
    d.reconcile_once()
    assert set(tgt.targets) == {spec(1).iqn, spec(2).iqn}
    assert server.outcomes() == {(spec(1).iqn, 2): ExportStatus.APPLIED,
                                 (spec(2).iqn, 3): ExportStatus.APPLIED}
    d.reconcile_once()
    assert len(server.reports) == 2  # nothing new to say

    d.on_batch(WatchBatch(5, False, (TargetChange(4, spec(1).iqn, None),
                                     TargetChange(5, spec(3).iqn, spec(3)))))
    d.reconcile_once()
    assert set(tgt.targets) == {spec(2).iqn, spec(3).iqn} and d.revision == 5
    assert server.outcomes()[(spec(1).iqn, 4)] is None  # the removal is confirmed
    assert server.outcomes()[(spec(3).iqn, 5)] is ExportStatus.APPLIED


def test_failures_are_reported_and_unsent_reports_are_retried():
    tgt, server = FakeTgt(), FakeServer()
    tgt.broken_volumes.add("bmi-dsk-1")
    d = daemon(tgt, server)
    d.on_batch(full_set(1, (spec(1), 1)))
    server.fail_reports = True
    d.reconcile_once()
    assert server.reports == []
    server.fail_reports = False
    d.reconcile_once()
    [report] = server.reports
    assert report.status is ExportStatus.FAILED and "no such volume" in report.detail


def test_a_tgtd_restart_is_noticed_by_the_audit_and_repaired():
    tgt, server = FakeTgt(), FakeServer()
    d = daemon(tgt, server)
    d.on_batch(full_set(1, (spec(1), 1)))
    d.reconcile_once()
    tgt.down = True
    d.reconcile_once()
    assert not d.tgtd_ok and not d.heartbeat_once()  # the gateway lets itself expire
    tgt.down = False
    tgt.targets.clear()  # a restarted tgtd has nothing
    d.reconcile_once()
    assert d.tgtd_ok and tgt.matches(spec(1))
    assert d.heartbeat_once()
    # The server heard it was lost (out of boot plans) before it was back.
    assert [(r.status, r.detail) for r in server.reports] == [
        (ExportStatus.APPLIED, ""), (ExportStatus.FAILED, "lost by tgtd; being re-created"),
        (ExportStatus.APPLIED, "")]


def test_a_new_stream_replaces_the_desired_set_and_reports_again():
    tgt, server = FakeTgt(), FakeServer()
    d = daemon(tgt, server)
    d.on_batch(full_set(1, (spec(1), 1)))
    d.reconcile_once()
    d.on_batch(full_set(7, (spec(2), 7)))  # e.g. the server pruned what this gateway missed
    d.reconcile_once()
    assert set(tgt.targets) == {spec(2).iqn}
    d.on_batch(full_set(7, (spec(2), 7)))
    d.reconcile_once()
    assert [r.iqn for r in server.reports].count(spec(2).iqn) == 2


def test_the_watch_stream_carries_the_config_drive_to_the_gateway():
    """Server side (_batch_message) to gateway side (batch_of): every spec field arrives."""
    from bmi_gateway.client import batch_of
    from bmi_server.api.gateway_servicer import _batch_message

    batch = WatchBatch(7, True, (TargetChange(5, spec(1).iqn, spec(1)),
                                 TargetChange(6, spec(2).iqn, spec(2, drive="bmi-cfg-2")),
                                 TargetChange(7, spec(3).iqn, None)))  # fmt: skip
    assert batch_of(_batch_message(batch)) == batch
