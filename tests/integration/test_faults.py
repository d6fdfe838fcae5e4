"""Component faults under a running server: Ceph's OSD stopped and started, the database
locked by another process or gone. Each call made during the fault fails fast with
UNAVAILABLE (within the client's deadline), leaves nothing half-done, and the same call
retried with the same request id succeeds once the component is back.

(tgtd killed under a booted guest: test_tgtd_fault.py; HIL slow or down:
test_hil_mode.py and test_hil_client.py.)
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import time
from collections.abc import Iterator

import grpc
import pytest
from bmi.v1 import nodes_pb2
from bmi_client.client import BmiClient
from server_process import ADMIN_TOKEN, TENANT_TOKENS, ServerProcess, config_drive_of

from bmi_server.adapters.ceph.rbd_store import RbdImageStore
from bmi_server.devenv.ceph_cluster import CephCluster
from bmi_server.devenv.postgres import PostgresInstance

CEPH_TIMEOUT = 3  # seconds per Ceph operation: a failed step and its rollback fit twice
DB_TIMEOUT = 1
CLIENT_DEADLINE = 30  # the bmi CLI's default
READY = 2  # RESOURCE_STATE_READY in the API


def mac_for(name: str) -> str:
    digest = hashlib.sha256(name.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def wait_for(predicate, what: str, timeout: float = 60, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def live_targets(tgtd) -> set[str]:
    out = tgtd.tgtadm("--op", "show", "--mode", "target").stdout
    return set(re.findall(r"^Target \d+: (\S+)", out, re.MULTILINE))


def one_attempt(server: ServerProcess, token: str) -> BmiClient:
    """A client that does not retry, with the CLI's deadline: what the caller sees."""
    return BmiClient(server.address, token, timeout=CLIENT_DEADLINE, max_attempts=1)


def code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as failed:
        call()
    return failed.value.code()


class World:
    """What the database, Ceph and tgtd hold for one server; checks they agree."""

    def __init__(self, admin: BmiClient, store: RbdImageStore, tgtd) -> None:
        self.admin, self.store, self.tgtd = admin, store, tgtd

    def __call__(self) -> tuple:
        disks = {d.id: d for d in self.admin.list_disks()}
        images = {i.id: i for i in self.admin.list_images()}
        nodes = {n.id: n for n in self.admin.list_nodes()}
        volumes = {v.name: v for v in self.store.list_volumes()}
        targets = live_targets(self.tgtd)
        records = {"bmi-" + i: r for i, r in [*disks.items(), *images.items()]}
        assert all(r.state == READY for r in records.values()), "a record left in transition"
        drives = {config_drive_of(n) for n in nodes.values() if n.identity.instance_id}
        assert set(records) | drives == set(volumes), "records and volumes differ"
        assert all(v.complete for v in volumes.values()), "an incomplete volume"
        exported = {n.target.iqn for n in nodes.values() if n.HasField("target")}
        assert exported <= targets, "a node's target is missing in tgtd"
        ours = {t for t in targets if any(t.endswith(d) for d in disks)}
        assert ours == exported, "a target no node claims"
        node_states = sorted((n.name, n.state) for n in nodes.values())
        return sorted(records), node_states, sorted(exported)


# -- Ceph: the OSD stopped and started ---------------------------------------------------


