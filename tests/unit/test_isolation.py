"""Provisioning with an isolation layer (HIL as the core sees it, faked): ownership,
the provisioning network around clone and export, rollback, take and give back."""

from __future__ import annotations

from dataclasses import replace

import pytest
from fakes import FakeIsolator
from principals import ADMIN, ALICE, BOB

from bmi_server.core import errors
from bmi_server.core.models import (
    SYSTEM,
    Credentials,
    IsolatedNode,
    NodeNic,
    NodeState,
    Principal,
    Smbios,
)
from bmi_server.server import Core

MAC = "52:54:00:0a:0b:01"


@pytest.fixture
def hil() -> FakeIsolator:
    fake = FakeIsolator()
    fake.add("h1", "alice", MAC.upper())
    fake.add("h2", "bob", "52:54:00:0a:0b:02")
    fake.add("free1", None, "52:54:00:0a:0b:03")
    return fake


@pytest.fixture
def core(state, store, targets, hil) -> Core:
    return Core.build(state, store, targets, advertised_portals=["10.0.2.2:3260"],
                      retry_seconds=5, isolator=hil)


@pytest.fixture
def seen(hil, store, targets):
    """What Ceph (volumes) and tgt (targets) held at each call to the isolator."""
    log: list[tuple[str, int, int]] = []
    base = len(store.volumes)
    hil.observe = lambda method: log.append(
        (method, len(store.volumes) - base, len(targets.targets))
    )
    return log


def last_reason(core, node_id):
    return core.registry.history(core.state.get_node(node_id))[-1].reason


def test_provision_goes_ownership_then_network_then_clone_and_export(
    core, hil, golden, store, targets, seen
):
    assert core.state.find_node_by_name("h1") is None  # BMI learns it from HIL
    node = core.provisioner.provision(ALICE, "h1", image="golden")
    assert node.state is NodeState.PROVISIONED and node.project == "alice"
    assert node.macs == [MAC]  # the boot NIC's MAC, normalised
    # node (ownership + MAC) -> attach, both before any volume or target existed.
    assert seen == [("node", 0, 0), ("attach", 0, 0)]
    assert hil.attached == {"h1"}
    disk = core.state.get_disk(node.disk_id)
    assert store.volumes[disk.volume].parent == golden.volume
    assert list(targets.targets) == [node.target.iqn]


def test_provision_uses_the_callers_own_credentials(core, hil, golden):
    caller = Principal("alice", project="alice", credentials=Credentials("alice", "pw"))
    core.provisioner.provision(caller, "h1", image="golden")
    assert {c.credentials for m, n, c in hil.calls} == {caller.credentials}


def test_deprovision_detaches_after_removing_target_and_disk(core, hil, golden, store,
                                                             targets, seen):
    volumes_before = set(store.volumes)
    node = core.provisioner.provision(ALICE, "h1", image="golden")
    seen.clear()
    done = core.provisioner.deprovision(ALICE, "h1")
    assert done.state is NodeState.AVAILABLE and hil.attached == set()
    assert [m for m, *_ in seen] == ["detach"]
    assert targets.targets == {} and set(store.volumes) == volumes_before
    assert core.state.get_disk(node.disk_id) is None


@pytest.mark.parametrize("failure", [
    errors.FailedPrecondition("HIL could not attach network p to h1/eth0: networking "
                              "action 7 ended in ERROR"),
    errors.Unavailable("HIL did not attach network p to h1/eth0 within 60s "
                       "(networking action 7 is still PENDING)"),
], ids=["action-ends-in-error", "action-never-finishes"])
def test_network_action_failure_rolls_back_and_says_why(core, hil, golden, store, targets,
                                                        failure):
    volumes_before = set(store.volumes)
    hil.fail["attach"] = failure
    with pytest.raises(type(failure)):
        core.provisioner.provision(ALICE, "h1", image="golden")
    node = core.state.find_node_by_name("h1")
    assert node.state is NodeState.AVAILABLE and node.target is None and not node.disk_id
    assert set(store.volumes) == volumes_before and targets.targets == {}
    assert ("detach", "h1") in [(m, n) for m, n, _ in hil.calls]  # the rollback undid it
    assert last_reason(core, node.id) == f"provisioning rolled back: {failure.message}"


