"""Two bmi-server replicas (real processes) on one throwaway PostgreSQL, the session's Ceph
cluster and tgtd: races between them, WatchNodes across them, and failover when one is
killed (kill -9) in the middle of a stream of operations."""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from bmi.v1 import nodes_pb2
from bmi_client.client import BmiClient
from server_process import ADMIN_TOKEN, ServerProcess

from bmi_server.adapters.tgt.tgtadm import parse_targets
from bmi_server.core import volume_metadata

pytestmark = pytest.mark.ceph

PROVISIONED = nodes_pb2.NODE_STATE_PROVISIONED
PROVISIONING = nodes_pb2.NODE_STATE_PROVISIONING
AVAILABLE = nodes_pb2.NODE_STATE_AVAILABLE


class Cluster:
    """Replicas "a" and "b" on one fresh database; a project of this test's own."""

    def __init__(self, tmp_path, ceph_cluster, tgtd, database_url: str, env: dict) -> None:
        self.project = "p" + uuid.uuid4().hex[:8]
        self.gate = tmp_path / "gate"
        self.replicas: dict[str, ServerProcess] = {}
        self.clients: list[BmiClient] = []
        for name in ("a", "b"):
            self.replicas[name] = ServerProcess(
                tmp_path / f"replica-{name}", str(ceph_cluster.conf_path), ceph_cluster.pool,
                database_url, tgtd=tgtd,
                extra_env={"BMI_REPLICA_NAME": name, **env.get("all", {}), **env.get(name, {})},
            )

    @property
    def a(self) -> ServerProcess:
        return self.replicas["a"]

    @property
    def b(self) -> ServerProcess:
        return self.replicas["b"]

    def client(self, *servers: ServerProcess, **options) -> BmiClient:
        options = {"timeout": 60, "max_attempts": 60, "backoff_max": 0.5, **options}
        client = BmiClient([s.address for s in servers], ADMIN_TOKEN, **options)
        self.clients.append(client)
        return client

    def stop(self) -> None:
        self.gate.touch()  # frees a power command a killed replica left waiting
        for client in self.clients:
            client.close()
        for replica in self.replicas.values():
            replica.stop()


@pytest.fixture
def cluster_with(tmp_path, ceph_cluster, tgtd, fresh_postgres) -> Iterator[Callable]:
    made: list[Cluster] = []

    def make(**env) -> Cluster:
        cluster = Cluster(tmp_path, ceph_cluster, tgtd, fresh_postgres(), env)
        made.append(cluster)
        for replica in cluster.replicas.values():
            replica.start()
        return cluster

    yield make
    for cluster in made:
        cluster.stop()


FAST_REPAIR = {"BMI_REPLICA_LEASE_SECONDS": "3", "BMI_RECONCILE_SECONDS": "1"}


@pytest.fixture
def cluster(cluster_with) -> Cluster:
    return cluster_with(all=FAST_REPAIR)


@pytest.fixture
def golden(cluster, raw_image):
    return cluster.client(cluster.a).upload_image(raw_image, "golden", project=cluster.project)


def _race(calls: list[Callable]) -> tuple[list, list[grpc.RpcError]]:
    """Run every call at once; (results, errors)."""
    start = threading.Barrier(len(calls))

    def run(call):
        start.wait()
        try:
            return call(), None
        except grpc.RpcError as exc:
            return None, exc

    with ThreadPoolExecutor(len(calls)) as pool:
        outcomes = list(pool.map(run, calls))
    return [r for r, e in outcomes if e is None], [e for r, e in outcomes if e is not None]


