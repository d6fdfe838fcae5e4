"""Two replicas on one database (two cores, two stores on one SQLite file): in-flight work
is owned, leases decide what reconcile may repair, request ids resolve races."""

from __future__ import annotations

import pytest
from fakes import FakeTargetDriver, WallClock
from principals import ADMIN, ALICE
from test_catalogue import upload

from bmi_server.adapters.sql.store import SqlStateStore
from bmi_server.core import volume_metadata
from bmi_server.core.errors import AlreadyExists, FailedPrecondition, Unavailable
from bmi_server.core.models import Disk, NodeState, Replica, ResourceState, Visibility, utcnow
from bmi_server.core.naming import new_id, temporary_snapshot, volume_name
from bmi_server.core.replicas import ReplicaLease
from bmi_server.server import Core

LEASE = 30
MAC = "52:54:00:00:00:01"


@pytest.fixture
def clock():
    return WallClock(utcnow())


@pytest.fixture
def replica(tmp_path, store, targets, clock):
    """make(name) -> a registered replica's Core; all share one database and one store."""
    made = []

    def make(name: str) -> Core:
        me = Replica(id=f"rep-{name}", name=name)
        state = SqlStateStore(f"sqlite:///{tmp_path / 'shared.sqlite3'}", replica_id=me.id)
        made.append(state)
        lease = ReplicaLease(state, me, LEASE, clock=clock)
        lease.register()
        return Core.build(state, store, targets, advertised_portals=["10.0.2.2:3260"],
                          lease=lease, replicas=state)

    yield make
    for state in made:
        state.close()


@pytest.fixture
def targets():
    return FakeTargetDriver()


def _creating_disk(core: Core, image) -> Disk:
    disk_id = new_id("dsk-")
    disk = Disk(id=disk_id, name="d-" + disk_id[-4:], project="alice", image_id=image.id,
                image_name=image.name, size_bytes=image.size_bytes, volume=volume_name(disk_id),
                state=ResourceState.CREATING)
    core.state.add_disk(disk)
    return disk


def test_in_flight_records_name_their_replica(replica, store, inspector, tmp_path):
    a = replica("a")
    image = upload(a, store, inspector, tmp_path, ALICE, "img")
    disk = _creating_disk(a, image)
    assert a.state.get_disk(disk.id).owner == "rep-a"
    assert a.state.get_image(image.id).owner == ""  # ready: nobody's work
    disk.state = ResourceState.READY
    a.state.update_disk(disk)
    assert a.state.get_disk(disk.id).owner == ""


def test_reconcile_leaves_a_live_replicas_work_alone_until_its_lease_expires(
    replica, store, inspector, tmp_path, clock
):
    a, b = replica("a"), replica("b")
    image = upload(a, store, inspector, tmp_path, ALICE, "img")
    disk = _creating_disk(a, image)
    store.create(disk.volume, 10, volume_metadata.for_disk(disk))  # half made, by a
    copy_source = store.volumes[image.volume]
    copy_source.snapshots.add(temporary_snapshot(disk.volume))
    report = b.reconcile()
    assert report.repaired == [] and report.problems == []
    assert b.state.get_disk(disk.id).state is ResourceState.CREATING
    assert disk.volume in store.volumes
    assert temporary_snapshot(disk.volume) in copy_source.snapshots

    clock.advance(LEASE / 2)
    b.lease.renew()
    assert b.reconcile().repaired == []  # a's lease still runs
    clock.advance(LEASE)
    b.lease.renew()  # b renews; a (dead) does not
    report = b.reconcile()
    assert any("rolled back" in line and disk.id in line for line in report.repaired)
    assert b.state.get_disk(disk.id) is None and disk.volume not in store.volumes


def test_a_replica_never_repairs_its_own_work(replica, store, inspector, tmp_path, clock):
    a = replica("a")
    image = upload(a, store, inspector, tmp_path, ALICE, "img")
    disk = _creating_disk(a, image)
    clock.advance(LEASE * 3)  # even with renewals late
    assert a.reconcile().repaired == []
    assert a.state.get_disk(disk.id).state is ResourceState.CREATING


def test_a_restart_under_the_same_name_repairs_the_previous_runs_work_at_once(
    replica, store, inspector, tmp_path
):
    a = replica("a")
    image = upload(a, store, inspector, tmp_path, ALICE, "img")
    disk = _creating_disk(a, image)
    again = replica("a-next")
    assert again.reconcile().repaired == []  # another name: a's lease still runs
    restarted = ReplicaLease(again.state, Replica(id="rep-a2", name="a"), LEASE)
    restarted.register()  # a new incarnation of "a" drops the old lease
    assert any(disk.id in line for line in again.reconcile().repaired)