def test_failure_after_the_network_attach_detaches_it(core, hil, golden, store, targets):
    targets.fail["create_export"] = errors.Unavailable("tgtd: not running")
    with pytest.raises(errors.Unavailable):
        core.provisioner.provision(ALICE, "h1", image="golden")
    assert hil.attached == set() and core.state.all_disks() == []
    assert core.state.find_node_by_name("h1").state is NodeState.AVAILABLE


def test_rollback_that_cannot_detach_leaves_a_failed_node_deprovision_cleans_up(
    core, hil, golden, store
):
    hil.fail["attach"] = errors.DeadlineExceeded("HIL did not attach ... within 60s")
    hil.fail["detach"] = errors.DeadlineExceeded("HIL is still busy with an earlier change")
    with pytest.raises(errors.DeadlineExceeded, match="within 60s"):
        core.provisioner.provision(ALICE, "h1", image="golden")
    node = core.state.find_node_by_name("h1")
    assert node.state is NodeState.FAILED
    assert "within 60s" in node.failure_reason and "still busy" in node.failure_reason
    assert hil.detach_waits == [False]  # the rollback does not wait for a busy NIC
    del hil.fail["detach"], hil.fail["attach"]
    hil.attached.add("h1")  # the pending attach finished after all
    assert core.provisioner.deprovision(ALICE, "h1").state is NodeState.AVAILABLE
    assert hil.attached == set() and hil.detach_waits == [False, True]  # this one waits


def test_tenant_of_another_project_is_refused_and_sees_nothing(core, hil, golden, store):
    volumes_before = set(store.volumes)
    with pytest.raises(errors.NotFound, match=r"^node 'h1' not found$"):
        core.provisioner.provision(BOB, "h1", image="golden")
    assert core.state.find_node_by_name("h1") is None  # nothing recorded for bob's try
    assert [m for m, *_ in hil.calls] == ["node"] and set(store.volumes) == volumes_before
    core.provisioner.provision(ALICE, "h1", image="golden")
    node_id = core.state.find_node_by_name("h1").id
    for ref in ("h1", node_id):
        with pytest.raises(errors.NotFound, match=f"^node '{ref}' not found$"):
            core.provisioner.provision(BOB, ref, image="golden")
        with pytest.raises(errors.NotFound):
            core.registry.resolve(BOB, ref)
        with pytest.raises(errors.NotFound):
            core.provisioner.deprovision(BOB, ref)
    assert core.registry.list(BOB).items == []
    assert core.state.get_node(node_id).state is NodeState.PROVISIONED


def test_a_free_node_must_be_taken_before_it_is_provisioned(core, golden):
    with pytest.raises(errors.FailedPrecondition, match="take it first"):
        core.provisioner.provision(ALICE, "free1", image="golden")
    assert core.state.find_node_by_name("free1") is None


def test_power_cycle_comes_once_the_boot_plan_is_ready(core, hil, golden, seen):
    node = core.provisioner.provision(ALICE, "h1", image="golden", power_cycle=True)
    assert hil.powered == ["h1"]
    # The clone, the config drive and the target existed already.
    assert seen[-1] == ("power_cycle", 2, 1)
    assert last_reason(core, node.id).endswith("power-cycled")


def test_failed_power_cycle_rolls_everything_back(core, hil, golden, targets):
    hil.fail["power_cycle"] = errors.FailedPrecondition("HIL: OBM is not enabled")
    with pytest.raises(errors.FailedPrecondition, match="OBM"):
        core.provisioner.provision(ALICE, "h1", image="golden", power_cycle=True)
    assert targets.targets == {} and hil.attached == set() and core.state.all_disks() == []


def test_unavailable_hil_before_anything_changes_nothing(core, hil, golden, store):
    volumes_before = set(store.volumes)
    hil.fail["node"] = errors.Unavailable("cannot reach HIL")
    with pytest.raises(errors.Unavailable):
        core.provisioner.provision(ALICE, "h1", image="golden")
    assert core.state.all_nodes() == [] and set(store.volumes) == volumes_before
    assert [m for m, *_ in hil.calls] == ["node"]


