"""Gateway mode on the server: placement, provisioning that waits for a gateway, boot plans
listing only live gateways, the watch stream, and gateway credentials."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
from fakes import WallClock
from principals import ADMIN, ALICE
from test_catalogue import upload

from bmi_server.adapters.auth.gateway_tokens import GatewayTokenFile
from bmi_server.api.gateway_servicer import GatewayServicer
from bmi_server.api.ipxe_scripts import render
from bmi_server.core import errors
from bmi_server.core.agent import PlanAction
from bmi_server.core.boot import BootKind
from bmi_server.core.gateways import GatewayDirectory, GatewayExports, GatewayPolicy
from bmi_server.core.models import (
    BootMode,
    ExportStatus,
    NodeState,
    SessionState,
    Smbios,
    TargetReport,
    TargetSpec,
    Visibility,
)
from bmi_server.server import Core

MAC = "52:54:00:12:34:56"


class FakeGateway:
    """Follows the directory's watch in a thread and reports every change done (or failed)."""

    def __init__(self, directory: GatewayDirectory, name: str, *, fail: str = "") -> None:
        self.directory, self.name, self.fail = directory, name, fail
        self.exported: dict[str, TargetSpec] = {}
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> FakeGateway:
        self.thread.start()
        return self

    def _run(self) -> None:
        for batch in self.directory.watch(self.name, 0, lambda: self.running):
            if batch.reset:
                self.exported.clear()
            reports = []
            for change in batch.changes:
                if change.spec is None:
                    self.exported.pop(change.iqn, None)
                    reports.append(TargetReport(change.iqn, change.revision, None))
                elif self.fail:
                    reports.append(TargetReport(change.iqn, change.revision,
                                                ExportStatus.FAILED, self.fail))
                else:
                    self.exported[change.iqn] = change.spec
                    reports.append(TargetReport(change.iqn, change.revision,
                                                ExportStatus.APPLIED))
            self.directory.report(self.name, reports)

    def stop(self) -> None:
        self.running = False
        self.thread.join(5)


@pytest.fixture
def clock():
    return WallClock(datetime(2026, 11, 26, 8, 0, tzinfo=UTC))


@pytest.fixture
def exports(state, clock):
    policy = GatewayPolicy(replicas=2, heartbeat_seconds=5, expiry_seconds=15,
                           apply_timeout_seconds=20, poll_seconds=0.05)
    return GatewayExports(state, policy, clock=clock)


@pytest.fixture
def directory(exports):
    return GatewayDirectory(exports)


@pytest.fixture
def gw_core(state, store, exports):
    return Core.build(state, store, exports, advertised_portals=[], retry_seconds=5,
                      portal_source=exports)


@pytest.fixture
def gateways(directory):
    started: list[FakeGateway] = []

    def start(name: str, portal: str, **kw) -> FakeGateway:
        directory.heartbeat(name, [portal], "run-1", [])
        started.append(FakeGateway(directory, name, **kw).start())
        return started[-1]

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def golden(gw_core, store, inspector, tmp_path):
    return upload(gw_core, store, inspector, tmp_path, ADMIN, "golden", project="ops",
                  visibility=Visibility.PUBLIC)


@pytest.fixture
def node(gw_core):
    return gw_core.registry.enrol(ADMIN, name="n1", project="alice", macs=[MAC])


def test_provision_exports_through_two_gateways_and_boot_lists_both(
    gw_core, golden, node, gateways, directory
):
    g1 = gateways("gw1", "192.0.2.1:3260")
    g2 = gateways("gw2", "192.0.2.2:3260")
    gateways("gw3", "192.0.2.3:3260")
    directory.heartbeat("gw3", ["192.0.2.3:3260"], "run-1", [])
    provisioned = gw_core.provisioner.provision(ALICE, "n1", image="golden")
    iqn = provisioned.target.iqn
    assert provisioned.state is NodeState.PROVISIONED
    holders = sorted(g.name for g in (g1, g2) if iqn in g.exported)
    assert len(holders) == 2  # K = 2 of the three: the least loaded (all empty: by name)
    assert holders == ["gw1", "gw2"]

    action = gw_core.planner.action_for(MAC, Smbios())
    assert action.kind is BootKind.SANBOOT
    assert sorted(action.portals) == ["192.0.2.1:3260", "192.0.2.2:3260"]
    script = render(action, "http://bmi/boot.ipxe?mac=x")
    assert all(f"iscsi:192.0.2.{n}::3260:1:{iqn}" in script for n in (1, 2))


