"""A real bmi-server in HIL mode, against the HIL stand-in, real Ceph and real tgtd.

Provisioning goes: ownership check -> boot NIC MAC -> provisioning network attached
(asynchronous, polled) -> clone -> target -> boot plan; deprovisioning undoes it. HIL
down or slow answers UNAVAILABLE with nothing changed in Ceph or tgt; HIL's network
daemon down answers DEADLINE_EXCEEDED, and reconcile repairs what HIL finished later.
"""

from __future__ import annotations

import base64
import re
import threading
import time

import grpc
import pytest
import requests
from bmi.v1 import images_pb2, nodes_pb2
from bmi_client.client import BmiClient
from hil_standin import HilStandin
from server_process import ServerProcess, config_drive_of

NETWORK = "bmi-provision"
PASSWORDS = {"bmi": "bmi-hil-pw", "alice": "alice-hil-pw", "bob": "bob-hil-pw",
             "carol": "carol-hil-pw"}
MACS = {"n1": "52:54:00:aa:00:01", "n2": "52:54:00:aa:00:02", "n3": "52:54:00:aa:00:03",
        "free1": "52:54:00:aa:00:09", "b1": "52:54:00:bb:00:01", "n4": "52:54:00:aa:00:04",
        "n5": "52:54:00:aa:00:05"}
HIL_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def hil():
    standin = HilStandin(poll_seconds=0.2, switch_seconds=0.05)  # real HIL: 2 s, 0.5 s
    for project in ("alice", "bob"):
        standin.add_project(project)
    standin.add_user("bmi", PASSWORDS["bmi"], admin=True)
    standin.add_user("alice", PASSWORDS["alice"], projects=("alice",))
    standin.add_user("bob", PASSWORDS["bob"], projects=("bob",))
    standin.add_user("carol", PASSWORDS["carol"], projects=("alice",))  # never cached
    standin.add_network(NETWORK)
    for name in ("n1", "n2", "n3", "n4", "n5"):
        standin.add_node(name, [("pxe", MACS[name]), ("data", "52:54:00:cc:00:0" + name[-1])],
                         "alice", obm_enabled=name == "n3")
    standin.add_node("b1", [("pxe", MACS["b1"])], "bob")
    standin.add_node("free1", [("pxe", MACS["free1"])])
    with standin:
        yield standin