def test_a_discovered_node_becomes_the_hil_node_with_its_mac(core, golden):
    seen_at_pxe = core.planner.action_for(MAC, Smbios(serial="S-7")).node
    node = core.provisioner.provision(ALICE, "h1", image="golden")
    assert (node.id, node.name, node.project) == (seen_at_pxe.id, "h1", "alice")
    assert node.smbios.serial == "S-7"


def test_a_node_moved_to_another_project_in_hil_follows(core, hil, golden):
    core.provisioner.provision(ALICE, "h1", image="golden")
    core.provisioner.deprovision(ALICE, "h1")
    hil.add("h1", "bob", MAC)  # alice gave it back, bob took it, outside BMI
    node = core.provisioner.provision(BOB, "h1", image="golden")
    assert node.project == "bob" and node.state is NodeState.PROVISIONED
    with pytest.raises(errors.NotFound):
        core.registry.resolve(ALICE, "h1")


def test_a_mac_of_another_enrolled_node_is_refused(core, hil, golden):
    core.registry.enrol(ADMIN, name="other", project="alice", macs=[MAC])
    with pytest.raises(errors.AlreadyExists, match="belongs to node 'other'"):
        core.provisioner.provision(ALICE, "h1", image="golden")
    assert hil.attached == set()


def test_take_then_give_back(core, hil, golden):
    assert core.ownership.free_nodes(ALICE) == ["free1"]
    taken = core.ownership.take(ALICE, "free1")
    assert (taken.name, taken.project, taken.state) == ("free1", "alice", NodeState.AVAILABLE)
    assert hil.nodes["free1"].project == "alice"
    core.provisioner.provision(ALICE, "free1", image="golden")
    with pytest.raises(errors.FailedPrecondition, match="deprovision it"):
        core.ownership.give_back(ALICE, "free1")
    core.provisioner.deprovision(ALICE, "free1")
    core.ownership.give_back(ALICE, "free1")
    node = core.state.find_node_by_name("free1")
    assert node.state is NodeState.DISCOVERED and node.project is None
    assert hil.nodes["free1"].project is None
    with pytest.raises(errors.NotFound):
        core.registry.resolve(ALICE, "free1")
    calls, transitions = len(hil.calls), len(core.registry.history(node))
    core.ownership.give_back(ALICE, "free1")  # a retry: free already, nothing changes
    assert [c[0] for c in hil.calls[calls:]] == ["node"]
    assert len(core.registry.history(node)) == transitions
    again = core.ownership.take(BOB, "free1")  # the same record, now bob's
    assert (again.id, again.project) == (node.id, "bob")
    # Bob sees the node's history from his taking it on: alice's time names her images.
    shown = core.registry.history(again, viewer=BOB)
    assert [t.reason for t in shown] == ["taken by project bob"]
    assert any("golden" in t.reason for t in core.registry.history(again, viewer=ADMIN))


def test_a_node_moved_behind_bmis_back_starts_a_new_history(core, hil, golden):
    core.ownership.take(ALICE, "free1")
    core.provisioner.provision(ALICE, "free1", image="golden")
    core.provisioner.deprovision(ALICE, "free1")
    hil.add("free1", "bob", "52:54:00:0a:0b:03")  # HIL's admin moved it to bob
    node, _ = core.ownership.node_for(BOB, "free1")
    assert node.project == "bob" and node.state is NodeState.AVAILABLE
    assert [t.reason for t in core.registry.history(node, viewer=BOB)] == [
        "taken by project bob"]


def test_give_back_refused_by_hil_keeps_the_node(core, hil):
    core.ownership.take(ALICE, "free1")
    hil.fail["detach_node"] = errors.FailedPrecondition("HIL: Node attached to a network")
    with pytest.raises(errors.FailedPrecondition, match="attached"):
        core.ownership.give_back(ALICE, "free1")
    node = core.state.find_node_by_name("free1")
    assert node.state is NodeState.AVAILABLE and node.project == "alice"
    assert "giving back failed" in last_reason(core, node.id)


def test_tenants_take_only_into_their_own_project(core, hil):
    with pytest.raises(errors.PermissionDenied):
        core.ownership.take(ALICE, "free1", project="bob")
    with pytest.raises(errors.NotFound, match=r"^node 'h2' not found$"):
        core.ownership.give_back(ALICE, "h2")  # bob's node: as if there were none
    with pytest.raises(errors.NotFound, match=r"^no free node 'h2'$"):
        core.ownership.take(ALICE, "h2")
    with pytest.raises(errors.NotFound, match=r"^no free node 'nothing'$"):
        core.ownership.take(ALICE, "nothing")  # the same answer for no node at all
    assert hil.nodes["free1"].project is None and hil.nodes["h2"].project == "bob"
    assert core.ownership.take(ADMIN, "free1", project="bob").project == "bob"


