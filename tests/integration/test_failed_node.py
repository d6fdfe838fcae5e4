"""A node left FAILED with its disk and target (its agent gave up) provisioned again, on a
real server, Ceph and tgtd: what it held is removed first and nothing is orphaned."""

from __future__ import annotations

import re
import urllib.request

import grpc
import pytest
import rbd
from bmi.v1 import boot_pb2, boot_pb2_grpc, images_pb2, nodes_pb2
from server_process import ServerProcess, config_drive_of

pytestmark = pytest.mark.ceph

MAC = "52:54:00:fa:11:ed"


@pytest.fixture(scope="module")
def server(ceph_cluster, tgtd, tmp_path_factory):
    """A server whose boot endpoint sends agent-mode nodes to an agent (files are stand-ins:
    no node boots them here; the test speaks for the agent)."""
    agent_image = tmp_path_factory.mktemp("agent-image")
    (agent_image / "vmlinuz").write_bytes(b"kernel")
    (agent_image / "initrd").write_bytes(b"initrd")
    process = ServerProcess(
        tmp_path_factory.mktemp("failed-node-state"), str(ceph_cluster.conf_path),
        ceph_cluster.pool, tgtd=tgtd, extra_env={"BMI_AGENT_IMAGE_DIR": str(agent_image)},
    )  # fmt: skip
    process.start()
    yield process
    process.stop()


def live_targets(tgtd) -> set[str]:
    out = tgtd.tgtadm("--op", "show", "--mode", "target").stdout
    return set(re.findall(r"^Target \d+: (\S+)", out, re.MULTILINE))


def agent_gives_up(server: ServerProcess) -> None:
    """The node fetches its boot script (the agent's, with a one-boot token) and its agent
    reports a failure it will not retry."""
    with urllib.request.urlopen(f"http://{server.http_address}/boot.ipxe?mac={MAC}") as reply:
        script = reply.read().decode()
    kernel = next(line for line in script.splitlines() if line.startswith("kernel "))
    args = dict(word.split("=", 1) for word in kernel.split() if "=" in word)
    with grpc.insecure_channel(server.address) as channel:
        boot_pb2_grpc.BootServiceStub(channel).ReportStatus(
            boot_pb2.ReportStatusRequest(node_id=args["bmi.node"],
                                         phase=boot_pb2.AGENT_PHASE_FAILED,
                                         detail="no iSCSI login", attempt=3),
            metadata=(("bmi-boot-token", args["bmi.token"]),), timeout=10,
        )  # fmt: skip


def test_provisioning_a_failed_node_removes_the_disk_and_target_it_held(
    server, admin, alice, raw_image, ioctx, tgtd
):
    image = admin.upload_image(raw_image, "failing-os", project="ops",
                               visibility=images_pb2.VISIBILITY_PUBLIC)  # fmt: skip
    volumes_before = set(rbd.RBD().list(ioctx))
    targets_before = live_targets(tgtd)
    admin.enroll_node("agent-fails", "alice", macs=[MAC])
    first = alice.provision_node("agent-fails", image="failing-os",
                                 boot_mode=nodes_pb2.BOOT_MODE_AGENT)  # fmt: skip
    agent_gives_up(server)
    failed = alice.get_node("agent-fails")
    assert failed.state == nodes_pb2.NODE_STATE_FAILED, failed.failure_reason
    assert (failed.disk_id, failed.target.iqn) == (first.disk_id, first.target.iqn)
    assert first.target.iqn in live_targets(tgtd)
    assert "bmi-" + first.disk_id in rbd.RBD().list(ioctx)

    again = alice.provision_node("agent-fails", image="failing-os",
                                 boot_mode=nodes_pb2.BOOT_MODE_AGENT)  # fmt: skip
    assert again.state == nodes_pb2.NODE_STATE_PROVISIONED and again.disk_id != first.disk_id
    assert set(rbd.RBD().list(ioctx)) - volumes_before == {"bmi-" + again.disk_id,
                                                           config_drive_of(again)}
    assert live_targets(tgtd) - targets_before == {again.target.iqn}
    assert [d.id for d in admin.list_disks()] == [again.disk_id]

    alice.deprovision_node("agent-fails")
    assert set(rbd.RBD().list(ioctx)) == volumes_before
    assert live_targets(tgtd) == targets_before
    assert list(admin.list_disks()) == []
    admin.delete_image(image.id)
