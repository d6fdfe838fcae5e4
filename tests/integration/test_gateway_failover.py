"""Gateway mode on one machine, all real: a bmi-server that drives no tgtd, two bmi-gateway
daemons each with its own tgtd (own port and control number), Ceph, and a QEMU node.

A disk is exported by both gateways and the node's iPXE script lists both portals
(multipath sanboot). Killing gateway 1 and its tgtd takes its portal out of the plan once
its heartbeat expires, and a fresh boot works through gateway 2; gateway 1 restarted on an
empty tgtd re-converges. A second test tampers with a gateway's tgtd and watches the
gateway repair it.
"""

from __future__ import annotations

import re
import urllib.request

import pytest
from bmi.v1 import images_pb2, nodes_pb2
from boot_fixtures import module_client
from gateway_process import GatewayProcess
from server_process import ADMIN_TOKEN, TENANT_TOKENS, ServerProcess
from test_network_boot import MARKER, list_targets, wait_for

from bmi_server.adapters.sql.store import SqlStateStore
from bmi_server.devenv.qemu_node import QemuNode, write_chain_script
from bmi_server.devenv.test_disk import build_test_disk
from bmi_server.devenv.tgtd import Tgtd

pytestmark = pytest.mark.slow

BOOT_TIMEOUT = 120
EXPIRY_SECONDS = 4
MAC = "52:54:00:0e:00:01"
TOKENS = {"gw1": "gateway-one-token", "gw2": "gateway-two-token"}


@pytest.fixture(scope="module")
def tgtds():
    daemons = {name: Tgtd() for name in TOKENS}
    for daemon in daemons.values():
        daemon.start()
    yield daemons
    for daemon in daemons.values():
        daemon.stop()