def test_taking_a_node_again_is_a_retry_that_changes_nothing(core, hil):
    first = core.ownership.take(ALICE, "free1")
    calls = len(hil.calls)
    again = core.ownership.take(ALICE, "free1")
    assert (again.id, again.project, again.state) == (first.id, "alice", NodeState.AVAILABLE)
    assert [c[0] for c in hil.calls[calls:]] == ["node"]  # looked at, not connected again


def test_reconcile_detaches_with_bmis_own_account(core, hil, golden):
    node = core.provisioner.provision(ALICE, "h1", image="golden")
    stuck = core.state.get_node(node.id)
    stuck.state = NodeState.PROVISIONING
    core.state.save_node(stuck, None, expected=NodeState.PROVISIONED)
    hil.calls.clear()
    core.reconcile()
    assert hil.attached == set()
    assert hil.calls == [("detach", "h1", SYSTEM)] and SYSTEM.credentials is None


def test_reconcile_takes_a_failed_node_off_the_network_once_hil_has_finished(core, hil,
                                                                             golden):
    """An attach HIL finished after BMI gave up on it: the failed node keeps its NIC on
    the provisioning network until reconcile takes it off (with BMI's account)."""
    hil.fail["attach"] = errors.DeadlineExceeded("HIL did not attach ... within 60s")
    busy = errors.DeadlineExceeded("HIL is still busy with an earlier network change")
    hil.fail["detach"] = busy
    with pytest.raises(errors.DeadlineExceeded):
        core.provisioner.provision(ALICE, "h1", image="golden")
    del hil.fail["attach"]
    hil.attached.add("h1")  # HIL's daemon did the attach after all
    report = core.reconcile()
    node = core.state.find_node_by_name("h1")
    assert node.state is NodeState.FAILED and "still busy" in node.failure_reason
    assert any("still busy" in p for p in report.problems)
    hil.calls.clear()
    core.reconcile()  # tried again later, not at every pass
    assert hil.calls == []
    del hil.fail["detach"]
    core.provisioner._repair_after.clear()  # the back-off has passed
    report = core.reconcile()
    node = core.state.find_node_by_name("h1")
    assert node.state is NodeState.AVAILABLE and hil.attached == set()
    assert hil.calls == [("detach", "h1", SYSTEM)] and hil.detach_waits[-1] is False
    assert any("took failed node h1" in r for r in report.repaired)
    states = [(t.from_state, t.to_state) for t in core.registry.history(node)][-4:]
    assert states == [
        (NodeState.FAILED, NodeState.DEPROVISIONING), (NodeState.DEPROVISIONING,
                                                       NodeState.FAILED),
        (NodeState.FAILED, NodeState.DEPROVISIONING), (NodeState.DEPROVISIONING,
                                                       NodeState.AVAILABLE),
    ]


def test_reconcile_leaves_a_failed_node_that_still_has_its_disk(core, hil, golden, targets):
    targets.fail["remove_export"] = errors.Unavailable("tgtd: not running")
    core.provisioner.provision(ALICE, "h1", image="golden")
    with pytest.raises(errors.Unavailable):
        core.provisioner.deprovision(ALICE, "h1")
    del targets.fail["remove_export"]
    hil.calls.clear()
    core.reconcile()
    node = core.state.find_node_by_name("h1")
    assert node.state is NodeState.FAILED and node.disk_id  # deprovision's to clean up
    assert ("detach", "h1", SYSTEM) not in hil.calls


# -- listing and showing follow HIL's membership ------------------------------------------


