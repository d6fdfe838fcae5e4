"""A bmi-gateway driving two tgtd processes, all real (server, gateway, tgtds, Ceph; no
QEMU): each disk's target is on one process, the node's boot plan names that process's
portal only, and one process killed takes only its own targets out of plans while the
gateway stays live; restarted, its targets come back on it, at the same portal."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
from bmi.v1 import images_pb2
from boot_fixtures import module_client
from gateway_process import GatewayProcess
from server_process import ADMIN_TOKEN, TENANT_TOKENS, ServerProcess

from bmi_server.devenv.test_disk import build_test_disk
from bmi_server.devenv.tgtd import Tgtd, TgtdGroup

pytestmark = pytest.mark.ceph

TOKEN = "gateway-processes-token"
EXPIRY_SECONDS = 4


@pytest.fixture(scope="module")
def gw_tgtds() -> Iterator[TgtdGroup]:
    with TgtdGroup(2) as group:
        yield group


@pytest.fixture(scope="module")
def gp_server(ceph_cluster, tmp_path_factory) -> Iterator[ServerProcess]:
    state = tmp_path_factory.mktemp("gp-server")
    (state / "gateway-tokens").write_text(f"{TOKEN} gw1\n")
    process = ServerProcess(
        state, str(ceph_cluster.conf_path), ceph_cluster.pool,
        extra_env={
            "BMI_TARGET_MODE": "gateways",
            "BMI_GATEWAY_REPLICAS": "1",
            "BMI_GATEWAY_HEARTBEAT_SECONDS": "1",
            "BMI_GATEWAY_EXPIRY_SECONDS": str(EXPIRY_SECONDS),
            "BMI_GATEWAY_APPLY_TIMEOUT_SECONDS": "60",
        },
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def gateway(gp_server, gw_tgtds, ceph_cluster, tmp_path_factory) -> Iterator[GatewayProcess]:
    logs = tmp_path_factory.mktemp("gp-logs")
    proc = GatewayProcess("gw1", TOKEN, gp_server.address, gw_tgtds[0],
                          str(ceph_cluster.conf_path), ceph_cluster.pool, logs)
    proc.env.update({
        "BMI_GATEWAY_TGT_PORTAL": ",".join(gw_tgtds.portals),
        "BMI_GATEWAY_TGT_CONTROL": str(gw_tgtds.control),
        "BMI_GATEWAY_TGTD_PROCESSES": "2",
        "BMI_GATEWAY_ADVERTISED_PORTALS": ";".join(f"10.0.2.2:{d.port}"
                                                    for d in gw_tgtds.daemons),
        "BMI_GATEWAY_PLACEMENT_FILE": str(logs / "placements.json"),
    })
    proc.start()
    yield proc
    proc.stop()


admin = module_client("gp_server", ADMIN_TOKEN, timeout=90)
alice = module_client("gp_server", TENANT_TOKENS["alice"], timeout=90)


def live_targets(tgtd: Tgtd) -> set[str]:
    out = tgtd.tgtadm("--op", "show", "--mode", "target").stdout
    return set(re.findall(r"^Target \d+: (\S+)", out, re.MULTILINE))


def wait_for(predicate, what: str, timeout: float, log=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}\n{log()[-3000:]}")


def test_each_target_is_on_one_process_and_a_dead_process_takes_only_its_own(
        gateway, gw_tgtds, admin, alice, tmp_path):
    disk = build_test_disk(tmp_path / "small.raw", size_mib=16)
    admin.upload_image(disk, "gp-image", project="ops",
                       visibility=images_pb2.VISIBILITY_PUBLIC)
    nodes = []
    for i in range(2):
        admin.enroll_node(f"gp-node{i}", "alice", macs=[f"52:54:00:0e:01:0{i}"])
        nodes.append(alice.provision_node(f"gp-node{i}", image="gp-image"))
    portal = [f"10.0.2.2:{d.port}" for d in gw_tgtds.daemons]

    def portals_of(i: int) -> list[str]:
        return list(alice.get_node(nodes[i].name).target.portals)

    for i, node in enumerate(nodes):
        wait_for(lambda i=i: portals_of(i) == [portal[i]], f"node {i}'s portal",
                 30, gateway.log)
        assert node.target.iqn in live_targets(gw_tgtds[i])
        assert node.target.iqn not in live_targets(gw_tgtds[1 - i])

    gw_tgtds[1].kill()
    wait_for(lambda: portals_of(1) == [], "the dead process's target out of plans", 30,
             gateway.log)
    time.sleep(EXPIRY_SECONDS + 1)  # the gateway kept heartbeating: still live
    assert portals_of(0) == [portal[0]]

    gw_tgtds[1].restart()
    wait_for(lambda: nodes[1].target.iqn in live_targets(gw_tgtds[1]),
             "the gateway to re-create the target on its process", 30, gateway.log)
    wait_for(lambda: portals_of(1) == [portal[1]], "the target back in plans", 30,
             gateway.log)
    assert live_targets(gw_tgtds[0]) == {nodes[0].target.iqn}
    for node in nodes:
        admin.deprovision_node(node.id)
