"""Per-project quotas through real gRPC, real bmi-server processes, Ceph and tgtd: a
create past a limit answers RESOURCE_EXHAUSTED and leaves nothing in Ceph, tgtd or the
catalogue; GetQuota shows the use; two replicas on one PostgreSQL racing for the last
disks let exactly the limit through."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from bmi.v1 import images_pb2, nodes_pb2
from bmi_client.client import BmiClient
from server_process import ADMIN_TOKEN, TENANT_TOKENS, ServerProcess

pytestmark = pytest.mark.ceph

MIB = 1 << 20
# alice's and bob's limits unless an admin sets their own: room for 2 images, 2 disks
# and 64 MiB of virtual size (the 4 MiB raw test image: 16 of them).
LIMITS = {"BMI_QUOTA_BYTES": "64M", "BMI_QUOTA_IMAGES": "2", "BMI_QUOTA_DISKS": "2"}
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def server(ceph_cluster, tgtd, tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("quota-state"), str(ceph_cluster.conf_path),
                            ceph_cluster.pool, tgtd=tgtd, extra_env=LIMITS)
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def sparse_qcow2(tmp_path) -> Path:
    """A qcow2 of a few hundred KiB on the wire and 1 GiB virtual."""
    path = tmp_path / "sparse.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"], check=True)
    assert path.stat().st_size < MIB
    return path


def exhausted(call) -> str:
    with pytest.raises(grpc.RpcError) as failed:
        call()
    assert failed.value.code() == EXHAUSTED, failed.value.details()
    return failed.value.details()


def targets(tgtd) -> list[str]:
    shown = tgtd.tgtadm("--lld", "iscsi", "--op", "show", "--mode", "target").stdout
    return sorted(re.findall(r"^Target \d+: (\S+)", shown, re.MULTILINE))


def test_creates_past_a_limit_are_refused_and_leave_nothing(server, tgtd, rbd_store,
                                                             raw_image, sparse_qcow2):
    alice = BmiClient(server.address, TENANT_TOKENS["alice"], timeout=60)
    bob = BmiClient(server.address, TENANT_TOKENS["bob"], timeout=60)
    admin = BmiClient(server.address, ADMIN_TOKEN, timeout=60)
    volumes = lambda: sorted(v.name for v in rbd_store.list_volumes())  # noqa: E731

    def world():
        """Ceph, tgtd, the catalogue and the upload spool."""
        return (volumes(), targets(tgtd), sorted(i.id for i in admin.list_images()),
                sorted(d.id for d in admin.list_disks()),
                sorted(server.state_dir.glob("spool/*")))

    start = volumes()
    empty = alice.get_quota()
    assert (empty.project, empty.virtual_bytes.limit, empty.images.limit, empty.disks.limit) \
        == ("alice", 64 * MIB, 2, 2)
    assert (empty.virtual_bytes.used, empty.images.used, empty.disks.used) == (0, 0, 0)
    assert not empty.images.overridden
    assert alice.upload_image(raw_image, "base").size_bytes == 4 * MIB
    disks = [alice.create_disk(f"d{n}", "base") for n in range(2)]
    node = admin.enroll_node("quota-n1", "alice", macs=["52:54:00:9a:00:01"])
    before = world()
    messages = []

    # A disk past the disk limit: by CreateDisk, and by ProvisionNode's clone.
    messages.append(exhausted(lambda: alice.create_disk("d2", "base")))
    assert messages[-1] == (
        "quota exceeded in project 'alice': disks: limit 2, in use 2, this request needs 1 "
        "more; delete some, or ask an admin to raise the quota")
    messages.append(exhausted(lambda: alice.provision_node("quota-n1", image="base")))
    shown = admin.get_node(node.id)
    assert shown.state == nodes_pb2.NODE_STATE_AVAILABLE and not shown.disk_id
    # A qcow2 counts its virtual size (1 GiB), known once the upload is inspected.
    messages.append(exhausted(lambda: alice.upload_image(sparse_qcow2, "sparse")))
    assert ("virtual bytes of images and disks: limit 64 MiB, in use 12 MiB, this request "
            "needs 1 GiB more") in messages[-1]
    assert world() == before

    # The second image is the last one: a raw upload past it is refused at its first
    # chunk, a snapshot and a copy before any Ceph step.
    alice.upload_image(raw_image, "second")
    after_second = world()
    for call in (lambda: alice.upload_image(raw_image, "third"),
                 lambda: alice.snapshot_disk("d0", "d0-snap"),
                 lambda: alice.copy_image("base", name="copy")):
        messages.append(exhausted(call))
        assert "images: limit 2, in use 2, this request needs 1 more" in messages[-1]
    assert world() == after_second
    for message in messages:  # no ids, pool names or server paths
        assert not re.search(r"img-|dsk-|bmi-|/", message), message
    used = alice.get_quota()
    assert (used.virtual_bytes.used, used.images.used, used.disks.used) == (16 * MIB, 2, 2)
    assert bob.get_quota().images.used == 0  # bob's project is his own
    with pytest.raises(grpc.RpcError) as denied:
        bob.get_quota("alice")
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

    # Only an admin gives alice room for one more disk; then the provisioning goes through.
    with pytest.raises(grpc.RpcError) as denied:
        alice.set_quota("alice", max_disks=3)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    raised = admin.set_quota("alice", max_disks=3)
    assert (raised.disks.limit, raised.disks.overridden) == (3, True)
    assert (raised.images.limit, raised.images.overridden) == (2, False)
    done = alice.provision_node("quota-n1", image="base")
    assert done.state == nodes_pb2.NODE_STATE_PROVISIONED and done.disk_id
    assert alice.get_quota().disks.used == 3

    admin.deprovision_node(node.id)
    for disk in disks:
        alice.delete_disk(disk.id)
    for name in ("base", "second"):
        alice.delete_image(name)
    assert admin.set_quota("alice", reset=True).disks.limit == 2
    assert alice.get_quota().virtual_bytes.used == 0
    assert volumes() == start
    for client in (alice, bob, admin):
        client.close()


def test_quota_cli_against_the_server(server, tmp_path):
    bmi_command = str(Path(sys.executable).parent / "bmi")

    def bmi(token: str, *args: str) -> subprocess.CompletedProcess:
        env = {"BMI_SERVER": server.address, "BMI_TOKEN": token, "PATH": os.environ["PATH"],
               "HOME": str(tmp_path)}
        return subprocess.run([bmi_command, *args], env=env, capture_output=True, text=True,
                              timeout=60)

    shown = bmi(TENANT_TOKENS["bob"], "quota", "show")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.split("\n")[0].strip() == "quota of project bob"
    assert ["disks", "2", "0", "2", "default"] in [line.split() for line in
                                                    shown.stdout.splitlines()]
    refused = bmi(TENANT_TOKENS["bob"], "quota", "set", "bob", "--disks", "100")
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr
    set_ = bmi(ADMIN_TOKEN, "quota", "set", "bob", "--bytes", "10T", "--images", "0")
    assert set_.returncode == 0, set_.stderr
    rows = {line.split()[0]: line.split() for line in set_.stdout.splitlines()[2:]}
    assert rows["bytes"][1:3] == ["10.0", "TiB"] and rows["bytes"][-1] == "project"
    assert rows["images"][1] == "unlimited"
    assert bmi(ADMIN_TOKEN, "quota", "set", "bob", "--reset").returncode == 0


def test_two_replicas_racing_for_the_last_disks_let_exactly_the_limit_through(
    ceph_cluster, tgtd, tmp_path, fresh_postgres, raw_image, rbd_store
):
    """12 CreateDisk calls at once, half to each of two replicas on one PostgreSQL, for a
    project with room for 5 disks: 5 are made, 7 answer RESOURCE_EXHAUSTED, and Ceph
    holds exactly 5 new clones."""
    database = fresh_postgres()
    replicas = [
        ServerProcess(tmp_path / name, str(ceph_cluster.conf_path), ceph_cluster.pool, database,
                      tgtd=tgtd, extra_env={"BMI_REPLICA_NAME": name, "BMI_QUOTA_DISKS": "5"})
        for name in ("a", "b")
    ]
    clients: list[BmiClient] = []
    try:
        for replica in replicas:
            replica.start()
        clients = [BmiClient(r.address, TENANT_TOKENS["alice"], timeout=60) for r in replicas]
        image = clients[0].upload_image(raw_image, "race-base")
        before = sorted(v.name for v in rbd_store.list_volumes())

        def create(n: int) -> str:
            try:
                clients[n % 2].create_disk(f"race-{n}", image.id)
                return "ok"
            except grpc.RpcError as exc:
                assert exc.code() == EXHAUSTED, exc.details()
                return "refused"

        with ThreadPoolExecutor(12) as pool:
            outcomes = sorted(pool.map(create, range(12)))
        assert outcomes == ["ok"] * 5 + ["refused"] * 7
        made = sorted(v.name for v in rbd_store.list_volumes() if v.name not in before)
        disks = list(clients[1].list_disks())
        assert len(made) == 5 and sorted("bmi-" + d.id for d in disks) == made
        assert clients[1].get_quota().disks.used == 5
        for disk in disks:
            clients[0].delete_disk(disk.id)
        clients[0].delete_image(image.id)
    finally:
        for client in clients:
            client.close()
        for replica in replicas:
            replica.stop()


def test_public_images_count_for_their_own_project_only(server, raw_image):
    with BmiClient(server.address, ADMIN_TOKEN, timeout=60) as admin:
        public = admin.upload_image(raw_image, "quota-public", project="ops",
                                    visibility=images_pb2.VISIBILITY_PUBLIC)
        try:
            assert admin.get_quota("ops").images.used == 1
            assert admin.get_quota("alice").images.used == 0
        finally:
            admin.delete_image(public.id)