def test_a_tenant_lists_the_nodes_hil_puts_in_its_project_with_one_request(core, hil):
    hil.add("h3", "alice", "52:54:00:0a:0b:04")
    hil.calls.clear()
    page = core.ownership.list(ALICE)
    assert [(n.name, n.id, n.state, n.project) for n in page.items] == [
        ("h1", "", NodeState.AVAILABLE, "alice"), ("h3", "", NodeState.AVAILABLE, "alice")]
    assert [m for m, _, _ in hil.calls] == ["project_nodes"]  # nothing per node
    assert core.state.all_nodes() == []  # listing records nothing
    assert [n.name for n in core.ownership.list(BOB).items] == ["h2"]
    assert [n.name for n in core.ownership.list(ALICE, state=NodeState.PROVISIONED).items] == []


def test_showing_a_member_records_it_and_another_projects_node_is_not_found(core, hil):
    hil.add("h3", "alice", "52:54:00:0a:0b:04")
    node = core.ownership.get(ALICE, "h3")
    assert node.id and node.macs == ["52:54:00:0a:0b:04"] and node.project == "alice"
    assert core.registry.history(node)[0].from_state is None  # recorded once, from nothing
    listed = {n.name: n.id for n in core.ownership.list(ALICE).items}
    assert listed == {"h1": "", "h3": node.id}
    for who, ref in [(BOB, "h3"), (BOB, node.id), (ALICE, "h2"), (ALICE, "ghost"),
                     (ALICE, "free1")]:
        with pytest.raises(errors.NotFound, match=rf"^node '{ref}' not found$"):
            core.ownership.get(who, ref)
    assert core.ownership.get(ADMIN, "h2").project == "bob"  # admins: any project


def test_a_node_hil_moved_out_of_the_project_is_no_longer_shown(core, hil):
    node = core.ownership.get(ALICE, "h1")
    hil.nodes["h1"] = replace(hil.nodes["h1"], project="bob")  # moved in HIL directly
    assert core.ownership.list(ALICE).items == []
    with pytest.raises(errors.NotFound):
        core.ownership.get(ALICE, node.id)
    assert {n.name: n.id for n in core.ownership.list(BOB).items} == {"h1": "", "h2": ""}
    assert core.ownership.get(BOB, "h1").id == node.id  # the same record, now bob's
    assert core.ownership.get(BOB, "h1").project == "bob"


def test_member_listing_pages_by_name_and_refuses_foreign_or_garbage_tokens(core, hil):
    for i in range(5):
        hil.add(f"m{i}", "alice", f"52:54:00:0a:0c:0{i}")
    core.ownership.get(ALICE, "m2")  # one of them recorded: paging mixes both kinds
    names, token = [], ""
    while True:
        page = core.ownership.list(ALICE, size=2, token=token)
        names += [n.name for n in page.items]
        if not (token := page.next_token):
            break
    assert names == ["h1", "m0", "m1", "m2", "m3", "m4"]
    first = core.ownership.list(ALICE, size=2).next_token
    for bad in ["garbage", "bm9wZQ==", core.ownership.list(BOB, size=0).next_token or first]:
        who = BOB if bad == first else ALICE
        with pytest.raises(errors.InvalidArgument, match="page_token is invalid"):
            core.ownership.list(who, size=2, token=bad)


def test_without_a_configured_boot_nic_the_nic_seen_at_pxe_is_the_boot_nic(core, hil, golden):
    """HIL's default is the NIC whose label sorts first ("data"), but the node PXE-booted
    from "pxe": BMI saw that MAC, so that NIC is the one it records and attaches."""
    pxe_mac = "52:54:00:0a:0d:02"
    hil.nodes["h4"] = IsolatedNode(
        "h4", "alice", (NodeNic("data", "52:54:00:0a:0d:01"), NodeNic("pxe", pxe_mac)), "data")
    seen = core.planner.action_for(pxe_mac, Smbios(serial="S4")).node
    node = core.provisioner.provision(ALICE, "h4", image="golden")
    assert (node.id, node.macs, node.smbios.serial) == (seen.id, [pxe_mac], "S4")
    assert hil.attach_views[-1].boot_nic == "pxe" and hil.attached == {"h4"}
    # Configured, the operator's choice stands.
    hil.nodes["h5"] = IsolatedNode(
        "h5", "alice", (NodeNic("data", "52:54:00:0a:0e:01"), NodeNic("pxe", "52:54:00:0a:0e:02")),
        "data", boot_nic_configured=True)
    core.planner.action_for("52:54:00:0a:0e:02", Smbios())
    assert core.ownership.get(ALICE, "h5").macs == ["52:54:00:0a:0e:01"]