def test_a_second_disk_goes_to_the_least_loaded_gateways(gw_core, golden, gateways, exports):
    for n in (1, 2, 3):
        gateways(f"gw{n}", f"192.0.2.{n}:3260")
    for n in (1, 2):
        gw_core.registry.enrol(ADMIN, name=f"n{n}", project="alice",
                               macs=[f"52:54:00:00:00:0{n}"])
    first = gw_core.provisioner.provision(ALICE, "n1", image="golden")
    second = gw_core.provisioner.provision(ALICE, "n2", image="golden")
    placed = lambda iqn: sorted(a.gateway for a in exports.store.assignments(iqn))  # noqa: E731
    assert placed(first.target.iqn) == ["gw1", "gw2"]
    # The empty gw3, then the tie between gw1 and gw2 broken by name.
    assert placed(second.target.iqn) == ["gw1", "gw3"]
    assert exports.store.load() == {"gw1": 2, "gw2": 1, "gw3": 1}


def test_an_expired_gateway_is_left_out_of_plans_then_none_means_retry(
    gw_core, golden, node, gateways, directory, clock
):
    gateways("gw1", "192.0.2.1:3260")
    gateways("gw2", "192.0.2.2:3260")
    provisioned = gw_core.provisioner.provision(ALICE, "n1", image="golden")
    clock.advance(10)
    directory.heartbeat("gw2", ["192.0.2.2:3260"], "run-1", [])
    clock.advance(10)  # gw1: 20 s without a heartbeat (> 15); gw2: 10 s
    assert gw_core.provisioner.portals_for(provisioned.target.iqn) == ["192.0.2.2:3260"]
    action = gw_core.planner.action_for(MAC, Smbios())
    assert action.kind is BootKind.SANBOOT and action.portals == ("192.0.2.2:3260",)
    clock.advance(10)  # both expired
    action = gw_core.planner.action_for(MAC, Smbios())
    assert action.kind is BootKind.RETRY and "no live iSCSI gateway" in action.reason


def test_an_agent_waits_while_no_gateway_exports_its_disk(gw_core, golden, gateways, clock):
    gateways("gw1", "192.0.2.1:3260")
    gw_core.registry.enrol(ADMIN, name="n1", project="alice", macs=[MAC])
    gw_core.provisioner.provision(ALICE, "n1", image="golden", boot_mode=BootMode.AGENT)
    node = gw_core.state.find_node_by_name("n1")
    assert gw_core.agents.plan_for(node).action is PlanAction.ATTACH
    clock.advance(60)
    plan = gw_core.agents.plan_for(node)
    assert plan.action is PlanAction.WAIT and "no live iSCSI gateway" in plan.reason


def test_without_a_live_gateway_provisioning_fails_and_rolls_back(gw_core, golden, node, store):
    with pytest.raises(errors.Unavailable, match="no live iSCSI gateway"):
        gw_core.provisioner.provision(ALICE, "n1", image="golden")
    assert gw_core.state.get_node(node.id).state is NodeState.AVAILABLE
    assert gw_core.state.all_disks() == []


def test_when_every_assigned_gateway_fails_provisioning_rolls_back_with_why(
    gw_core, golden, node, gateways, exports
):
    gateways("gw1", "192.0.2.1:3260", fail="rbd: no such volume")
    with pytest.raises(errors.FailedPrecondition, match=r"gw1: failed \(rbd: no such volume\)"):
        gw_core.provisioner.provision(ALICE, "n1", image="golden")
    assert gw_core.state.get_node(node.id).state is NodeState.AVAILABLE
    assert exports.store.all_assignments() == []