@pytest.fixture(scope="module")
def server(ceph_cluster, tgtd, hil, tmp_path_factory):
    process = ServerProcess(
        tmp_path_factory.mktemp("hil-state"), str(ceph_cluster.conf_path), ceph_cluster.pool,
        tgtd=tgtd,
        extra_env={
            "BMI_ISOLATOR": "hil",
            "BMI_HIL_URL": hil.url,
            "BMI_HIL_USER": "bmi",
            "BMI_HIL_PASSWORD": PASSWORDS["bmi"],
            "BMI_HIL_PROVISIONING_NETWORK": NETWORK,
            "BMI_HIL_BOOT_NIC": "pxe",
            "BMI_HIL_TIMEOUT_SECONDS": str(HIL_TIMEOUT),
            "BMI_HIL_ACTION_TIMEOUT_SECONDS": "6",  # margin for a loaded machine
            "BMI_HIL_AUTH_CACHE_SECONDS": "600",
            "BMI_HIL_MEMBERSHIP_CACHE_SECONDS": "1",
            "BMI_RECONCILE_SECONDS": "1",
        },
        log_level="DEBUG",  # so the check below covers the HIL client's debug lines too
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()
    log = process.log()
    assert " DEBUG " in log
    basic = [base64.b64encode(f"{u}:{pw}".encode()).decode() for u, pw in PASSWORDS.items()]
    assert not [secret for secret in [*PASSWORDS.values(), *basic] if secret in log]


@pytest.fixture(scope="module")
def connect(server):
    made: list[BmiClient] = []

    def make(user: str, project: str = "", password: str = "") -> BmiClient:
        # One attempt: these tests look at the first answer, not at the client's retries.
        client = BmiClient(server.address, user=user, password=password or PASSWORDS[user],
                           project=project, timeout=60, max_attempts=1)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture(scope="module")
def alice(connect):
    return connect("alice", "alice")


@pytest.fixture(scope="module")
def golden(connect, raw_image):
    admin = connect("bmi")  # no project: a HIL admin
    return admin.upload_image(raw_image, "golden", project="ops",
                              visibility=images_pb2.VISIBILITY_PUBLIC)


@pytest.fixture
def exports(tgtd):
    """IQNs of the targets tgtd has now."""
    def list_exports() -> set[str]:
        shown = tgtd.tgtadm("--lld", "iscsi", "--op", "show", "--mode", "target").stdout
        return set(re.findall(r"^Target \d+: (\S+)", shown, re.MULTILINE))
    return list_exports


@pytest.fixture
def world(volumes, exports):
    """(volumes in Ceph, targets in tgt) now."""
    return lambda: (set(volumes()), exports())


def code(excinfo) -> grpc.StatusCode:
    return excinfo.value.code()


def test_provision_goes_hil_first_then_ceph_and_tgt_and_deprovision_undoes_it(
    server, hil, alice, golden, world
):
    before = world()
    at_hil: list[tuple[str, tuple]] = []
    lock = threading.Lock()

    def look(record):  # what Ceph and tgt held while HIL was being asked
        if "connect_network" in record.path or "networking_action" in record.path:
            with lock:
                at_hil.append((record.path, world()))

    hil.requests.clear()
    hil.on_request = look
    try:
        node = alice.provision_node("n1", image="golden")
    finally:
        hil.on_request = None
    assert node.state == nodes_pb2.NODE_STATE_PROVISIONED
    assert (node.name, node.project, list(node.macs)) == ("n1", "alice", [MACS["n1"]])
    calls = [p for p in hil.paths() if not p.startswith("GET /v0/project/")]
    assert calls[:2] == ["GET /v0/node/n1", "POST /v0/node/n1/nic/pxe/connect_network"]
    polls = calls[2:]
    assert len(polls) >= 2 and all(p.startswith("GET /v0/networking_action/") for p in polls)
    assert {r.user for r in hil.requests} == {"alice"}  # HIL authorised alice herself
    assert at_hil and all(state == before for _, state in at_hil)  # nothing made yet
    volumes, targets = world()
    assert volumes - before[0] == {"bmi-" + node.disk_id, config_drive_of(node)}
    assert targets - before[1] == {node.target.iqn}
    assert hil.networks_of("n1", "pxe") == {"vlan/native": NETWORK}
    script = requests.get(f"http://{server.http_address}/boot.ipxe",
                          params={"mac": MACS["n1"]}, timeout=10).text
    assert "sanboot" in script and node.target.iqn in script

    hil.requests.clear()
    done = alice.deprovision_node("n1")
    assert done.state == nodes_pb2.NODE_STATE_AVAILABLE and not done.disk_id
    assert world() == before
    assert hil.networks_of("n1", "pxe") == {}
    assert "POST /v0/node/n1/nic/pxe/detach_network" in hil.paths()


def test_power_cycle_is_handed_off_to_the_obm_service(hil, alice, golden):
    hil.obm_calls.clear()
    node = alice.provision_node("n3", image="golden", power_cycle=True)
    assert node.state == nodes_pb2.NODE_STATE_PROVISIONED
    assert hil.obm_calls == [("POST", "power_cycle", {"force": False}, False)]
    alice.deprovision_node("n3")


def test_power_cycle_enables_the_obm_and_giving_back_disables_it(hil, connect, alice, golden):
    """The tenant never enabled OBM in HIL: BMI does it for the power cycle (HIL asks
    obmd for a token), and turns it off to give the node back (HIL refuses otherwise)."""
    hil.add_node("obm1", [("pxe", "52:54:00:aa:00:31")])  # free, OBM disabled
    alice.take_node("obm1")
    hil.obm_calls.clear()
    node = alice.provision_node("obm1", image="golden", power_cycle=True)
    assert node.state == nodes_pb2.NODE_STATE_PROVISIONED
    assert "power-cycled" in node.history[-1].reason
    assert hil.obm_calls == [("POST", "token", None, True),
                             ("POST", "power_cycle", {"force": False}, False)]
    alice.deprovision_node("obm1")
    assert hil.nodes["obm1"].obm_enabled
    alice.give_back_node("obm1")
    assert hil.nodes["obm1"].project is None and not hil.nodes["obm1"].obm_enabled
    assert hil.obm_calls[-1] == ("DELETE", "token", None, True)


def test_a_tenant_of_another_project_is_refused_and_sees_nothing(connect, alice, golden,
                                                               world):
    alice.provision_node("n2", image="golden")
    before = world()
    bob = connect("bob", "bob")
    with pytest.raises(grpc.RpcError) as refused:
        bob.provision_node("n1", image="golden")
    assert code(refused) == grpc.StatusCode.NOT_FOUND  # as for a node that does not exist
    with pytest.raises(grpc.RpcError) as hidden:
        bob.get_node("n2")
    assert code(hidden) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as hidden:
        bob.deprovision_node("n2")
    assert code(hidden) == grpc.StatusCode.NOT_FOUND
    assert [(n.name, n.id) for n in bob.list_nodes()] == [("b1", "")]  # HIL's, not n2
    with pytest.raises(grpc.RpcError) as foreign:
        list(connect("bob", "alice").list_nodes())  # bob claiming alice's project
    assert code(foreign) == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as bad:
        list(connect("alice", "alice", password="wrong").list_nodes())
    assert code(bad) == grpc.StatusCode.UNAUTHENTICATED
    assert world() == before
    alice.deprovision_node("n2")


def test_take_and_give_back_a_free_node(hil, connect, alice):
    assert "free1" in alice.free_nodes()
    taken = alice.take_node("free1")
    assert (taken.name, taken.project, list(taken.macs)) == ("free1", "alice", [MACS["free1"]])
    assert hil.nodes["free1"].project == "alice" and "free1" not in alice.free_nodes()
    alice.give_back_node("free1")
    assert hil.nodes["free1"].project is None
    with pytest.raises(grpc.RpcError) as gone:
        alice.get_node("free1")
    assert code(gone) == grpc.StatusCode.NOT_FOUND


def test_a_network_action_ending_in_error_rolls_back(hil, alice, golden, world):
    before = world()
    hil.action_outcome = "ERROR"
    try:
        with pytest.raises(grpc.RpcError) as failed:
            alice.provision_node("n2", image="golden")
    finally:
        hil.action_outcome = "DONE"
    assert code(failed) == grpc.StatusCode.FAILED_PRECONDITION
    assert "ended in ERROR" in failed.value.details()
    node = alice.get_node("n2")
    assert node.state == nodes_pb2.NODE_STATE_AVAILABLE
    assert "rolled back" in node.history[-1].reason and "ERROR" in node.history[-1].reason
    assert world() == before and hil.networks_of("n2", "pxe") == {}


def test_hil_slow_or_down_is_unavailable_with_nothing_changed(hil, connect, alice, golden,
                                                               world):
    list(alice.list_nodes())  # alice's credentials are trusted (cached) from here on
    before = world()
    hil.delay_seconds = HIL_TIMEOUT + 0.5
    try:
        with pytest.raises(grpc.RpcError) as slow:
            alice.provision_node("n2", image="golden")
    finally:
        hil.delay_seconds = 0
    assert code(slow) == grpc.StatusCode.UNAVAILABLE and "HIL" in slow.value.details()
    hil.down()
    try:
        with pytest.raises(grpc.RpcError) as down:
            alice.provision_node("n2", image="golden")
        assert code(down) == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as unknown:  # not trusted yet: HIL must say
            list(connect("carol", "alice").list_nodes())
        assert code(unknown) == grpc.StatusCode.UNAVAILABLE
    finally:
        hil.up()
    assert world() == before
    assert alice.get_node("n2").state == nodes_pb2.NODE_STATE_AVAILABLE


def test_a_tenant_lists_and_shows_the_nodes_hil_gave_its_project(hil, connect, alice):
    """Nodes HIL put in the project before BMI ever touched them: listed (one HIL request
    for the list, none per node), shown (and then recorded); never to another tenant."""
    hil.add_node("fresh1", [("pxe", "52:54:00:aa:00:21")], "alice")
    hil.add_node("fresh2", [("pxe", "52:54:00:aa:00:22")], "alice")
    time.sleep(1.1)  # the membership cache (1 s here) has expired
    hil.requests.clear()
    listed = {n.name: n for n in alice.list_nodes()}
    assert {"fresh1", "fresh2", "n1", "n2", "n3"} <= set(listed)
    assert "b1" not in listed and "free1" not in listed
    assert listed["fresh1"].id == "" and listed["fresh1"].state == nodes_pb2.NODE_STATE_AVAILABLE
    assert hil.paths() == ["GET /v0/project/alice/nodes"]  # nothing per node
    shown = alice.get_node("fresh1")
    assert shown.id and list(shown.macs) == ["52:54:00:aa:00:21"] and shown.project == "alice"
    assert shown.history[0].from_state == nodes_pb2.NODE_STATE_UNSPECIFIED
    assert {n.name: n.id for n in alice.list_nodes()}["fresh1"] == shown.id
    bob = connect("bob", "bob")
    for ref in ("fresh1", shown.id, "fresh2"):
        with pytest.raises(grpc.RpcError) as hidden:
            bob.get_node(ref)
        assert code(hidden) == grpc.StatusCode.NOT_FOUND
        assert hidden.value.details() == f"node {ref!r} not found"
    assert "fresh1" not in {n.name for n in bob.list_nodes()}
    hil.nodes["fresh1"].project = "bob"  # moved in HIL directly
    time.sleep(1.1)
    assert "fresh1" not in {n.name for n in alice.list_nodes()}
    with pytest.raises(grpc.RpcError) as moved:
        alice.get_node("fresh1")
    assert code(moved) == grpc.StatusCode.NOT_FOUND
    assert bob.get_node("fresh1").id == shown.id  # the same record, now bob's


def test_hils_daemon_down_is_deadline_exceeded_and_reconcile_repairs_the_node_later(
    hil, alice, golden, world
):
    """HIL queued the attach but its network daemon is down: DEADLINE_EXCEEDED with the
    cause (not UNAVAILABLE, which the client would retry into HIL's 409); the node is
    left failed; once HIL did the attach after all, reconcile takes it off again."""
    before = world()
    hil.daemon_down()
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as slow:
            alice.provision_node("n4", image="golden")
        assert time.monotonic() - started < 20
        assert code(slow) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "is still PENDING" in slow.value.details()
        assert "network daemon may be down" in slow.value.details()
        node = alice.get_node("n4")
        assert node.state == nodes_pb2.NODE_STATE_FAILED
        assert "still busy" in node.failure_reason and world() == before
    finally:
        hil.daemon_up()
    deadline = time.monotonic() + 20
    while alice.get_node("n4").state != nodes_pb2.NODE_STATE_AVAILABLE:
        assert time.monotonic() < deadline, alice.get_node("n4")
        time.sleep(0.3)
    assert hil.networks_of("n4", "pxe") == {}
    assert "repaired by reconcile" in alice.get_node("n4").history[-1].reason


def test_deprovision_waits_for_a_network_change_hil_has_not_finished(hil, alice, golden):
    alice.provision_node("n5", image="golden")
    hil.daemon_down()
    # A change HIL has queued on the NIC (another user's, or ours that timed out).
    hil.add_network("other-net")
    hil.queue_action("n5", "pxe", "other-net", "vlan/100")
    threading.Timer(1.0, hil.daemon_up).start()
    started = time.monotonic()
    done = alice.deprovision_node("n5")
    assert time.monotonic() - started >= 0.9  # waited for HIL
    assert done.state == nodes_pb2.NODE_STATE_AVAILABLE
    assert NETWORK not in hil.networks_of("n5", "pxe").values()
