"""tgtd killed (-9) and restarted under a booted QEMU node: the server's target audit
puts the node's target back, the guest's initiator (iscsid, which took the session over
from the agent's iscsistart) logs in again within its replacement timeout, and the OS
on the iSCSI disk keeps running: its write/sync/read-back counter keeps advancing and
no I/O error appears.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
from bmi.v1 import images_pb2, nodes_pb2
from bmi_client.client import BmiClient
from server_process import ADMIN_TOKEN, TENANT_TOKENS, ServerProcess

from bmi_server.devenv import agent_image
from bmi_server.devenv.qemu_node import QemuNode, write_chain_script
from bmi_server.devenv.test_rootfs import IO_INIT, IO_RE, MARKER_RE, build_root_fs
from bmi_server.devenv.tgtd import Tgtd

pytestmark = pytest.mark.slow

BOOT_TIMEOUT = 300  # TCG: the agent's Python is slow to start
RECOVERY_TIMEOUT = 240
MAC = "52:54:00:f7:00:01"


@pytest.fixture(scope="module")
def own_tgtd() -> Iterator[Tgtd]:
    # Its own tgtd: this test kills it.
    with Tgtd() as daemon:
        yield daemon


@pytest.fixture(scope="module")
def fault_server(ceph_cluster, own_tgtd, tmp_path_factory) -> Iterator[ServerProcess]:
    image = agent_image.build(log=print)
    process = ServerProcess(
        tmp_path_factory.mktemp("tgtd-fault"), str(ceph_cluster.conf_path), ceph_cluster.pool,
        tgtd=own_tgtd,
        extra_env={
            "BMI_ADVERTISED_PORTALS": f"10.0.2.2:{own_tgtd.portal.rpartition(':')[2]}",
            "BMI_DISCOVERY_RETRY_SECONDS": "2",
            "BMI_SESSION_POLL_SECONDS": "0.3",
            "BMI_TARGET_AUDIT_SECONDS": "1",
            "BMI_AGENT_IMAGE_DIR": str(image.directory),
            "BMI_AGENT_RETRY_DELAY_SECONDS": "1",
            # Not quiet: the kernel's iSCSI messages on the console show what happened.
            "BMI_AGENT_KERNEL_ARGS": "console=ttyS0",
        },
    )  # fmt: skip
    process.start()
    try:
        yield process
    finally:
        process.stop()


def live_targets(tgtd: Tgtd) -> set[str]:
    out = tgtd.tgtadm("--op", "show", "--mode", "target").stdout
    return set(re.findall(r"^Target \d+: (\S+)", out, re.MULTILINE))


def io_lines(vm: QemuNode) -> list[re.Match]:
    return list(IO_RE.finditer(vm.serial_text()))


def recoveries(vm: QemuNode) -> int:
    return len(re.findall(r"connection\d+:\d+ is operational after recovery", vm.serial_text()))


def wait_for(predicate, what: str, timeout: float, vm: QemuNode):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; serial:\n{vm.serial_text()[-3000:]}")


def test_os_keeps_running_across_a_tgtd_kill_and_restart(
    fault_server, own_tgtd, tmp_path
):
    rootfs = build_root_fs(
        tmp_path / "io-os.img", agent_image.busybox_binary(), label="IO-OS", size_mib=48,
        init=IO_INIT, extra_trees=(agent_image.iscsid_tree(),),
    )
    admin = BmiClient(fault_server.address, ADMIN_TOKEN, timeout=120)
    alice = BmiClient(fault_server.address, TENANT_TOKENS["alice"], timeout=60)
    work, tftp = tmp_path / "vm", tmp_path / "tftp"
    work.mkdir()
    write_chain_script(tftp, f"10.0.2.2:{fault_server.http_address.rpartition(':')[2]}")
    vm = QemuNode("tgtd-fault-vm", MAC, tftp, work, memory_mib=512, cpus=2)
    try:
        admin.upload_image(rootfs, "io-os", project="ops",
                           visibility=images_pb2.VISIBILITY_PUBLIC)
        admin.enroll_node("io-node", "alice", macs=[MAC])
        node = alice.provision_node("io-node", image="io-os",
                                    boot_mode=nodes_pb2.BOOT_MODE_AGENT)
        vm.power_on()
        marker = MARKER_RE.search(vm.wait_for_serial(r"BMI-ROOT-MARKER [^\r\n]*", BOOT_TIMEOUT))
        assert marker and marker["label"] == "IO-OS" and marker["pid"] == "1"
        wait_for(lambda: len(io_lines(vm)) >= 3, "the OS's disk I/O loop", 120, vm)
        # iscsid takes the session over from the agent's iscsistart by re-logging it in
        # (its first recovery); only from then on is there anyone to recover it.
        wait_for(lambda: recoveries(vm) >= 1, "iscsid to take the session over", 120, vm)

        own_tgtd.restart()  # kill -9: every target, and the guest's connection, are gone
        killed_at = int(io_lines(vm)[-1]["n"])
        wait_for(lambda: node.target.iqn in live_targets(own_tgtd),
                 "the audit to re-create the target", 60, vm)
        wait_for(lambda: recoveries(vm) >= 2, "iscsid to log in again", RECOVERY_TIMEOUT, vm)
        wait_for(lambda: int(io_lines(vm)[-1]["n"]) >= killed_at + 10,
                 "the I/O counter to advance after the restart", RECOVERY_TIMEOUT, vm)

        serial = vm.serial_text()
        lines = io_lines(vm)
        assert [int(m["n"]) for m in lines] == list(range(1, len(lines) + 1))
        assert all(m["ok"] == "1" and m["errors"] == "0" for m in lines), serial[-3000:]
        assert "detected conn error" in serial  # the kernel saw the connection break
        assert alice.get_node("io-node").state == nodes_pb2.NODE_STATE_ACTIVE
    finally:
        vm.power_off()
        for n in admin.list_nodes():
            if n.HasField("target"):
                admin.deprovision_node(n.id)
        admin.close()
        alice.close()