def test_provisioning_a_failed_node_removes_its_target_from_every_gateway(
    gw_core, golden, node, gateways, exports, store
):
    g1 = gateways("gw1", "192.0.2.1:3260")
    g2 = gateways("gw2", "192.0.2.2:3260")
    first = gw_core.provisioner.provision(ALICE, "n1", image="golden")
    held = gw_core.state.get_node(node.id)
    gw_core.registry.move(held, NodeState.FAILED, "agent gave up: no iSCSI login")
    again = gw_core.provisioner.provision(ALICE, "n1", image="golden")
    assert again.state is NodeState.PROVISIONED and again.disk_id != first.disk_id
    assert [a.iqn for a in exports.store.all_assignments()] == [again.target.iqn] * 2
    assert list(g1.exported) == list(g2.exported) == [again.target.iqn]
    assert gw_core.state.get_disk(first.disk_id) is None
    assert set(store.volumes) == {golden.volume, again.target.volume,
                                  again.target.config_volume}


def test_when_the_assigned_gateways_die_provisioning_stops_waiting(
    state, store, clock, directory, golden, node
):
    class Silence:
        """The store, but gw1's heartbeats stop the moment a target is assigned to it."""

        def __getattr__(self, name):
            return getattr(state, name)

        def assign(self, spec, gateways):
            state.assign(spec, gateways)
            clock.advance(60)

    exports = GatewayExports(Silence(), GatewayPolicy(apply_timeout_seconds=60,
                                                      poll_seconds=0.05), clock=clock)
    core = Core.build(state, store, exports, advertised_portals=[], portal_source=exports)
    directory.heartbeat("gw1", ["192.0.2.1:3260"], "run-1", [])
    with pytest.raises(errors.FailedPrecondition, match="gw1: pending, gateway down"):
        core.provisioner.provision(ALICE, "n1", image="golden")
    assert state.get_node(node.id).state is NodeState.AVAILABLE


def test_a_silent_gateway_times_provisioning_out(state, store, clock, directory, golden, node):
    quick = GatewayExports(state, GatewayPolicy(apply_timeout_seconds=0.3, poll_seconds=0.05),
                           clock=clock)
    core = Core.build(state, store, quick, advertised_portals=[], portal_source=quick)
    directory.heartbeat("gw1", ["192.0.2.1:3260"], "run-1", [])  # announces, never reports
    with pytest.raises(errors.Unavailable, match=r"no gateway exported .* within 0\.3 s"):
        core.provisioner.provision(ALICE, "n1", image="golden")
    # The rollback's removal waits for gw1 too, times out, and leaves the node FAILED.
    assert state.get_node(node.id).state is NodeState.FAILED


def test_deprovision_waits_for_live_gateways_and_skips_dead_ones(
    gw_core, golden, node, gateways, exports, directory, clock
):
    g1 = gateways("gw1", "192.0.2.1:3260")
    g2 = gateways("gw2", "192.0.2.2:3260")
    provisioned = gw_core.provisioner.provision(ALICE, "n1", image="golden")
    g2.stop()
    clock.advance(10)
    directory.heartbeat("gw1", ["192.0.2.1:3260"], "run-1", [])
    clock.advance(10)  # gw2 expired; it never confirms
    gw_core.provisioner.deprovision(ALICE, "n1")
    assert provisioned.target.iqn not in g1.exported
    assert [a.gateway for a in exports.store.assignments(provisioned.target.iqn)] == ["gw2"]
    # gw2 comes back: its snapshot carries the removal, which it confirms.
    directory.heartbeat("gw2", ["192.0.2.2:3260"], "run-2", [])
    _, targets = exports.store.snapshot("gw2")
    assert [(t.iqn, t.spec) for t in targets] == [(provisioned.target.iqn, None)]


def test_a_restarted_gateway_counts_as_not_applied_until_it_reports(
    gw_core, golden, node, gateways, directory, exports
):
    gateways("gw1", "192.0.2.1:3260")
    iqn = gw_core.provisioner.provision(ALICE, "n1", image="golden").target.iqn
    assert exports.portals_for(iqn) == ["192.0.2.1:3260"]
    assert directory.heartbeat("gw1", ["192.0.2.1:3260"], "run-2", []) is None
    assert exports.portals_for(iqn) == []
    directory.report("gw1", [TargetReport(iqn, exports.store.assignments(iqn)[0].revision,
                                          ExportStatus.APPLIED)])
    assert exports.portals_for(iqn) == ["192.0.2.1:3260"]