@pytest.fixture(scope="module")
def gw_server(ceph_cluster, tmp_path_factory):
    state = tmp_path_factory.mktemp("gw-server")
    (state / "gateway-tokens").write_text(
        "".join(f"{token} {name}\n" for name, token in TOKENS.items()))
    process = ServerProcess(
        state, str(ceph_cluster.conf_path), ceph_cluster.pool,
        extra_env={
            "BMI_TARGET_MODE": "gateways",
            "BMI_GATEWAY_HEARTBEAT_SECONDS": "1",
            "BMI_GATEWAY_EXPIRY_SECONDS": str(EXPIRY_SECONDS),
            "BMI_GATEWAY_APPLY_TIMEOUT_SECONDS": "60",
            "BMI_DISCOVERY_RETRY_SECONDS": "2",
            "BMI_SESSION_POLL_SECONDS": "0.3",
            "BMI_TARGET_AUDIT_SECONDS": "1",
        },
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def gateways(gw_server, tgtds, ceph_cluster, tmp_path_factory):
    logs = tmp_path_factory.mktemp("gateway-logs")
    procs = {
        name: GatewayProcess(name, TOKENS[name], gw_server.address, tgtds[name],
                             str(ceph_cluster.conf_path), ceph_cluster.pool, logs)
        for name in TOKENS
    }
    for proc in procs.values():
        proc.start()
    wait_for(lambda: live_gateways(gw_server) == set(TOKENS), "both gateways to announce", 30)
    yield procs
    for proc in procs.values():
        proc.stop()


def live_gateways(server: ServerProcess) -> set[str]:
    """Gateways the server counts as live, read from its database (as any replica would)."""
    from bmi_server.core.gateways import GatewayExports, GatewayPolicy

    store = SqlStateStore(f"sqlite:///{server.state_dir / 'bmi.sqlite3'}")
    try:
        policy = GatewayPolicy(heartbeat_seconds=1, expiry_seconds=EXPIRY_SECONDS)
        return set(GatewayExports(store, policy).live_gateways())
    finally:
        store.close()


admin = module_client("gw_server", ADMIN_TOKEN, timeout=90)
alice = module_client("gw_server", TENANT_TOKENS["alice"], timeout=90)


@pytest.fixture(scope="module")
def bootable(admin, tmp_path_factory):
    disk = build_test_disk(tmp_path_factory.mktemp("gw-disk") / "bootable.raw", label="GOLDEN")
    return admin.upload_image(disk, "gw-bootable", project="ops",
                              visibility=images_pb2.VISIBILITY_PUBLIC)


@pytest.fixture
def vm(gw_server, tmp_path):
    tftp = tmp_path / "tftp"
    tftp.mkdir()
    write_chain_script(tftp, f"10.0.2.2:{gw_server.http_address.rpartition(':')[2]}")
    started: list[QemuNode] = []

    def power_on(name: str) -> QemuNode:
        work = tmp_path / name
        work.mkdir()
        node = QemuNode(name, MAC, tftp, work, serial=f"SN-{name}")
        node.power_on()
        started.append(node)
        return node

    yield power_on
    for node in started:
        node.power_off()


def boot_script(server: ServerProcess, mac: str) -> str:
    with urllib.request.urlopen(f"http://{server.http_address}/boot.ipxe?mac={mac}") as reply:
        return reply.read().decode()


def sanboot_portals(script: str) -> list[str]:
    """host:port of every URI on the script's sanboot line."""
    line = next(ln for ln in script.splitlines() if ln.startswith("sanboot "))
    return [f"{m[0]}:{m[1]}" for m in re.findall(r"iscsi:([^:\s]+)::(\d+):1:", line)]


def test_a_dead_gateway_leaves_the_plan_and_the_node_boots_through_the_other(
    admin, alice, bootable, gateways, tgtds, gw_server, vm
):
    g1, g2 = gateways["gw1"], gateways["gw2"]
    admin.enroll_node("gw-node", "alice", macs=[MAC])
    node = alice.provision_node("gw-node", image="gw-bootable")
    iqn = node.target.iqn
    assert node.target.portals  # provisioning returns once one gateway applied it...
    wait_for(lambda: sorted(alice.get_node("gw-node").target.portals)
             == sorted([g1.portal, g2.portal]), "both gateways to export the disk", 30)
    assert iqn in list_targets(tgtds["gw1"]) and iqn in list_targets(tgtds["gw2"])

    # Multipath: iPXE gets both portals on one sanboot line and boots.
    first = vm("gw-vm-1")
    first.wait_for_serial(MARKER.format(label="GOLDEN", boot=1), BOOT_TIMEOUT)
    assert sorted(sanboot_portals(boot_script(gw_server, MAC))) == sorted([g1.portal, g2.portal])
    first.power_off()

    g1.kill()  # kill -9 the daemon and its tgtd: the host died
    tgtds["gw1"].kill()
    wait_for(lambda: alice.get_node("gw-node").target.portals == [g2.portal],
             "gateway 1 to expire from the plan", 30)
    assert sanboot_portals(boot_script(gw_server, MAC)) == [g2.portal]

    second = vm("gw-vm-2")  # a fresh boot: only gateway 2 is there
    second.wait_for_serial(MARKER.format(label="GOLDEN", boot=2), BOOT_TIMEOUT)
    # Gateway 2's heartbeat reports the session, which makes the node active.
    wait_for(lambda: alice.get_node("gw-node").state == nodes_pb2.NODE_STATE_ACTIVE,
             "the node to become active through gateway 2", 30)
    second.power_off()

    tgtds["gw1"].restart()  # empty, as after a reboot of the host
    assert list_targets(tgtds["gw1"]) == []
    g1.start()
    wait_for(lambda: iqn in list_targets(tgtds["gw1"]), "gateway 1 to re-converge", 30)
    wait_for(lambda: sorted(alice.get_node("gw-node").target.portals)
             == sorted([g1.portal, g2.portal]), "gateway 1 back in the plan", 30)

    alice.deprovision_node("gw-node")  # returns once both gateways removed the target
    assert iqn not in list_targets(tgtds["gw1"]) and iqn not in list_targets(tgtds["gw2"])
    assert [d.id for d in admin.list_disks()] == []


def test_a_gateway_repairs_drift_and_a_tgtd_restart_and_leaves_foreign_targets(
    admin, alice, bootable, gateways, tgtds, ceph_cluster
):
    admin.enroll_node("drift-node", "alice", macs=["52:54:00:0e:00:02"])
    node = alice.provision_node("drift-node", image="gw-bootable")
    iqn, tgtd = node.target.iqn, tgtds["gw2"]
    # Tamper only once gateway 2 is done with it (its repairs re-create the CHAP account).
    wait_for(lambda: gateways["gw2"].portal in alice.get_node("drift-node").target.portals,
             "gateway 2 to export the disk", 30)
    # The node's config drive is LUN 2 on every gateway, as its disk is LUN 1.
    drive = f"{ceph_cluster.pool}/bmi-cfg-{node.identity.instance_id.removeprefix('i-')}"
    wait_for(lambda: all(luns_of(target_sections(t).get(iqn, ""))
                         == {1: f"{ceph_cluster.pool}/bmi-{node.disk_id}", 2: drive}
                         for t in tgtds.values()), "both gateways to export LUN 1 and 2", 30)
    tid = target_ids(tgtd)[iqn]
    # Someone unbinds BMI's CHAP account and opens the target to everyone...
    user = f"bmi-{node.disk_id}"
    tgtd.tgtadm("--op", "unbind", "--mode", "account", "--tid", str(tid), "--user", user)
    tgtd.tgtadm("--op", "bind", "--mode", "target", "--tid", str(tid), "--initiator-address",
                "ALL")
    # ...and adds a target of its own and one under BMI's prefix that BMI never asked for.
    tgtd.tgtadm("--op", "new", "--mode", "target", "--tid", "900", "-T",
                "iqn.2001-04.com.example:foreign")
    tgtd.tgtadm("--op", "new", "--mode", "target", "--tid", "901", "-T",
                "iqn.2026-11.org.moc.bmi:dsk-0000000000000000")

    def repaired() -> bool:
        show = target_sections(tgtd)
        mine = show.get(iqn, "")
        return ("ALL" not in acl_of(mine) and user in mine
                and "iqn.2026-11.org.moc.bmi:dsk-0000000000000000" not in show)

    wait_for(repaired, "gateway 2 to repair its tgtd", 30)
    assert "iqn.2001-04.com.example:foreign" in list_targets(tgtd)  # not BMI's: untouched

    tgtd.restart()  # tgtd forgets everything; the gateway's audit notices
    wait_for(lambda: luns_of(target_sections(tgtd).get(iqn, "")).get(2) == drive,
             "gateway 2 to re-create the target with its config drive", 30)
    alice.deprovision_node("drift-node")
    assert iqn not in list_targets(tgtd)


def target_ids(tgtd) -> dict[str, int]:
    out = tgtd.tgtadm("--op", "show", "--mode", "target").stdout
    return {iqn: int(tid) for tid, iqn in re.findall(r"^Target (\d+): (\S+)", out, re.M)}


def target_sections(tgtd) -> dict[str, str]:
    out = tgtd.tgtadm("--op", "show", "--mode", "target").stdout
    parts = re.split(r"^Target \d+: ", out, flags=re.M)[1:]
    return {part.split("\n", 1)[0].strip(): part for part in parts}


def luns_of(section: str) -> dict[int, str]:
    """LUN -> backing store path in one target's `tgtadm --op show` section."""
    found = re.findall(r"LUN: (\d+)\n(?:.*\n)*?\s+Backing store path: (\S+)", section)
    return {int(lun): path for lun, path in found if path != "None"}


def acl_of(section: str) -> list[str]:
    tail = section.split("ACL information:", 1)[1] if "ACL information:" in section else ""
    return [line.strip() for line in tail.splitlines() if line.strip()]


def test_gateways_keep_exporting_while_the_server_is_gone_and_resume_after(
    admin, alice, bootable, gateways, tgtds, gw_server
):
    admin.enroll_node("lost-a", "alice", macs=["52:54:00:0e:00:03"])
    admin.enroll_node("lost-b", "alice", macs=["52:54:00:0e:00:04"])
    first = alice.provision_node("lost-a", image="gw-bootable").target.iqn
    wait_for(lambda: all(first in list_targets(t) for t in tgtds.values()),
             "both gateways to export the disk", 30)
    failures = {name: g.log().count("reconnecting") for name, g in gateways.items()}

    gw_server.kill()
    # Each gateway notices (its watch fails, again and again) and changes nothing.
    wait_for(lambda: all(g.log().count("reconnecting") >= failures[name] + 2
                         for name, g in gateways.items()), "the gateways to notice", 60)
    assert all(first in list_targets(t) for t in tgtds.values())

    gw_server.start()
    wait_for(lambda: live_gateways(gw_server) == set(TOKENS), "the gateways to come back", 60)
    second = alice.provision_node("lost-b", image="gw-bootable").target.iqn
    wait_for(lambda: all(second in list_targets(t) for t in tgtds.values()),
             "both gateways to export the new disk", 30)
    assert all(first in list_targets(t) for t in tgtds.values())
    for name in ("lost-a", "lost-b"):
        alice.deprovision_node(name)
    assert not any({first, second} & set(list_targets(t)) for t in tgtds.values())
