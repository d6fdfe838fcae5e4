"""End to end in QEMU: nodes PXE-boot iPXE, register themselves, get provisioned through
the API and boot their own copy-on-write clone through tgtd."""

from __future__ import annotations

import re
import subprocess
import time

import pytest
import rbd
from bmi.v1 import images_pb2, nodes_pb2
from bmi_client.client import BmiClient
from boot_fixtures import module_client, qemu_boot_env
from server_process import ADMIN_TOKEN, TENANT_TOKENS, ServerProcess

from bmi_server.devenv.qemu_node import QemuNode, write_chain_script
from bmi_server.devenv.test_disk import LABEL_LBA, SECTOR, build_test_disk

MARKER = r"BMI-BOOT-MARKER id={label} boot={boot}"
BOOT_TIMEOUT = 120


@pytest.fixture(scope="module")
def boot_server(ceph_cluster, tgtd, tmp_path_factory):
    process = ServerProcess(
        tmp_path_factory.mktemp("boot-state"), str(ceph_cluster.conf_path), ceph_cluster.pool,
        tgtd=tgtd, extra_env=qemu_boot_env(tgtd, BMI_TARGET_AUDIT_SECONDS="1"),
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def tftp(boot_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tftp")
    port = boot_server.http_address.rpartition(":")[2]
    write_chain_script(folder, f"10.0.2.2:{port}")
    return folder


admin = module_client("boot_server", ADMIN_TOKEN)
alice = module_client("boot_server", TENANT_TOKENS["alice"])


@pytest.fixture(scope="module")
def bootable(admin, tmp_path_factory):
    disk = build_test_disk(tmp_path_factory.mktemp("disk") / "bootable.raw", label="GOLDEN")
    return admin.upload_image(disk, "bootable", project="ops",
                              visibility=images_pb2.VISIBILITY_PUBLIC)


def wait_for(predicate, what: str, timeout: float = BOOT_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def node_by_mac(client: BmiClient, mac: str):
    return next((n for n in client.list_nodes() if mac in n.macs), None)


def write_label(ioctx, disk_id: str, label: str) -> None:
    with rbd.Image(ioctx, "bmi-" + disk_id) as volume:
        volume.write(label.encode().ljust(SECTOR, b"\0"), LABEL_LBA * SECTOR)


@pytest.fixture
def qemu_nodes(tftp, tmp_path):
    started: list[QemuNode] = []

    def start(name: str, mac: str) -> QemuNode:
        work = tmp_path / name
        work.mkdir()
        node = QemuNode(name, mac, tftp, work, serial=f"SN-{name}")
        node.power_on()
        started.append(node)
        return node

    yield start
    for node in started:
        node.power_off()


def discover_and_enrol(admin, vm: QemuNode, name: str):
    seen = wait_for(lambda: node_by_mac(admin, vm.mac), f"{vm.name} to register at PXE boot")
    assert seen.state == nodes_pb2.NODE_STATE_DISCOVERED
    assert seen.smbios.serial == vm.serial and seen.smbios.uuid == vm.uuid
    return admin.enroll_node(name, "alice", discovered_node=seen.id)


def test_nodes_self_register_provision_and_boot_their_own_clones(
    admin, alice, bootable, qemu_nodes, ioctx, tgtd, boot_server
):
    vm_a = qemu_nodes("vm-a", "52:54:00:0b:00:01")
    vm_b = qemu_nodes("vm-b", "52:54:00:0b:00:02")
    for vm, name in ((vm_a, "node-a"), (vm_b, "node-b")):
        discover_and_enrol(admin, vm, name)

    # Provisioned while the nodes wait at PXE; they pick up their plan at the next ask.
    a = alice.provision_node("node-a", image="bootable")
    b = alice.provision_node("node-b", image="bootable")
    assert a.state == nodes_pb2.NODE_STATE_PROVISIONED and a.disk_id != b.disk_id
    assert a.target.portals == [f"10.0.2.2:{tgtd.portal.rpartition(':')[2]}"]
    write_label(ioctx, a.disk_id, "NODE-A")  # each clone gets its own identity
    write_label(ioctx, b.disk_id, "NODE-B")

    vm_a.wait_for_serial(MARKER.format(label="NODE-A", boot=1), BOOT_TIMEOUT)
    vm_b.wait_for_serial(MARKER.format(label="NODE-B", boot=1), BOOT_TIMEOUT)
    # Both wrote their boot counter: if they shared a disk, one would say boot=2.
    wait_for(lambda: alice.get_node("node-a").state == nodes_pb2.NODE_STATE_ACTIVE,
             "node-a to become active")
    history = [t.to_state for t in alice.get_node("node-a").history]
    assert history[-4:] == [nodes_pb2.NODE_STATE_PROVISIONING, nodes_pb2.NODE_STATE_PROVISIONED,
                            nodes_pb2.NODE_STATE_BOOTING, nodes_pb2.NODE_STATE_ACTIVE]

    vm_a.reset()  # its own write survived on its own disk
    vm_a.wait_for_serial(MARKER.format(label="NODE-A", boot=2), BOOT_TIMEOUT)
    assert MARKER.format(label="NODE-B", boot=2) not in vm_b.serial_text()

    fresh = alice.reprovision_node("node-a")
    assert fresh.disk_id != a.disk_id
    vm_a.reset()  # a fresh clone: the golden label, first boot again
    vm_a.wait_for_serial(MARKER.format(label="GOLDEN", boot=1), BOOT_TIMEOUT)

    for name in ("node-a", "node-b"):
        alice.deprovision_node(name)
    assert list_targets(tgtd) == []
    assert [d.id for d in admin.list_disks()] == []


def test_wrong_chap_and_foreign_initiator_are_refused(admin, alice, bootable, tgtd, boot_server):
    admin.enroll_node("chap-a", "alice", macs=["52:54:00:0c:00:01"])
    admin.enroll_node("chap-b", "alice", macs=["52:54:00:0c:00:02"])
    a = alice.provision_node("chap-a", image="bootable")
    b = alice.provision_node("chap-b", image="bootable")
    creds_a = boot_script_credentials(boot_server, "52:54:00:0c:00:01")
    creds_b = boot_script_credentials(boot_server, "52:54:00:0c:00:02")
    portal = tgtd.portal

    assert inquire(portal, a.target.iqn, creds_a["initiator"], creds_a["user"],
                   creds_a["password"]) == 0
    wrong = creds_a["password"][:-1] + ("x" if creds_a["password"][-1] != "x" else "y")
    assert inquire(portal, a.target.iqn, creds_a["initiator"], creds_a["user"], wrong) != 0
    # Node B's initiator with node A's credentials: refused by the initiator ACL.
    assert inquire(portal, a.target.iqn, creds_b["initiator"], creds_a["user"],
                   creds_a["password"]) != 0
    # Node B's own credentials do not open node A's target either.
    assert inquire(portal, a.target.iqn, creds_a["initiator"], creds_b["user"],
                   creds_b["password"]) != 0
    for name in ("chap-a", "chap-b"):
        alice.deprovision_node(name)
    assert b.target.iqn not in list_targets(tgtd)


def test_tgtd_restart_brings_every_target_back(admin, alice, bootable, tgtd, boot_server):
    admin.enroll_node("restart-a", "alice", macs=["52:54:00:0d:00:01"])
    node = alice.provision_node("restart-a", image="bootable")
    assert node.target.iqn in list_targets(tgtd)
    tgtd.restart()  # tgtd forgets every target; the server's audit re-creates them
    creds = boot_script_credentials(boot_server, "52:54:00:0d:00:01")
    # The target shows in tgtd before its LUN, CHAP account and ACL are back: wait for a
    # login with the node's credentials, not for the target's name.
    wait_for(lambda: inquire(tgtd.portal, node.target.iqn, creds["initiator"], creds["user"],
                             creds["password"]) == 0, "the target to be re-created", 30)
    alice.deprovision_node("restart-a")
    assert list_targets(tgtd) == []


def list_targets(tgtd) -> list[str]:
    out = tgtd.tgtadm("--op", "show", "--mode", "target").stdout
    return re.findall(r"^Target \d+: (\S+)", out, re.MULTILINE)


def boot_script_credentials(server: ServerProcess, mac: str) -> dict[str, str]:
    """What the node itself is told (the only place its CHAP secret is ever shown)."""
    import urllib.request

    with urllib.request.urlopen(f"http://{server.http_address}/boot.ipxe?mac={mac}") as reply:
        script = reply.read().decode()
    found = dict(re.findall(r"^set (initiator-iqn|username|password) (\S+)$", script, re.M))
    return {"initiator": found["initiator-iqn"], "user": found["username"],
            "password": found["password"]}


def inquire(portal: str, iqn: str, initiator: str, user: str, password: str) -> int:
    url = f"iscsi://{user}%{password}@{portal}/{iqn}/1"
    return subprocess.run(["iscsi-inq", "-i", initiator, url], capture_output=True,
                          timeout=30).returncode