def _wait_for(condition: Callable[[], bool], what: str, deadline: float = 60) -> None:
    """Poll until ``condition()`` holds; a guard against hanging, not a timing assertion."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


# -- races between replicas ----------------------------------------------------------------


def test_same_disk_name_through_both_replicas_one_wins_no_orphan(cluster, golden, rbd_store):
    clients = [cluster.client(cluster.a), cluster.client(cluster.b)] * 4
    made, errors = _race([
        (lambda c=c: c.create_disk("raced", golden.id, project=cluster.project)) for c in clients
    ])
    assert len(made) == 1
    assert {e.code() for e in errors} == {grpc.StatusCode.ALREADY_EXISTS}
    assert all("already exists" in e.details() for e in errors)
    disks = [d for d in cluster.client(cluster.b).list_disks(project=cluster.project)]
    assert [d.id for d in disks] == [made[0].id]
    assert _volumes_of(rbd_store, cluster.project, "disk") == {disks[0].id}


def test_same_request_id_through_both_replicas_gives_every_caller_one_disk(
    cluster, golden, rbd_store
):
    clients = [cluster.client(cluster.a), cluster.client(cluster.b)] * 4
    made, errors = _race([
        (lambda c=c: c.create_disk("once", golden.id, project=cluster.project, request_id="r1"))
        for c in clients
    ])
    assert errors == []
    assert {d.id for d in made} == {made[0].id} and len(made) == len(clients)
    assert _volumes_of(rbd_store, cluster.project, "disk") == {made[0].id}


def test_same_image_name_copied_through_both_replicas_one_wins(cluster, golden, rbd_store):
    clients = [cluster.client(cluster.a), cluster.client(cluster.b)] * 3
    made, errors = _race([
        (lambda c=c: c.copy_image(golden.id, project=cluster.project, name="copied"))
        for c in clients
    ])
    assert len(made) == 1
    assert {e.code() for e in errors} == {grpc.StatusCode.ALREADY_EXISTS}
    assert _volumes_of(rbd_store, cluster.project, "image") == {golden.id, made[0].id}


def test_provisions_of_one_node_through_both_replicas_one_wins(cluster, golden, rbd_store, tgtd):
    admin = cluster.client(cluster.a)
    node = admin.enroll_node("racer", cluster.project, macs=["52:54:00:77:00:01"])
    clients = [cluster.client(cluster.a), cluster.client(cluster.b)] * 4
    made, errors = _race([
        (lambda c=c: c.provision_node(node.id, image=golden.id)) for c in clients
    ])
    assert len(made) == 1 and made[0].state == PROVISIONED
    assert {e.code() for e in errors} == {grpc.StatusCode.FAILED_PRECONDITION}
    assert all("provision" in e.details() or "changed meanwhile" in e.details() for e in errors)
    _check_agreement(cluster, rbd_store, tgtd)

    # The same request id from everyone: one provisioning, every caller gets its node.
    admin.deprovision_node(node.id)
    made, errors = _race([
        (lambda c=c: c.provision_node(node.id, image=golden.id, request_id="p1")) for c in clients
    ])
    assert errors == []
    assert {n.disk_id for n in made} == {made[0].disk_id}
    history = admin.get_node(node.id)
    assert sum(t.reason.startswith("provisioned") for t in history.history) == 2
    _check_agreement(cluster, rbd_store, tgtd)


# -- WatchNodes across replicas -------------------------------------------------------------


def test_a_watcher_on_one_replica_sees_a_provision_done_through_the_other(cluster, golden):
    events: queue.Queue = queue.Queue()
    stream = cluster.client(cluster.a).watch_nodes(project=cluster.project)

    def read():
        try:
            for event in stream:
                events.put(event)
        except grpc.RpcError:
            pass  # cancelled at the end

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    via_b = cluster.client(cluster.b)
    node = via_b.enroll_node("watched", cluster.project, macs=["52:54:00:77:00:02"])
    via_b.provision_node(node.id, image=golden.id)
    seen = []
    while PROVISIONED not in seen:
        event = events.get(timeout=30)
        if event.node.id == node.id:
            seen.append(event.transition.to_state)
    stream.cancel()
    assert seen == [AVAILABLE, PROVISIONING, PROVISIONED]


# -- failover ------------------------------------------------------------------------------


def _blocking_power(cluster_gate) -> dict:
    """Replica a's power command waits until the test opens the gate: a provision with
    power_cycle is held there, PROVISIONING with disk and target made, for as long as needed."""
    command = f"sh -c 'until [ -e {cluster_gate} ]; do sleep 0.1; done'"
    return {"BMI_POWER_COMMANDS": json.dumps({"*": command})}


def test_kill_a_replica_mid_stream_every_operation_completes_once_via_the_other(
    cluster_with, tmp_path, raw_image, rbd_store, tgtd
):
    gate = tmp_path / "gate"
    cluster = cluster_with(
        all=FAST_REPAIR, a=_blocking_power(gate),
        b={"BMI_POWER_COMMANDS": json.dumps({"*": "true"})},
    )
    admin = cluster.client(cluster.a, cluster.b)
    golden = admin.upload_image(raw_image, "golden", project=cluster.project)
    names = [f"fo-{i}" for i in range(4)]
    for i, name in enumerate(names):
        admin.enroll_node(name, cluster.project, macs=[f"52:54:00:78:00:{i:02x}"])
    # The stream: ("p", node, power-cycle) provisions, ("d", node) deprovisions. fo-2's
    # power cycle is where replica a is killed.
    stream = [("p", "fo-0", False), ("p", "fo-1", False), ("d", "fo-0"), ("p", "fo-2", True),
              ("d", "fo-1"), ("p", "fo-3", False), ("p", "fo-0", False), ("d", "fo-3")]
    results: list = []
    client = cluster.client(cluster.a, cluster.b)  # a first: it serves until it dies

    def run_stream():
        for op in stream:
            if op[0] == "p":
                results.append(client.provision_node(op[1], image=golden.id, power_cycle=op[2]))
            else:
                results.append(client.deprovision_node(op[1]))

    runner = threading.Thread(target=run_stream)
    runner.start()
    observer = cluster.client(cluster.b)
    _wait_for(lambda: observer.get_node("fo-2").state == PROVISIONING, "fo-2 provisioning on a")
    cluster.a.kill()
    gate.touch()  # the orphaned power command may end now; a is gone
    runner.join(300)
    assert not runner.is_alive()

    assert len(results) == len(stream)  # every operation answered
    expected = {"p": PROVISIONED, "d": AVAILABLE}
    assert [r.state for r in results] == [expected[op[0]] for op in stream]
    assert client.server == cluster.b.address
    for name in names:  # exactly once: one "provisioned" per provision asked for
        asked = sum(op[0] == "p" and op[1] == name for op in stream)
        history = observer.get_node(name).history
        assert sum(t.reason.startswith("provisioned") for t in history) == asked, name
    reasons = [t.reason for t in observer.get_node("fo-2").history]
    assert any("rolled back" in r for r in reasons)  # b repaired a's half-made work
    _reaches_agreement(cluster, rbd_store, tgtd)

    cluster.a.start()  # back: it agrees, and serves
    after = cluster.client(cluster.a)
    assert sorted((n.name, n.state) for n in after.list_nodes(project=cluster.project)) == \
        sorted((n.name, n.state) for n in observer.list_nodes(project=cluster.project))
    assert after.deprovision_node("fo-2").state == AVAILABLE
    _check_agreement(cluster, rbd_store, tgtd)


def test_a_restarted_replica_repairs_its_previous_runs_work_at_once(
    cluster_with, tmp_path, raw_image, rbd_store, tgtd
):
    gate = tmp_path / "gate"
    slow_repair = {"BMI_REPLICA_LEASE_SECONDS": "600", "BMI_RECONCILE_SECONDS": "600"}
    cluster = cluster_with(
        all=slow_repair, a=_blocking_power(gate),
        b={"BMI_POWER_COMMANDS": json.dumps({"*": "true"})},
    )
    admin = cluster.client(cluster.b)
    golden = admin.upload_image(raw_image, "golden", project=cluster.project)
    admin.enroll_node("rs-0", cluster.project, macs=["52:54:00:79:00:01"])
    outcome: list = []
    client = cluster.client(cluster.a, cluster.b, max_attempts=400)

    def provision():
        outcome.append(client.provision_node("rs-0", image=golden.id, power_cycle=True,
                                             request_id="rs-once"))

    runner = threading.Thread(target=provision)
    runner.start()
    _wait_for(lambda: admin.get_node("rs-0").state == PROVISIONING, "rs-0 provisioning on a")
    cluster.a.kill()
    # b leaves a's work alone (a's lease runs for 10 minutes): the retry waits.
    with pytest.raises(grpc.RpcError) as busy:
        cluster.client(cluster.b, max_attempts=1).provision_node(
            "rs-0", image=golden.id, request_id="rs-once")
    assert busy.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "in progress" in busy.value.details()
    # a restarts under its name: its old lease is dropped and its start-up reconcile
    # rolls the provisioning back; the waiting retry then provisions, once.
    cluster.a.env["BMI_POWER_COMMANDS"] = json.dumps({"*": "true"})
    cluster.a.start()
    gate.touch()
    runner.join(300)
    assert not runner.is_alive()
    assert outcome and outcome[0].state == PROVISIONED
    history = [t.reason for t in admin.get_node("rs-0").history]
    assert any("rolled back on restart" in r for r in history)
    assert sum(r.startswith("provisioned") for r in history) == 1
    _check_agreement(cluster, rbd_store, tgtd)


# -- helpers -------------------------------------------------------------------------------


def _volumes_of(rbd_store, project: str, kind: str) -> set[str]:
    return {
        v.metadata.get("bmi.id")
        for v in rbd_store.list_volumes()
        if v.metadata.get("bmi.project") == project
        and v.metadata.get(volume_metadata.KIND) == kind
    }


def _reaches_agreement(cluster: Cluster, rbd_store, tgtd, deadline: float = 120) -> None:
    """``_check_agreement`` once the survivor's repair has run: a clone the killed replica
    left half made is removed only when Ceph drops the dead client's watch on it (30 s),
    in a later reconcile round than the node's rollback."""
    end = time.monotonic() + deadline
    while True:
        try:
            return _check_agreement(cluster, rbd_store, tgtd)
        except AssertionError:
            if time.monotonic() > end:
                raise
            time.sleep(1)


def _check_agreement(cluster: Cluster, rbd_store, tgtd) -> None:
    """Database (through either replica), Ceph and tgtd tell the same story."""
    live = [r for r in cluster.replicas.values() if r.proc and r.proc.poll() is None]
    views = []
    for replica in live:
        client = cluster.client(replica)
        nodes = list(client.list_nodes(project=cluster.project))
        disks = {d.id for d in client.list_disks(project=cluster.project)}
        views.append((sorted((n.name, n.state, n.disk_id) for n in nodes), disks))
        assert all(n.state in (AVAILABLE, PROVISIONED) for n in nodes)
        assert {n.disk_id for n in nodes if n.disk_id} <= disks
    assert all(view == views[0] for view in views)
    nodes, disks = views[0]
    assert _volumes_of(rbd_store, cluster.project, "disk") == disks
    wanted = {f"iqn.2026-11.org.moc.bmi:{disk}" for _, state, disk in nodes if disk}
    ours = {f"iqn.2026-11.org.moc.bmi:{disk}" for disk in disks}
    listed = parse_targets(tgtd.tgtadm("--op", "show", "--mode", "target").stdout)
    assert {iqn for iqn in listed if iqn in ours} == wanted
