"""One of K tgtd processes killed (-9) and restarted under two booted QEMU nodes, one on
each process: only the killed process's node loses its connection; the audit re-creates
its target on the same process (same portal), its initiator logs in again and its OS's
I/O goes on. The other node never notices: no connection error, no recovery, its I/O
counter never stops. (test_tgtd_fault.py is the same with one tgtd.)
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
from bmi_server.devenv.tgtd import Tgtd, TgtdGroup

pytestmark = pytest.mark.slow

BOOT_TIMEOUT = 420  # TCG, two guests on two cores: the agent's Python is slow to start
RECOVERY_TIMEOUT = 240
MACS = ("52:54:00:f7:01:01", "52:54:00:f7:01:02")
GUEST_HOST = "10.0.2.2"


@pytest.fixture(scope="module")
def own_tgtds() -> Iterator[TgtdGroup]:
    # Their own tgtds: this test kills one.
    with TgtdGroup(2) as group:
        yield group


@pytest.fixture(scope="module")
def processes_server(ceph_cluster, own_tgtds, tmp_path_factory) -> Iterator[ServerProcess]:
    image = agent_image.build(log=print)
    process = ServerProcess(
        tmp_path_factory.mktemp("tgtd-processes"), str(ceph_cluster.conf_path),
        ceph_cluster.pool,
        extra_env={
            **own_tgtds.server_env(GUEST_HOST),
            "BMI_DISCOVERY_RETRY_SECONDS": "2",
            "BMI_SESSION_POLL_SECONDS": "0.3",
            "BMI_SESSION_SWEEP_SECONDS": "1",
            "BMI_TARGET_AUDIT_SECONDS": "1",
            "BMI_AGENT_IMAGE_DIR": str(image.directory),
            "BMI_AGENT_RETRY_DELAY_SECONDS": "1",
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


def io_count(vm: QemuNode) -> int:
    lines = list(IO_RE.finditer(vm.serial_text()))
    return int(lines[-1]["n"]) if lines else 0


def recoveries(vm: QemuNode) -> int:
    return len(re.findall(r"connection\d+:\d+ is operational after recovery", vm.serial_text()))


def wait_for(predicate, what: str, timeout: float, *vms: QemuNode):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    serials = "\n".join(f"--- {vm.name}:\n{vm.serial_text()[-2500:]}" for vm in vms)
    raise AssertionError(f"timed out waiting for {what}; serial:\n{serials}")


def test_killing_one_tgtd_process_touches_only_its_own_nodes(
    processes_server, own_tgtds, tmp_path
):
    rootfs = build_root_fs(
        tmp_path / "io-os.img", agent_image.busybox_binary(), label="IO-OS", size_mib=48,
        init=IO_INIT, extra_trees=(agent_image.iscsid_tree(),),
    )
    admin = BmiClient(processes_server.address, ADMIN_TOKEN, timeout=120)
    alice = BmiClient(processes_server.address, TENANT_TOKENS["alice"], timeout=60)
    tftp = tmp_path / "tftp"
    write_chain_script(tftp, f"{GUEST_HOST}:{processes_server.http_address.rpartition(':')[2]}")
    vms = [QemuNode(f"procs-vm{i}", mac, tftp, tmp_path / f"vm{i}", memory_mib=512, cpus=1)
           for i, mac in enumerate(MACS)]
    try:
        admin.upload_image(rootfs, "io-os", project="ops",
                           visibility=images_pb2.VISIBILITY_PUBLIC)
        nodes = []
        for i, mac in enumerate(MACS):
            admin.enroll_node(f"io-node{i}", "alice", macs=[mac])
            nodes.append(alice.provision_node(f"io-node{i}", image="io-os",
                                              boot_mode=nodes_pb2.BOOT_MODE_AGENT))
        # Least loaded: the first target on process 0, the second on process 1, and each
        # node is told its own process's portal.
        for process, node in enumerate(nodes):
            assert node.target.iqn in live_targets(own_tgtds[process])
            assert node.target.iqn not in live_targets(own_tgtds[1 - process])
            assert list(alice.get_node(node.name).target.portals) == [
                f"{GUEST_HOST}:{own_tgtds[process].port}"]
        for vm in vms:
            vm.power_on()
        for vm in vms:
            marker = MARKER_RE.search(vm.wait_for_serial(r"BMI-ROOT-MARKER [^\r\n]*",
                                                         BOOT_TIMEOUT))
            assert marker and marker["label"] == "IO-OS" and marker["pid"] == "1"
        for vm in vms:
            wait_for(lambda vm=vm: io_count(vm) >= 3, "the OS's disk I/O loop", 180, *vms)
            # iscsid takes the session over from the agent's iscsistart (a first recovery).
            wait_for(lambda vm=vm: recoveries(vm) >= 1, "iscsid to take the session over",
                     180, *vms)
        wait_for(lambda: all(alice.get_node(n.name).state == nodes_pb2.NODE_STATE_ACTIVE
                             for n in nodes), "both nodes active", 60, *vms)
        calm_serial = vms[0].serial_text()
        calm_recoveries = recoveries(vms[0])

        own_tgtds[1].restart()  # kill -9: process 1's targets and connections are gone
        untouched_at, killed_at = io_count(vms[0]), io_count(vms[1])
        assert nodes[0].target.iqn in live_targets(own_tgtds[0])
        wait_for(lambda: nodes[1].target.iqn in live_targets(own_tgtds[1]),
                 "the audit to re-create the target on the same process", 60, *vms)
        wait_for(lambda: recoveries(vms[1]) >= 2, "iscsid to log in again",
                 RECOVERY_TIMEOUT, *vms)
        wait_for(lambda: io_count(vms[1]) >= killed_at + 10,
                 "the I/O counter to advance after the restart", RECOVERY_TIMEOUT, *vms)
        # Meanwhile the node on process 0 kept writing.
        assert io_count(vms[0]) >= untouched_at + 10

        for vm in vms:
            lines = list(IO_RE.finditer(vm.serial_text()))
            assert [int(m["n"]) for m in lines] == list(range(1, len(lines) + 1))
            assert all(m["ok"] == "1" and m["errors"] == "0" for m in lines), \
                vm.serial_text()[-3000:]
        assert "detected conn error" in vms[1].serial_text()
        untouched = vms[0].serial_text()[len(calm_serial):]
        assert "detected conn error" not in untouched, untouched[-3000:]
        assert recoveries(vms[0]) == calm_recoveries
        assert live_targets(own_tgtds[0]) == {nodes[0].target.iqn}
        for node in nodes:
            assert alice.get_node(node.name).state == nodes_pb2.NODE_STATE_ACTIVE
        assert list(alice.get_node(nodes[1].name).target.portals) == [
            f"{GUEST_HOST}:{own_tgtds[1].port}"]
    finally:
        for vm in vms:
            vm.power_off()
        for n in admin.list_nodes():
            if n.HasField("target"):
                admin.deprovision_node(n.id)
        admin.close()
        alice.close()