@pytest.fixture(scope="module")
def own_ceph() -> Iterator[CephCluster]:
    # Its own cluster: stopping the session cluster's OSD would stall every other test.
    cluster = CephCluster(memstore_bytes=256 << 20)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def ceph_server(own_ceph, tgtd, tmp_path_factory) -> Iterator[ServerProcess]:
    process = ServerProcess(
        tmp_path_factory.mktemp("faults-ceph"), str(own_ceph.conf_path), own_ceph.pool,
        tgtd=tgtd,
        extra_env={"BMI_CEPH_TIMEOUT_SECONDS": str(CEPH_TIMEOUT),
                   "BMI_SESSION_POLL_SECONDS": "0.5"},
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


def test_osd_down_fails_fast_with_nothing_half_done_and_retries_succeed(
    own_ceph, ceph_server, tgtd, raw_image
):
    store = RbdImageStore(str(own_ceph.conf_path), own_ceph.pool)
    admin = BmiClient(ceph_server.address, ADMIN_TOKEN, timeout=CLIENT_DEADLINE)
    alice = one_attempt(ceph_server, TENANT_TOKENS["alice"])
    try:
        image = admin.upload_image(raw_image, "osd-golden", project="alice")
        admin.enroll_node("osd-n1", "alice", macs=[mac_for("osd-n1")])
        world = World(admin, store, tgtd)
        before = world()

        own_ceph.stop_osd()
        try:
            assert code(lambda: alice.create_disk("osd-d1", image.id, request_id="osd-d1")) \
                == grpc.StatusCode.UNAVAILABLE  # not DEADLINE_EXCEEDED: it did not hang
            assert code(lambda: alice.provision_node("osd-n1", image=image.id,
                                                     request_id="osd-p1")) \
                == grpc.StatusCode.UNAVAILABLE
            node = alice.get_node("osd-n1")  # the database still answers
            assert node.state == nodes_pb2.NODE_STATE_AVAILABLE
            assert "rolled back" in node.history[-1].reason
        finally:
            own_ceph.start_osd()

        # Rollbacks the outage interrupted are finished in the background.
        wait_for(lambda: _agrees(world, before), "the outage's leftovers to be rolled back")

        made = alice.create_disk("osd-d1", image.id, request_id="osd-d1")
        assert made.state == READY
        assert alice.create_disk("osd-d1", image.id, request_id="osd-d1").id == made.id
        node = alice.provision_node("osd-n1", image=image.id, request_id="osd-p1")
        assert node.state == nodes_pb2.NODE_STATE_PROVISIONED
        after = world()
        assert len(after[0]) == len(before[0]) + 2  # the disk and the node's clone
        assert after[2] and after[2][0] == node.target.iqn
    finally:
        for node in admin.list_nodes():
            if node.HasField("target"):
                admin.deprovision_node(node.id)
        admin.close()
        alice.close()
        store.close()


def _agrees(world: World, expected: tuple) -> bool:
    try:
        return world() == expected
    except (AssertionError, grpc.RpcError):
        return False


# -- the database: SQLite locked by another process, PostgreSQL gone ---------------------


@pytest.fixture
def sqlite_server(ceph_cluster, tgtd, tmp_path) -> Iterator[ServerProcess]:
    process = ServerProcess(
        tmp_path / "state", str(ceph_cluster.conf_path), ceph_cluster.pool, tgtd=tgtd,
        extra_env={"BMI_DATABASE_TIMEOUT_SECONDS": str(DB_TIMEOUT)},
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


def test_sqlite_locked_by_another_process_is_unavailable_then_recovers(
    sqlite_server, rbd_store, tgtd, raw_image
):
    admin = BmiClient(sqlite_server.address, ADMIN_TOKEN, timeout=CLIENT_DEADLINE)
    alice = one_attempt(sqlite_server, TENANT_TOKENS["alice"])
    try:
        image = admin.upload_image(raw_image, "lock-golden", project="alice")
        admin.enroll_node("lock-n1", "alice", macs=[mac_for("lock-n1")])
        world = World(admin, _OnlyServerVolumes(rbd_store, image), tgtd)
        before = world()

        # Another process (this test) takes SQLite's write lock and keeps it.
        holder = sqlite3.connect(sqlite_server.state_dir / "bmi.sqlite3", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            assert code(lambda: alice.create_disk("lock-d1", image.id, request_id="lock-d1")) \
                == grpc.StatusCode.UNAVAILABLE
            assert code(lambda: alice.provision_node("lock-n1", image=image.id,
                                                     request_id="lock-p1")) \
                == grpc.StatusCode.UNAVAILABLE
            assert world() == before  # reads still work (WAL); nothing changed
        finally:
            holder.execute("ROLLBACK")
            holder.close()

        assert world() == before
        made = alice.create_disk("lock-d1", image.id, request_id="lock-d1")
        assert alice.create_disk("lock-d1", image.id, request_id="lock-d1").id == made.id
        node = alice.provision_node("lock-n1", image=image.id, request_id="lock-p1")
        assert node.state == nodes_pb2.NODE_STATE_PROVISIONED
        assert len(world()[0]) == len(before[0]) + 2
        admin.deprovision_node(node.id)
        admin.delete_disk(made.id)
        assert world() == before
    finally:
        admin.close()
        alice.close()


@pytest.fixture
def postgres() -> Iterator[PostgresInstance]:
    instance = PostgresInstance()
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


def test_postgres_gone_is_unavailable_then_recovers(
    postgres, ceph_cluster, rbd_store, tgtd, raw_image, tmp_path
):
    server = ServerProcess(
        tmp_path / "state", str(ceph_cluster.conf_path), ceph_cluster.pool, postgres.url,
        tgtd=tgtd, extra_env={"BMI_DATABASE_TIMEOUT_SECONDS": str(DB_TIMEOUT)},
    )
    server.start()
    admin = BmiClient(server.address, ADMIN_TOKEN, timeout=CLIENT_DEADLINE)
    alice = one_attempt(server, TENANT_TOKENS["alice"])
    try:
        image = admin.upload_image(raw_image, "pg-golden", project="alice")
        admin.enroll_node("pg-n1", "alice", macs=[mac_for("pg-n1")])
        world = World(admin, _OnlyServerVolumes(rbd_store, image), tgtd)
        before = world()
        targets = live_targets(tgtd)
        volumes = {v.name for v in rbd_store.list_volumes()}

        postgres.halt()
        try:
            for call in (
                lambda: alice.create_disk("pg-d1", image.id, request_id="pg-d1"),
                lambda: alice.provision_node("pg-n1", image=image.id, request_id="pg-p1"),
                lambda: alice.get_node("pg-n1"),
            ):
                assert code(call) == grpc.StatusCode.UNAVAILABLE
            assert {v.name for v in rbd_store.list_volumes()} == volumes  # no clone made
            assert live_targets(tgtd) == targets
        finally:
            postgres.resume()

        assert world() == before
        made = alice.create_disk("pg-d1", image.id, request_id="pg-d1")
        assert alice.create_disk("pg-d1", image.id, request_id="pg-d1").id == made.id
        node = alice.provision_node("pg-n1", image=image.id, request_id="pg-p1")
        assert node.state == nodes_pb2.NODE_STATE_PROVISIONED
        admin.deprovision_node(node.id)
        admin.delete_disk(made.id)
        assert world() == before
    finally:
        admin.close()
        alice.close()
        server.stop()


class _OnlyServerVolumes:
    """The session cluster's volumes of one test (other tests share the cluster): its
    golden image, every clone of it, complete or not, and the config drives of nodes
    booting those clones."""

    def __init__(self, store: RbdImageStore, golden) -> None:
        self._store, self._volume = store, "bmi-" + golden.id

    def list_volumes(self):
        every = self._store.list_volumes()
        mine = [v for v in every if self._volume in (v.name, v.parent)]
        disks = {v.name for v in mine}
        return mine + [v for v in every if v.metadata.get("bmi.kind") == "node-config"
                       and "bmi-" + v.metadata.get("bmi.disk_id", "") in disks]