def test_sessions_reported_by_heartbeats_make_booting_nodes_active(
    gw_core, golden, node, gateways, directory
):
    gateways("gw1", "192.0.2.1:3260")
    iqn = gw_core.provisioner.provision(ALICE, "n1", image="golden").target.iqn
    gw_core.planner.action_for(MAC, Smbios())
    assert gw_core.sessions.poll_once() == 0
    directory.heartbeat("gw1", ["192.0.2.1:3260"], "run-1", [iqn])
    assert gw_core.sessions.poll_once() == 1
    assert gw_core.state.get_node(node.id).state is NodeState.ACTIVE


def spec(n: int) -> TargetSpec:
    return TargetSpec(f"iqn.2026-11.org.moc.bmi:dsk-{n}", f"bmi-dsk-{n}",
                      f"iqn.2026-11.org.moc.bmi.node:{n}", f"bmi-dsk-{n}", "s3cret")


def test_watch_resumes_after_a_revision_and_restarts_after_pruning(directory, exports, clock):
    directory.heartbeat("gw1", ["192.0.2.1:3260"], "run-1", [])
    store = exports.store
    store.assign(spec(1), ["gw1"])
    first = next(directory.watch("gw1", 0, lambda: False))
    assert first.reset and [c.iqn for c in first.changes] == [spec(1).iqn]
    store.assign(spec(2), ["gw1"])
    store.unassign(spec(1).iqn)
    resumed = next(directory.watch("gw1", first.revision, lambda: False))
    assert not resumed.reset
    assert [(c.iqn, c.spec is None) for c in resumed.changes] == [
        (spec(2).iqn, False), (spec(1).iqn, True)]
    clock.advance(60)  # gw1 is dead: its unconfirmed removal is pruned
    assert directory.prune_dead() == 1
    again = next(directory.watch("gw1", first.revision, lambda: False))
    assert again.reset and [c.iqn for c in again.changes] == [spec(2).iqn]


def test_reports_about_an_old_revision_are_ignored(directory, exports):
    store = exports.store
    store.assign(spec(1), ["gw1"])
    old = store.assignments(spec(1).iqn)[0].revision
    store.assign(TargetSpec(spec(1).iqn, "bmi-dsk-1", spec(1).initiator_iqn,
                            spec(1).chap_user, "new-secret"), ["gw1"])
    directory.report("gw1", [TargetReport(spec(1).iqn, old, ExportStatus.APPLIED)])
    assert store.assignments(spec(1).iqn)[0].status is ExportStatus.PENDING


@pytest.mark.parametrize("name, portals, error", [
    ("GW_1", ["192.0.2.1:3260"], "gateway name"),
    ("gw1", [], "at least one portal"),
    ("gw1", ["192.0.2.1"], "not host:port"),
    ("gw1", ["192.0.2.1:99999"], "not host:port"),
    ("gw1", ["${evil}:3260"], "not host:port"),
])
def test_bad_heartbeats_are_refused(directory, name, portals, error):
    with pytest.raises(errors.InvalidArgument, match=error):
        directory.heartbeat(name, portals, "x", [])


class Context:
    def __init__(self, token: str | None) -> None:
        self.metadata = [("authorization", f"Bearer {token}")] if token else []

    def invocation_metadata(self):
        return self.metadata


def test_gateway_credentials_are_their_own_and_name_one_gateway(tmp_path, directory):
    path = tmp_path / "gateway-tokens"
    path.write_text("# <token> <gateway>\ntok-1 gw1\ntok-2 gw2\nbad-line\n")
    servicer = GatewayServicer(directory, GatewayTokenFile(path))
    assert servicer._check(Context("tok-1"), "gw1") == "gw1"
    with pytest.raises(errors.PermissionDenied, match="gw1"):
        servicer._check(Context("tok-1"), "gw2")
    for token in (None, "admin-token-for-tests", "tok-1x"):
        with pytest.raises(errors.Unauthenticated):
            servicer._check(Context(token), "gw1")
    path.unlink()  # no file: nobody gets in
    with pytest.raises(errors.Unauthenticated):
        servicer._check(Context("tok-1"), "gw1")


