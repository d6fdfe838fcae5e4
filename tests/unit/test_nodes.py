"""Nodes: discovery, enrolment, provisioning all-or-nothing, boot decisions, watch."""

from __future__ import annotations

import pytest
from principals import ADMIN, ALICE, BOB
from test_catalogue import upload

from bmi_server.api.http_boot import parse_boot_query
from bmi_server.api.ipxe_scripts import render
from bmi_server.core import errors
from bmi_server.core.boot import BootKind
from bmi_server.core.models import NodeState, ResourceState, Smbios

MAC = "52:54:00:12:34:56"


@pytest.fixture
def node(core):
    return core.registry.enrol(ADMIN, name="n1", project="alice", macs=[MAC.upper()])


def states(core, node_id):
    return [t.to_state for t in core.registry.history(core.state.get_node(node_id))]


def test_unknown_mac_is_discovered_once_and_told_to_retry(core):
    first = core.planner.action_for("52-54-00-AA-BB-CC", Smbios(serial="S1", uuid="u-1"))
    assert first.kind is BootKind.RETRY and first.retry_seconds == 5
    assert first.node.state is NodeState.DISCOVERED and first.node.project is None
    again = core.planner.action_for("52:54:00:aa:bb:cc", Smbios(product="R640"))
    assert again.node.id == first.node.id and "waiting" in again.reason
    stored = core.state.get_node(first.node.id)
    assert stored.smbios == Smbios(serial="S1", uuid="u-1", product="R640")
    assert stored.macs == ["52:54:00:aa:bb:cc"]


def test_a_new_node_is_recorded_only_if_admitted(core, node):
    asked: list[str] = []

    def refuse() -> float:
        asked.append("new")
        return 2.5

    with pytest.raises(errors.ResourceExhausted) as refused:
        core.planner.action_for("52:54:00:00:00:77", Smbios(serial="S"), refuse)
    assert refused.value.retry_after == 2.5
    assert [n.id for n in core.state.all_nodes()] == [node.id]  # nothing recorded
    known = core.planner.action_for(MAC, Smbios(), refuse)  # not asked for a known MAC
    assert known.node.id == node.id and asked == ["new"]
    admitted = core.planner.action_for("52:54:00:00:00:77", Smbios(), lambda: 0.0)
    assert admitted.node.state is NodeState.DISCOVERED


@pytest.mark.parametrize("mac", ["", "zz:zz:zz:zz:zz:zz", "52:54:00:12:34", "52:54-00:12:34:56",
                                 "${net0/mac}", "52:54:00:12:34:56:78"])
def test_bad_mac_is_refused_before_anything_is_recorded(core, mac):
    with pytest.raises(errors.InvalidArgument):
        core.planner.action_for(mac, Smbios())
    assert core.state.all_nodes() == []


def test_enrolment_rules(core, node):
    assert node.state is NodeState.AVAILABLE and node.macs == [MAC]
    with pytest.raises(errors.AlreadyExists, match="MAC"):
        core.registry.enrol(ADMIN, name="n2", project="alice", macs=[MAC])
    with pytest.raises(errors.PermissionDenied):
        core.registry.enrol(ALICE, name="n3", project="alice", macs=["52:54:00:00:00:01"])
    seen = core.planner.action_for("52:54:00:00:00:02", Smbios(serial="X")).node
    adopted = core.registry.enrol(ADMIN, name="rack1-u7", project="bob", macs=[],
                                  discovered_node=seen.id)
    assert (adopted.id, adopted.project, adopted.smbios.serial) == (seen.id, "bob", "X")
    assert core.registry.resolve(BOB, "rack1-u7").id == seen.id
    with pytest.raises(errors.NotFound):
        core.registry.resolve(ALICE, "rack1-u7")
    assert [n.name for n in core.registry.list(ALICE).items] == ["n1"]


