"""End to end in QEMU with the node agent: a node PXE-boots iPXE, which boots the agent's
kernel + initramfs (built by bmi_server/devenv/agent_image.py, cached); the agent reports
the machine's inventory, receives its boot plan, logs in to its clone over iSCSI inside
the guest, and switch_roots into the OS on it, whose init prints a marker on the serial
port, then mounts its config drive (LUN 2 of the same target, through the same iSCSI
session) and prints the instance id and host name it finds; the server shows the node
active. After a reprovision the next boot finds a new instance id.

The BootService token rules are checked here too, through a real server, without QEMU.
"""

from __future__ import annotations

import re
import time
import urllib.request
from datetime import UTC

import grpc
import pytest
from bmi.v1 import boot_pb2, boot_pb2_grpc, images_pb2, inventory_pb2, nodes_pb2
from bmi_client.client import BmiClient, node_config
from boot_fixtures import module_client, qemu_boot_env
from server_process import ADMIN_TOKEN, TENANT_TOKENS, ServerProcess

from bmi_server.devenv import agent_image
from bmi_server.devenv.qemu_node import QemuNode, write_chain_script
from bmi_server.devenv.test_rootfs import CONFIG_RE, MARKER_RE, build_root_fs

pytestmark = pytest.mark.slow

BOOT_TIMEOUT = 300  # TCG: the agent's Python and grpc are slow to start, not to run
MEMORY_MIB = 512
CPUS = 2
TOKEN = "bmi-boot-token"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """The agent's kernel + initrd (reused when its inputs did not change)."""
    return agent_image.build(log=print)


@pytest.fixture(scope="module")
def agent_server(ceph_cluster, tgtd, tmp_path_factory, image):
    process = ServerProcess(
        tmp_path_factory.mktemp("agent-state"), str(ceph_cluster.conf_path), ceph_cluster.pool,
        tgtd=tgtd,
        extra_env=qemu_boot_env(
            tgtd,
            BMI_DISCOVERY_MODE="inventory",
            BMI_AGENT_IMAGE_DIR=str(image.directory),
            BMI_AGENT_HEARTBEAT_SECONDS="1",
            BMI_AGENT_RETRY_DELAY_SECONDS="1",
        ),
    )
    process.start()
    yield process
    process.stop()


admin = module_client("agent_server", ADMIN_TOKEN)
alice = module_client("agent_server", TENANT_TOKENS["alice"])


@pytest.fixture(scope="module")
def boot_stub(agent_server):
    with grpc.insecure_channel(agent_server.address) as channel:
        yield boot_pb2_grpc.BootServiceStub(channel)


@pytest.fixture(scope="module")
def agent_os(admin, tmp_path_factory):
    """A tiny ext4 OS whose init prints BMI-ROOT-MARKER, uploaded as a public image."""
    rootfs = build_root_fs(
        tmp_path_factory.mktemp("rootfs") / "agent-os.img", agent_image.busybox_binary()
    )
    return admin.upload_image(
        rootfs, "agent-os", project="ops", visibility=images_pb2.VISIBILITY_PUBLIC
    )