def test_metrics_say_which_gateways_are_up_and_what_they_hold(exports, directory, clock):
    from test_metrics import _scrape

    from bmi_server.api.metrics import GatewayCollector, Metrics

    directory.heartbeat("gw1", ["192.0.2.1:3260"], "run-1", [])
    directory.heartbeat("gw2", ["192.0.2.2:3260"], "run-1", [])
    exports.store.assign(spec(1), ["gw1", "gw2"])
    exports.store.assign(spec(2), ["gw1"])
    revision = exports.store.assignments(spec(1).iqn)[0].revision
    directory.report("gw1", [TargetReport(spec(1).iqn, revision, ExportStatus.APPLIED)])
    clock.advance(10)
    directory.heartbeat("gw1", ["192.0.2.1:3260"], "run-1", [])
    clock.advance(10)  # gw2 expired
    metrics = Metrics()
    metrics.registry.register(GatewayCollector(exports))
    text = _scrape(metrics)
    assert 'bmi_gateway_up{gateway="gw1"} 1.0' in text
    assert 'bmi_gateway_up{gateway="gw2"} 0.0' in text
    assert 'bmi_gateway_targets{gateway="gw1",status="applied"} 1.0' in text
    assert 'bmi_gateway_targets{gateway="gw1",status="pending"} 1.0' in text
    assert 'bmi_gateway_targets{gateway="gw2",status="pending"} 1.0' in text


def test_sessions_are_what_live_gateways_reported(gw_core, golden, node, gateways, directory,
                                                  exports, clock):
    """The session sweep's listing in gateway mode: targets a live gateway reported a
    logged-in initiator on; a dead gateway's report no longer counts."""
    gateways("gw1", "192.0.2.1:3260")
    gateways("gw2", "192.0.2.2:3260")
    iqn = gw_core.provisioner.provision(ALICE, "n1", image="golden").target.iqn
    assert exports.sessions() == set()
    directory.heartbeat("gw1", ["192.0.2.1:3260"], "run-1", [iqn])
    assert exports.sessions() == {iqn}
    seen, ended = gw_core.sessions.sweep()
    assert (seen, ended) == (1, 0)
    assert gw_core.state.get_node(node.id).current_session.state is SessionState.LOGGED_IN
    clock.advance(10)
    directory.heartbeat("gw2", ["192.0.2.2:3260"], "run-1", [])
    clock.advance(10)  # gw1: 20 s without a heartbeat: dead, its report with it
    assert exports.sessions() == set()
    assert gw_core.sessions.sweep() == (0, 1)
    assert gw_core.state.get_node(node.id).current_session.state is SessionState.ENDED


def test_a_gateway_with_several_tgtd_processes_names_the_one_portal_of_each_target(
    gw_core, golden, node, gateways, directory, exports
):
    gateways("gw1", "192.0.2.1:3260")
    iqn = gw_core.provisioner.provision(ALICE, "n1", image="golden").target.iqn
    directory.heartbeat("gw1", ["192.0.2.1:3260", "192.0.2.1:3261"], "run-1", [])
    revision = exports.store.assignments(iqn)[0].revision
    directory.report("gw1", [TargetReport(iqn, revision, ExportStatus.APPLIED,
                                          portals=("192.0.2.1:3261",))])
    assert exports.portals_for(iqn) == ["192.0.2.1:3261"]
    # An older gateway reports none: every portal of its heartbeat, as before.
    directory.report("gw1", [TargetReport(iqn, revision, ExportStatus.APPLIED)])
    assert exports.portals_for(iqn) == ["192.0.2.1:3260", "192.0.2.1:3261"]
    with pytest.raises(errors.InvalidArgument):
        directory.report("gw1", [TargetReport(iqn, revision, ExportStatus.APPLIED,
                                              portals=("not a portal",))])