def test_provision_boot_and_activate(core, node, golden, targets, store):
    provisioned = core.provisioner.provision(ALICE, "n1", image="golden")
    assert provisioned.state is NodeState.PROVISIONED and provisioned.owns_disk
    disk = core.state.get_disk(provisioned.disk_id)
    assert disk.project == "alice" and disk.state is ResourceState.READY
    assert store.volumes[disk.volume].parent == golden.volume  # a clone, nothing copied
    spec = targets.targets[provisioned.target.iqn]
    assert spec.volume == disk.volume
    assert spec.initiator_iqn.endswith(node.id) and len(spec.chap_secret) >= 12

    action = core.planner.action_for(MAC, Smbios())
    assert action.kind is BootKind.SANBOOT and action.portals == ("10.0.2.2:3260",)
    script = render(action, "http://x/boot.ipxe?mac=" + MAC)
    assert f"set initiator-iqn {spec.initiator_iqn}" in script
    assert f"set password {spec.chap_secret}" in script
    assert f"set username {spec.chap_user}" in script
    # sanboot describes the SAN disk in the iBFT by default (no --no-describe): the OS's
    # initramfs logs in again from it with this initiator IQN and CHAP.
    assert f"sanboot iscsi:10.0.2.2::3260:1:{spec.iqn} ||" in script
    assert "--no-describe" not in script
    assert core.sessions.poll_once() == 0  # not logged in yet
    targets.logged_in.add(spec.iqn)
    assert core.sessions.poll_once() == 1
    assert states(core, node.id)[-4:] == [NodeState.PROVISIONING, NodeState.PROVISIONED,
                                          NodeState.BOOTING, NodeState.ACTIVE]


def test_two_nodes_get_their_own_disk_target_and_secret(core, node, golden, targets):
    core.registry.enrol(ADMIN, name="n2", project="alice", macs=["52:54:00:00:00:09"])
    a = core.provisioner.provision(ALICE, "n1", image="golden")
    b = core.provisioner.provision(ALICE, "n2", image="golden")
    assert a.disk_id != b.disk_id and a.target.iqn != b.target.iqn
    assert a.target.chap_secret != b.target.chap_secret
    assert a.target.initiator_iqn != b.target.initiator_iqn


def test_failed_export_rolls_everything_back(core, node, golden, targets, store):
    volumes_before = set(store.volumes)
    targets.fail["create_export"] = errors.Unavailable("tgtd: not running")
    with pytest.raises(errors.Unavailable):
        core.provisioner.provision(ALICE, "n1", image="golden")
    after = core.state.get_node(node.id)
    assert after.state is NodeState.AVAILABLE and after.target is None and not after.disk_id
    assert set(store.volumes) == volumes_before and core.state.all_disks() == []
    assert "rolled back" in core.registry.history(after)[-1].reason


def test_provision_refusals_change_nothing(core, node, golden, store, inspector, tmp_path):
    upload(core, store, inspector, tmp_path, BOB, "bobs-image")
    before = set(store.volumes)
    with pytest.raises(errors.NotFound):
        core.provisioner.provision(ALICE, "n1", image="bobs-image")
    with pytest.raises(errors.NotFound):
        core.provisioner.provision(BOB, "n1", image="golden")
    with pytest.raises(errors.InvalidArgument):
        core.provisioner.provision(ALICE, "n1")
    with pytest.raises(errors.InvalidArgument):
        core.provisioner.provision(ALICE, "n1", image="golden", disk="d")
    assert set(store.volumes) == before
    assert core.state.get_node(node.id).state is NodeState.AVAILABLE
    core.provisioner.provision(ALICE, "n1", image="golden", request_id="p1")
    again = core.provisioner.provision(ALICE, "n1", image="golden", request_id="p1")
    assert again.state is NodeState.PROVISIONED
    with pytest.raises(errors.FailedPrecondition):
        core.provisioner.provision(ALICE, "n1", image="golden")


def test_deprovision_and_keep_disk(core, node, golden, targets):
    first = core.provisioner.provision(ALICE, "n1", image="golden")
    with pytest.raises(errors.FailedPrecondition, match="deprovision it first"):
        core.disks.delete(ALICE, first.disk_id)
    core.provisioner.deprovision(ALICE, "n1")
    assert targets.targets == {} and core.state.all_disks() == []
    second = core.provisioner.provision(ALICE, "n1", image="golden")
    kept = core.provisioner.deprovision(ALICE, "n1", keep_disk=True)
    assert kept.state is NodeState.AVAILABLE and targets.targets == {}
    assert core.state.get_disk(second.disk_id).state is ResourceState.READY
    booted = core.provisioner.provision(ALICE, "n1", disk=second.disk_id)
    assert booted.disk_id == second.disk_id and not booted.owns_disk
    core.provisioner.deprovision(ALICE, "n1")
    assert core.state.get_disk(second.disk_id) is not None  # not the node's to delete