def wait_for(predicate, what: str, timeout: float = BOOT_TIMEOUT, vm: QemuNode | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    serial = f"; serial:\n{vm.serial_text()[-3000:]}" if vm else ""
    raise AssertionError(f"timed out waiting for {what}{serial}")


def node_by_mac(client: BmiClient, mac: str):
    return next((n for n in client.list_nodes() if mac in n.macs), None)


def boot_script(server: ServerProcess, mac: str) -> str:
    with urllib.request.urlopen(f"http://{server.http_address}/boot.ipxe?mac={mac}") as reply:
        return reply.read().decode()


def script_args(script: str) -> dict[str, str]:
    kernel = next(line for line in script.splitlines() if line.startswith("kernel "))
    return dict(w.split("=", 1) for w in kernel.split() if "=" in w)


def seconds(history, start: float, needle: str) -> float:
    """Seconds from ``start`` (epoch) to the first later transition mentioning ``needle``."""
    for t in history:
        at = t.time.ToDatetime(tzinfo=UTC).timestamp()
        if needle in t.reason and at >= start:
            return at - start
    raise AssertionError(f"no transition mentioning {needle!r} after {start}")


def test_node_boots_its_clone_through_the_agent(admin, alice, agent_os, agent_server, tmp_path):
    mac = "52:54:00:a6:00:01"
    work = tmp_path / "vm"
    work.mkdir()
    tftp = tmp_path / "tftp"
    write_chain_script(tftp, f"10.0.2.2:{agent_server.http_address.rpartition(':')[2]}")
    vm = QemuNode("agent-vm", mac, tftp, work, serial="SN-AGENT-1", memory_mib=MEMORY_MIB,
                  cpus=CPUS)  # fmt: skip
    started = time.time()
    vm.power_on()
    try:
        # Unknown: it is recorded as discovered and sent to the agent for inventory.
        seen = wait_for(lambda: node_by_mac(admin, mac), "the node to be discovered", vm=vm)
        assert seen.state == nodes_pb2.NODE_STATE_DISCOVERED
        node = wait_for(
            lambda: (n := admin.get_node(seen.id)).HasField("inventory") and n,
            "the agent's inventory",
            vm=vm,
        )
        registered_at = time.time() - started
        inv = node.inventory
        assert [nic.mac for nic in inv.interfaces] == [mac]
        assert inv.interfaces[0].driver == "virtio_net" and inv.interfaces[0].carrier
        assert inv.cpu.count == CPUS and inv.cpu.architecture == "x86_64"
        assert inv.memory.physical_bytes == MEMORY_MIB << 20
        assert 0 < inv.memory.usable_bytes < MEMORY_MIB << 20
        assert inv.system.serial == "SN-AGENT-1" and inv.system.uuid == vm.uuid
        assert inv.system.manufacturer == vm.manufacturer and inv.system.product == vm.product
        assert inv.firmware.kind == inventory_pb2.FIRMWARE_KIND_BIOS
        assert inv.collectors == ["generic"]
        assert node.state == nodes_pb2.NODE_STATE_DISCOVERED  # inventory changes no state

        # Enrolled and provisioned in agent mode: the waiting agent gets its plan.
        admin.enroll_node("agent-node", "alice", discovered_node=seen.id)
        provisioned = alice.provision_node(
            "agent-node", image="agent-os", boot_mode=nodes_pb2.BOOT_MODE_AGENT,
            config=node_config(hostname="agent-web1.example.org", metadata={"role": "test"}),
        )
        assert provisioned.boot_mode == nodes_pb2.BOOT_MODE_AGENT
        marker = vm.wait_for_serial(r"BMI-ROOT-MARKER [^\r\n]*", BOOT_TIMEOUT)
        marked_at = time.time() - started
        found = MARKER_RE.search(marker)
        assert found and found["label"] == "GOLDEN" and found["node"] == seen.id
        assert found["pid"] == "1" and re.fullmatch(r"/dev/sd[a-z]", found["root"])
        # Its config drive: LUN 2 of its target, through the session its root came by.
        drive = CONFIG_RE.search(vm.wait_for_serial(r"BMI-CONFIG-MARKER [^\r\n]*\n", 60))
        assert drive, vm.serial_text()[-2000:]
        assert drive["instance"] == provisioned.identity.instance_id
        assert drive["hostname"] == "agent-web1.example.org" and drive["label"] == "cidata"
        assert drive["lun"].endswith(":2") and drive["session"].startswith("session")
        assert drive["session"] == drive["root_session"]
        print("config drive seen by the node:", drive.group(0))
        active = wait_for(
            lambda: (n := alice.get_node("agent-node")).state == nodes_pb2.NODE_STATE_ACTIVE and n,
            "the node to become active",
        )
        reasons = [t.reason for t in active.history]
        steps = ["agent took its boot plan", "agent attaching", "agent attached",
                 "agent mounted", "agent pivoted"]  # fmt: skip
        positions = [next(i for i, r in enumerate(reasons) if r.startswith(s)) for s in steps]
        assert positions == sorted(positions), reasons
        assert [t.to_state for t in active.history][-1] == nodes_pb2.NODE_STATE_ACTIVE
        assert "bmi.token" not in vm.serial_text()  # the console never shows the token
        timings = {
            "registered": registered_at,
            "plan": seconds(active.history, started, "agent took its boot plan"),
            "iSCSI attached": seconds(active.history, started, "agent attached"),
            "pivot": seconds(active.history, started, "agent pivoted"),
            "marker": marked_at,
        }
        print("agent boot (fast track) after power-on:",
              ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))  # fmt: skip

        # Reprovisioned, then a reboot: iPXE boots the agent directly (agent mode) with a
        # fresh token; the fresh clone comes with a new config drive: a new instance id.
        renewed = alice.reprovision_node("agent-node")
        assert renewed.identity.instance_id != provisioned.identity.instance_id
        def drives() -> list[tuple[str, ...]]:  # complete lines only
            return CONFIG_RE.findall("".join(
                line for line in vm.serial_text().splitlines(keepends=True)
                if line.endswith("\n")))  # fmt: skip

        count = len(drives())
        rebooted = time.time()
        vm.reset()
        wait_for(lambda: len(drives()) > count, "the second boot's markers", vm=vm)
        second = drives()[-1]
        assert second[4:] == (renewed.identity.instance_id, "agent-web1.example.org")
        assert second[1] == second[2]  # the drive's session is the root's
        print("after reprovision and reset:", " ".join(second))
        again = wait_for(
            lambda: (
                (n := alice.get_node("agent-node")).state == nodes_pb2.NODE_STATE_ACTIVE
                and n.history[-1].time.ToDatetime(tzinfo=UTC).timestamp() > rebooted
                and n
            ),
            "the node to become active again",
        )
        print("agent boot (agent mode) after reset:",
              f"script {seconds(again.history, rebooted, 'fetched its boot script'):.1f}s,",
              f"registered {seconds(again.history, rebooted, 'agent registered'):.1f}s,",
              f"pivot {seconds(again.history, rebooted, 'agent pivoted'):.1f}s")  # fmt: skip
    finally:
        vm.power_off()
    alice.deprovision_node("agent-node")