def test_only_one_replica_reconciles_at_a_time(replica):
    a, b = replica("a"), replica("b")
    with a.replicas.exclusive("reconcile") as mine:
        assert mine
        assert b.reconcile() is None and b.audit_targets() is None
    assert b.reconcile() is not None


# -- nodes -----------------------------------------------------------------------------


@pytest.fixture
def golden(replica, store, inspector, tmp_path):
    return upload(replica("owner"), store, inspector, tmp_path, ADMIN, "golden", project="ops",
                  visibility=Visibility.PUBLIC)


def _stuck_provisioning(a: Core, golden, request_id: str):
    """a crashed while provisioning (the PROVISIONING intent is stored, nothing else)."""
    node = a.registry.enrol(ADMIN, name="n1", project="alice", macs=[MAC])
    a.provisioner._attach = lambda *args: (_ for _ in ()).throw(SystemExit)  # dies there
    a.provisioner._roll_back = lambda *args: None
    with pytest.raises(SystemExit):
        a.provisioner.provision(ALICE, "n1", image="golden", request_id=request_id)
    assert a.state.get_node(node.id).owner == "rep-a"
    return node


def test_retry_of_a_provision_under_way_elsewhere_waits_then_runs_once(
    replica, golden, clock, targets
):
    a, b = replica("a"), replica("b")
    node = _stuck_provisioning(a, golden, "r1")
    with pytest.raises(Unavailable, match="still in progress"):
        b.provisioner.provision(ALICE, "n1", image="golden", request_id="r1")
    with pytest.raises(FailedPrecondition):  # another request: refused outright
        b.provisioner.provision(ALICE, "n1", image="golden", request_id="r2")
    assert b.reconcile().repaired == []  # a's work while its lease runs
    clock.advance(LEASE + 1)
    b.lease.renew()
    assert any("rolled back" in line for line in b.reconcile().repaired)
    done = b.provisioner.provision(ALICE, "n1", image="golden", request_id="r1")
    assert done.state is NodeState.PROVISIONED and list(targets.targets) == [done.target.iqn]
    again = b.provisioner.provision(ALICE, "n1", image="golden", request_id="r1")
    assert again.disk_id == done.disk_id  # replayed, not done twice
    assert b.state.get_node(node.id).owner == ""


def test_deprovision_with_a_request_id_is_replayed(replica, golden):
    b = replica("b")
    b.registry.enrol(ADMIN, name="n1", project="alice", macs=[MAC])
    b.provisioner.provision(ALICE, "n1", image="golden")
    first = b.provisioner.deprovision(ALICE, "n1", request_id="d1")
    assert first.state is NodeState.AVAILABLE
    again = b.provisioner.deprovision(ALICE, "n1", request_id="d1")
    assert again.state is NodeState.AVAILABLE
    with pytest.raises(FailedPrecondition, match="nothing to deprovision"):
        b.provisioner.deprovision(ALICE, "n1", request_id="d2")


def test_same_request_id_race_gives_the_loser_the_winners_disk(replica, golden):
    a, b = replica("a"), replica("b")
    won = a.disks.create(ALICE, name="d1", image="golden", request_id="r1")
    # b looked for an earlier request just before a stored it; b's insert (or its name
    # check) then meets a's record, and b answers with it.
    replay, looked = b.disks._replay, []
    b.disks._replay = lambda *args: replay(*args) if looked else looked.append(1)
    assert b.disks.create(ALICE, name="d1", image="golden", request_id="r1") == won
    assert len(b.state.all_disks()) == 1
    with pytest.raises(AlreadyExists):  # another request for the same name: refused
        b.disks.create(ALICE, name="d1", image="golden", request_id="r2")


def test_an_operation_started_as_the_node_boots_applies_to_its_new_state(replica, golden):
    a, b = replica("a"), replica("b")
    a.registry.enrol(ADMIN, name="n1", project="alice", macs=[MAC])
    first = a.provisioner.provision(ALICE, "n1", image="golden")
    fresh = b.state.get_node(first.id)
    b.registry.move(fresh, NodeState.BOOTING, "fetched its boot script")
    read = a.state.get_image

    def get_image_while_b_sees_the_login(image_id):
        # Between a's read of the node (booting) and its compare-and-set, b's session
        # watcher moves the node on: a's operation still applies.
        node = b.state.get_node(first.id)
        if node.state is NodeState.BOOTING:
            b.registry.move(node, NodeState.ACTIVE, "initiator logged in to its target")
        return read(image_id)

    a.state.get_image = get_image_while_b_sees_the_login
    again = a.provisioner.reprovision(ALICE, "n1")
    assert again.state is NodeState.PROVISIONED and again.disk_id != first.disk_id
    history = [t.to_state for t in a.registry.history(again)]
    assert history[-3:] == [NodeState.ACTIVE, NodeState.PROVISIONING, NodeState.PROVISIONED]