def test_reprovision_gives_a_fresh_disk(core, node, golden, targets, store):
    first = core.provisioner.provision(ALICE, "n1", image="golden")
    again = core.provisioner.reprovision(ALICE, "n1")
    assert again.state is NodeState.PROVISIONED and again.disk_id != first.disk_id
    assert core.state.get_disk(first.disk_id) is None
    assert list(targets.targets) == [again.target.iqn]


def failed(core, node_id, why="agent gave up: no iSCSI login"):
    """The node fails as the agent leaves it: FAILED, still holding disk and target."""
    stored = core.state.get_node(node_id)
    core.registry.move(stored, NodeState.FAILED, why)
    return stored


def test_provisioning_a_failed_node_keeps_a_project_disk_it_booted(core, node, golden, targets):
    disk = core.disks.create(ALICE, name="d", image="golden")
    first = core.provisioner.provision(ALICE, "n1", disk="d")
    failed(core, node.id)
    # Its own disk again: the target is made anew (a new CHAP secret), the disk stays.
    again = core.provisioner.provision(ALICE, "n1", disk="d")
    assert again.disk_id == disk.id and not again.owns_disk
    assert again.target.chap_secret != first.target.chap_secret
    assert list(targets.targets) == [again.target.iqn]
    assert targets.targets[again.target.iqn].chap_secret == again.target.chap_secret
    failed(core, node.id)
    fresh = core.provisioner.provision(ALICE, "n1", image="golden")
    assert fresh.owns_disk and list(targets.targets) == [fresh.target.iqn]
    assert core.state.get_disk(disk.id).state is ResourceState.READY  # the project's, kept
    assert core.state.node_of_disk(disk.id) is None
    assert core.registry.history(fresh)[-2].reason == (
        f"provisioning from image golden (first removing the target of disk {disk.id}, "
        "left by the failure; the disk is kept)"
    )
    # Its own clone cannot be booted again: provisioning it again deletes that clone.
    failed(core, node.id)
    with pytest.raises(errors.FailedPrecondition, match="is the disk of node 'n1'"):
        core.provisioner.provision(ALICE, "n1", disk=fresh.disk_id)
    held = core.state.get_node(node.id)
    assert held.state is NodeState.FAILED and held.disk_id == fresh.disk_id
    assert list(targets.targets) == [fresh.target.iqn]


def test_provisioning_a_failed_node_is_all_or_nothing(core, node, golden, targets, store):
    first = core.provisioner.provision(ALICE, "n1", image="golden")
    held = failed(core, node.id)
    with pytest.raises(errors.FailedPrecondition):  # only through a teardown
        core.registry.move(held, NodeState.AVAILABLE, "forgotten")
    # The teardown fails: nothing new is made and the node still records what it holds.
    targets.fail["remove_export"] = errors.Unavailable("tgtd: not running")
    with pytest.raises(errors.Unavailable):
        core.provisioner.provision(ALICE, "n1", image="golden")
    held = core.state.get_node(node.id)
    assert held.state is NodeState.FAILED and "rollback failed" in held.failure_reason
    assert (held.disk_id, held.target.iqn) == (first.disk_id, first.target.iqn)
    assert [d.id for d in core.state.all_disks()] == [first.disk_id]
    del targets.fail["remove_export"]
    # A later step fails: both the old disk and the new one are gone.
    targets.fail["create_export"] = errors.Unavailable("tgtd: not running")
    with pytest.raises(errors.Unavailable):
        core.provisioner.provision(ALICE, "n1", image="golden")
    after = core.state.get_node(node.id)
    assert after.state is NodeState.AVAILABLE and after.target is None and not after.disk_id
    assert core.state.all_disks() == [] and targets.targets == {}
    assert set(store.volumes) == {golden.volume}


def test_a_crash_while_provisioning_a_failed_node_is_rolled_back(core, node, golden, targets,
                                                                 store):
    core.provisioner.provision(ALICE, "n1", image="golden")
    held = failed(core, node.id)
    # The provisioning recorded its intent and the server died before the teardown.
    core.registry.move(held, NodeState.PROVISIONING, "provisioning from image golden")
    report = core.reconcile()
    assert any("rolled back" in line for line in report.repaired)
    after = core.state.get_node(node.id)
    assert after.state is NodeState.AVAILABLE and after.target is None and not after.disk_id
    assert core.state.all_disks() == [] and targets.targets == {}
    assert set(store.volumes) == {golden.volume}