def _call(method, request, token: str):
    return method(request, metadata=((TOKEN, token),), timeout=10)


def test_boot_tokens_are_bound_to_one_node_and_one_boot(admin, alice, agent_os, boot_stub,
                                                        agent_server):  # fmt: skip
    macs = ["52:54:00:a7:00:01", "52:54:00:a7:00:02"]
    for i, mac in enumerate(macs):
        admin.enroll_node(f"token-{i}", "alice", macs=[mac])
        alice.provision_node(f"token-{i}", image="agent-os", boot_mode=nodes_pb2.BOOT_MODE_AGENT)
    a, b = (script_args(boot_script(agent_server, mac)) for mac in macs)
    assert a["bmi.node"] != b["bmi.node"] and a["bmi.token"] != b["bmi.token"]
    assert a["BOOTIF"] == "01-52-54-00-a7-00-01" and a["console"] == "ttyS0"
    assert a["bmi.server"].endswith(":" + agent_server.address.rpartition(":")[2])
    plan_a = boot_pb2.GetBootPlanRequest(node_id=a["bmi.node"])

    def refused(request, token, method=boot_stub.GetBootPlan):
        with pytest.raises(grpc.RpcError) as caught:
            _call(method, request, token)
        return caught.value.code()

    # B's token never opens A's plan; no token, a wrong one, or A's API token neither.
    assert refused(plan_a, b["bmi.token"]) == grpc.StatusCode.UNAUTHENTICATED
    assert refused(plan_a, "") == grpc.StatusCode.UNAUTHENTICATED
    assert refused(plan_a, a["bmi.token"][:-1] + "x") == grpc.StatusCode.UNAUTHENTICATED
    assert refused(plan_a, ADMIN_TOKEN) == grpc.StatusCode.UNAUTHENTICATED
    plan = _call(boot_stub.GetBootPlan, plan_a, a["bmi.token"])
    assert plan.action == boot_pb2.BOOT_PLAN_ACTION_ATTACH
    node_a = alice.get_node("token-0")
    assert plan.target.iqn == node_a.target.iqn and plan.target.lun == 1
    assert plan.target.initiator_iqn == node_a.target.initiator_iqn
    assert plan.target.chap_user and len(plan.target.chap_secret) >= 12
    assert list(plan.target.portals) == list(node_a.target.portals)

    # An inventory that is not A's (none of A's MACs) is refused.
    other = boot_pb2.RegisterRequest(
        node_id=a["bmi.node"],
        inventory=inventory_pb2.Inventory(
            interfaces=[inventory_pb2.NetworkInterface(name="eth0", mac=macs[1])]
        ),
    )
    assert refused(other, a["bmi.token"], boot_stub.Register) == grpc.StatusCode.PERMISSION_DENIED

    # The pivot makes A active and revokes its token; fetching a new script replaces B's.
    _call(
        boot_stub.ReportStatus,
        boot_pb2.ReportStatusRequest(
            node_id=a["bmi.node"], phase=boot_pb2.AGENT_PHASE_PIVOTING, detail="test"
        ),
        a["bmi.token"],
    )
    assert alice.get_node("token-0").state == nodes_pb2.NODE_STATE_ACTIVE
    assert refused(plan_a, a["bmi.token"]) == grpc.StatusCode.UNAUTHENTICATED
    newer = script_args(boot_script(agent_server, macs[1]))
    plan_b = boot_pb2.GetBootPlanRequest(node_id=b["bmi.node"])
    assert refused(plan_b, b["bmi.token"]) == grpc.StatusCode.UNAUTHENTICATED
    assert _call(boot_stub.GetBootPlan, plan_b, newer["bmi.token"]).action == (
        boot_pb2.BOOT_PLAN_ACTION_ATTACH
    )
    # The agent's files are served; the API never shows a CHAP secret or a token.
    for path in ("/agent/vmlinuz", "/agent/initrd"):
        with urllib.request.urlopen(f"http://{agent_server.http_address}{path}") as reply:
            assert int(reply.headers["Content-Length"]) > 1 << 20
    shown = str(alice.get_node("token-1"))
    assert plan.target.chap_secret not in shown and newer["bmi.token"] not in shown
    for i in range(2):
        alice.deprovision_node(f"token-{i}")