def test_reconcile_repairs_interrupted_node_operations(core, node, golden, targets):
    provisioned = core.provisioner.provision(ALICE, "n1", image="golden")
    # tgtd restarted: its targets are gone; reconcile re-creates them.
    targets.targets.clear()
    core.reconcile()
    assert list(targets.targets) == [provisioned.target.iqn]
    # A crash mid-provisioning leaves PROVISIONING with a disk and a target.
    stuck = core.state.get_node(node.id)
    stuck.state = NodeState.PROVISIONING
    core.state.save_node(stuck, None, expected=NodeState.PROVISIONED)
    report = core.reconcile()
    assert any("rolled back" in line for line in report.repaired)
    after = core.state.get_node(node.id)
    assert after.state is NodeState.AVAILABLE and targets.targets == {}
    assert core.state.all_disks() == []


def test_concurrent_state_change_is_refused(core, node, golden):
    stale = core.state.get_node(node.id)
    core.provisioner.provision(ALICE, "n1", image="golden")
    with pytest.raises(errors.FailedPrecondition, match="changed meanwhile"):
        core.registry.move(stale, NodeState.PROVISIONING, "racing")


def test_watch_delivers_transitions_only_to_those_who_may_see_them(core, node, golden):
    alice_sub = core.registry.events.subscribe(lambda n: n.visible_to(ALICE))
    bob_sub = core.registry.events.subscribe(lambda n: n.visible_to(BOB))
    core.provisioner.provision(ALICE, "n1", image="golden")
    seen = []
    while (event := alice_sub.next(0.01)) is not None:
        seen.append(event.transition.to_state)
    assert seen == [NodeState.PROVISIONING, NodeState.PROVISIONED]
    assert bob_sub.next(0.01) is None
    alice_sub.close()
    bob_sub.close()


def test_boot_query_parsing():
    mac, fields = parse_boot_query(
        "mac=52%3A54%3A00%3A12%3A34%3A56&uuid=abc&serial_hex=534e20372f26&product_hex="
    )
    assert mac == "52:54:00:12:34:56"
    assert fields == {"uuid": "abc", "serial": "SN 7/&", "manufacturer": "", "product": ""}
    for bad in ["", "uuid=x", "mac=a&mac=b", "mac=x&serial_hex=zz", "mac=x&serial_hex=ff",
                "mac=x&serial=" + "s" * 200, "a" * 3000, "mac=x&serial=%00"]:
        with pytest.raises(errors.InvalidArgument):
            parse_boot_query(bad)



def test_failed_deprovision_leaves_a_failed_node_that_a_retry_cleans_up(
    core, node, golden, targets, store
):
    core.provisioner.provision(ALICE, "n1", image="golden")
    store.fail["remove"] = errors.FailedPrecondition("volume in use")
    with pytest.raises(errors.FailedPrecondition):
        core.provisioner.deprovision(ALICE, "n1")
    failed = core.state.get_node(node.id)
    assert failed.state is NodeState.FAILED and "retry" in failed.failure_reason
    del store.fail["remove"]
    done = core.provisioner.deprovision(ALICE, "n1")
    assert done.state is NodeState.AVAILABLE and targets.targets == {}
    assert core.state.all_disks() == []


def test_target_audit_does_not_bring_back_a_target_a_deprovisioning_just_removed(
    core, targets, golden, node
):
    """The audit reads which targets should exist, then re-creates missing ones; a node
    deprovisioned in between must not get its target back (it would hold its disk open)."""
    provisioned = core.provisioner.provision(ALICE, "n1", image="golden")
    iqn = provisioned.target.iqn
    targets.targets.clear()  # tgtd restarted: the audit will find the target missing
    targets.before_recreate = lambda: core.provisioner.deprovision(ALICE, "n1")
    report = core.provisioner.ensure_targets()
    assert iqn not in targets.targets and not report.problems
    assert core.state.get_node(node.id).state is NodeState.AVAILABLE
    targets.before_recreate = None
    # Still re-created when nothing intervenes.
    core.provisioner.provision(ALICE, "n1", image="golden")
    targets.targets.clear()
    core.provisioner.ensure_targets()
    assert len(targets.targets) == 1


def test_a_target_being_made_is_not_reported_as_a_stray(core, targets, golden, node):
    provisioned = core.provisioner.provision(ALICE, "n1", image="golden")
    # The audit reads the nodes while the node is still being provisioned (not yet
    # wanted), and tgtd already has its target.
    provisioned.state = NodeState.PROVISIONING
    core.state.save_node(provisioned, None, expected=NodeState.PROVISIONED)
    assert core.provisioner.ensure_targets().problems == []
    targets.targets["iqn.2026-11.org.moc.bmi:dsk-nobody"] = provisioned.target.spec()
    assert core.provisioner.ensure_targets().problems == [
        "stray target iqn.2026-11.org.moc.bmi:dsk-nobody is not BMI's to keep"]


def test_node_operations_retried_with_their_key_act_once(core, node, golden, targets, store):
    def world():
        stored = core.state.get_node(node.id)
        return (stored.state, stored.disk_id, len(states(core, node.id)), sorted(store.volumes),
                sorted(targets.targets))

    core.provisioner.provision(ALICE, "n1", image="golden", request_id="p1")
    first = core.provisioner.reprovision(ALICE, "n1", request_id="r1")
    before = world()
    again = core.provisioner.reprovision(ALICE, "n1", request_id="r1")
    assert again.disk_id == first.disk_id and world() == before  # no second clone
    with pytest.raises(errors.FailedPrecondition):  # a key of another operation: no replay
        core.provisioner.provision(ALICE, "n1", image="golden", request_id="r1")

    done = core.provisioner.deprovision(ALICE, "n1", request_id="x1")
    before = world()
    again = core.provisioner.deprovision(ALICE, "n1", request_id="x1")
    assert again.state is done.state is NodeState.AVAILABLE and world() == before
    with pytest.raises(errors.FailedPrecondition, match="nothing to deprovision"):
        core.provisioner.deprovision(ALICE, "n1", request_id="x2")  # a new request
    with pytest.raises(errors.NotFound):
        core.provisioner.deprovision(BOB, "n1", request_id="x1")


def test_enrolling_again_exactly_so_is_a_retry(core, node):
    before = states(core, node.id)
    again = core.registry.enrol(ADMIN, name="n1", project="alice", macs=[MAC])
    assert again.id == node.id and states(core, node.id) == before
    with pytest.raises(errors.AlreadyExists):  # not the same enrolment: a conflict
        core.registry.enrol(ADMIN, name="n1", project="bob", macs=[MAC])
    seen = core.planner.action_for("52:54:00:00:00:02", Smbios()).node
    adopted = core.registry.enrol(ADMIN, name="r1", project="bob", macs=[],
                                  discovered_node=seen.id)
    again = core.registry.enrol(ADMIN, name="r1", project="bob", macs=[],
                                discovered_node=seen.id)
    assert again.id == adopted.id and again.state is NodeState.AVAILABLE


def test_a_new_nodes_first_transition_is_from_nothing(core, node):
    seen = core.planner.action_for("52:54:00:00:00:42", Smbios()).node
    for recorded, state in [(seen, NodeState.DISCOVERED), (node, NodeState.AVAILABLE)]:
        first = core.registry.history(core.state.get_node(recorded.id))[0]
        assert (first.from_state, first.to_state) == (None, state)


def test_node_pages_chain_and_a_garbage_or_foreign_token_is_invalid(core):
    for i in range(5):
        core.registry.enrol(ADMIN, name=f"p{i}", project="alice",
                            macs=[f"52:54:00:00:01:0{i}"])
    core.registry.enrol(ADMIN, name="q0", project="bob", macs=["52:54:00:00:02:00"])
    names, token = [], ""
    while True:
        page = core.registry.list(ALICE, size=2, token=token)
        names += [n.name for n in page.items]
        if not (token := page.next_token):
            break
    assert names == ["p0", "p1", "p2", "p3", "p4"]
    alices = core.registry.list(ALICE, size=2).next_token
    for who, bad in [(ALICE, "garbage"), (ALICE, "p1"), (BOB, alices), (ADMIN, alices)]:
        with pytest.raises(errors.InvalidArgument, match="page_token is invalid"):
            core.registry.list(who, size=2, token=bad)
