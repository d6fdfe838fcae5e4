"""The server's side of the node agent: tokens, boot plans, reports, inventory, boot mode,
the agent's iPXE script and the files the boot endpoint serves."""

from __future__ import annotations

import hashlib
import sqlite3
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from bmi.v1 import boot_pb2, boot_pb2_grpc, inventory_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from principals import ADMIN, ALICE
from test_catalogue import upload

from bmi_server.adapters.sql.store import SqlStateStore
from bmi_server.api import boot_servicer, convert
from bmi_server.api.http_boot import AgentImageConfig, BootHttpServer
from bmi_server.api.ipxe_scripts import render
from bmi_server.core import errors
from bmi_server.core.agent import AgentPhase, AgentPolicy, AgentService, PlanAction
from bmi_server.core.boot import BootKind
from bmi_server.core.models import (
    BootMode,
    Inventory,
    InventoryCpu,
    InventoryMemory,
    InventoryNic,
    NodeState,
    Smbios,
    Visibility,
    utcnow,
)
from bmi_server.server import Core, build_grpc_server

MAC = "52:54:00:12:34:56"
OTHER_MAC = "52:54:00:12:34:57"
S = NodeState


def inventory(*macs: str) -> Inventory:
    return Inventory(
        cpu=InventoryCpu("QEMU Virtual CPU version 2.5+", 2, "x86_64", 1),
        memory=InventoryMemory(512 << 20, 480 << 20),
        nics=tuple(InventoryNic(f"eth{i}", m, "virtio_net", 0, True) for i, m in enumerate(macs)),
        system=Smbios(uuid="u-1", serial="SN-1", manufacturer="BMI Test", product="QEMU"),
        collectors=("generic",),
    )


def provision(core, name: str, mac: str, mode: BootMode = BootMode.AGENT):
    core.registry.enrol(ADMIN, name=name, project="alice", macs=[mac])
    return core.provisioner.provision(ALICE, name, image="golden", boot_mode=mode)


def booted(core, mac: str = MAC):
    """The node fetches its boot script: (action, node id, token)."""
    action = core.planner.action_for(mac, Smbios())
    assert action.kind is BootKind.AGENT and action.token
    return action, action.node.id, action.token


def reasons(core, node_id: str) -> list[str]:
    return [t.reason for t in core.registry.history(core.state.get_node(node_id))]


def test_an_agent_node_boots_through_its_reports(core, golden, targets):
    node = provision(core, "n1", MAC)
    assert node.boot_mode is BootMode.AGENT
    assert core.state.get_node(node.id).boot_mode is BootMode.AGENT
    action, node_id, token = booted(core)
    assert core.state.get_node(node_id).state is S.BOOTING
    script = render(action, "http://h/boot.ipxe?mac=x", agent_boot())
    assert f"bmi.node={node_id} bmi.token={token} BOOTIF=01-52-54-00-12-34-56" in script
    assert "kernel http://10.0.2.2:8080/agent/vmlinuz initrd=initrd console=ttyS0" in script
    assert "initrd --name initrd http://10.0.2.2:8080/agent/initrd" in script
    assert node.target.chap_secret not in script  # the agent gets it over gRPC only

    agents = core.agents
    agents.register(node_id, token, inventory(MAC))
    assert core.agents.inventory(node).memory.physical_bytes == 512 << 20
    plan = agents.boot_plan(node_id, token)
    assert plan.action is PlanAction.ATTACH and plan.target == node.target
    assert plan.portals == ("10.0.2.2:3260",) and plan.lun == 1
    # The agent logs in before it mounts: the session watcher must not call that active.
    targets.logged_in.add(node.target.iqn)
    assert core.sessions.poll_once() == 0
    for phase in (AgentPhase.ATTACHING, AgentPhase.ATTACHED, AgentPhase.MOUNTED):
        agents.report(node_id, token, phase, f"{phase.value} detail", attempt=1)
    agents.report(node_id, token, AgentPhase.PIVOTING, "switch_root into /sbin/init", attempt=1)
    assert core.state.get_node(node_id).state is S.ACTIVE
    assert reasons(core, node_id)[-6:] == [
        "fetched its boot script",
        "agent registered: 2 CPUs, 512 MiB, 1 NICs, 0 disks",
        "agent attaching: attaching detail",
        "agent attached: attached detail",
        "agent mounted: mounted detail",
        "agent pivoted into the OS: switch_root into /sbin/init",
    ]
    with pytest.raises(errors.Unauthenticated):  # the pivot spent the token
        agents.boot_plan(node_id, token)
    # The pivot report's reply was lost: the agent's retry succeeds and changes nothing.
    before = reasons(core, node_id)
    again = agents.report(node_id, token, AgentPhase.PIVOTING, "switch_root into /sbin/init")
    assert again.state is S.ACTIVE and reasons(core, node_id) == before
    for call in (lambda: agents.heartbeat(node_id, token),
                 lambda: agents.report(node_id, token, AgentPhase.MOUNTED, "x"),
                 lambda: agents.report(node_id, "x" + token[1:], AgentPhase.PIVOTING, "x"),
                 lambda: agents.register(node_id, token, inventory(MAC))):
        with pytest.raises(errors.Unauthenticated):  # nothing else opens with it
            call()


def test_tokens_are_one_node_one_boot_and_expire(core, golden, state):
    provision(core, "n1", MAC)
    provision(core, "n2", OTHER_MAC)
    _, a, token_a = booted(core, MAC)
    _, b, token_b = booted(core, OTHER_MAC)
    stored, expires = state.get_boot_token(a)
    assert stored == hashlib.sha256(token_a.encode()).hexdigest() and token_a not in stored
    assert timedelta(minutes=29) < expires - utcnow() <= timedelta(minutes=30)
    for node_id, token in ((a, token_b), (b, token_a), (a, ""), ("n1", token_a),
                           ("node-ffffffffffffffff", token_a)):  # fmt: skip
        with pytest.raises(errors.Unauthenticated):
            core.agents.boot_plan(node_id, token)
    _, _, newer = booted(core, MAC)  # a reboot: the previous boot's token is dead
    with pytest.raises(errors.Unauthenticated, match="not valid"):
        core.agents.boot_plan(a, token_a)
    assert core.agents.boot_plan(a, newer).action is PlanAction.ATTACH

    now = [utcnow()]
    clocked = AgentService(core.registry, state, state, ["10.0.2.2:3260"],
                           AgentPolicy(token_ttl_seconds=60), clock=lambda: now[0])  # fmt: skip
    node = state.get_node(b)
    token = clocked.issue_token(node)
    assert clocked.heartbeat(b, token) is True
    now[0] += timedelta(seconds=61)
    with pytest.raises(errors.Unauthenticated, match="expired"):
        clocked.heartbeat(b, token)


def test_an_inventory_must_be_the_nodes_own(core, golden):
    provision(core, "n1", MAC)
    _, node_id, token = booted(core)
    with pytest.raises(errors.PermissionDenied, match="none of node 'n1'"):
        core.agents.register(node_id, token, inventory(OTHER_MAC))
    assert core.agents.inventory(core.state.get_node(node_id)) is None
    core.agents.register(node_id, token, inventory(OTHER_MAC, MAC))  # it has two NICs
    assert core.agents.inventory(core.state.get_node(node_id)).macs() == [OTHER_MAC, MAC]


def test_failures_retried_then_given_up(core, golden):
    provision(core, "n1", MAC)
    _, node_id, token = booted(core)
    core.agents.report(node_id, token, AgentPhase.FAILED, "login failed", attempt=1,
                       will_retry=True)  # fmt: skip
    assert core.state.get_node(node_id).state is S.BOOTING
    core.agents.report(node_id, token, AgentPhase.FAILED, "login\x00failed", attempt=2)
    failed = core.state.get_node(node_id)
    assert failed.state is S.FAILED
    assert failed.failure_reason == "agent gave up: login failed (attempt 2)"
    assert reasons(core, node_id)[-2] == "agent failed, retrying: login failed"
    with pytest.raises(errors.Unauthenticated):
        core.agents.heartbeat(node_id, token)
    core.provisioner.deprovision(ALICE, "n1")  # FAILED nodes clean up as usual


def test_provisioning_a_node_the_agent_gave_up_on_first_removes_its_disk_and_target(
    core, golden, store, targets
):
    first = provision(core, "n1", MAC)
    _, node_id, token = booted(core)
    core.agents.report(node_id, token, AgentPhase.FAILED, "login failed", attempt=3)
    failed = core.state.get_node(node_id)
    assert failed.state is S.FAILED  # keeping what it held, for deprovision or provision
    assert (failed.disk_id, failed.target.iqn) == (first.disk_id, first.target.iqn)

    again = core.provisioner.provision(ALICE, "n1", image="golden", boot_mode=BootMode.AGENT)
    assert again.state is S.PROVISIONED and again.disk_id != first.disk_id
    assert core.state.get_disk(first.disk_id) is None
    assert [d.id for d in core.state.all_disks()] == [again.disk_id]
    assert sorted(store.volumes) == sorted(
        [golden.volume, again.target.volume, again.target.config_volume]
    )
    assert list(targets.targets) == [again.target.iqn]
    assert reasons(core, node_id)[-2] == (
        f"provisioning from image golden (first removing disk {first.disk_id} and its "
        "target, left by the failure)"
    )


def test_no_pivot_for_a_node_that_left_booting(core, golden):
    provision(core, "n1", MAC)
    _, node_id, token = booted(core)
    assert core.agents.boot_plan(node_id, token).action is PlanAction.ATTACH
    core.provisioner.deprovision(ALICE, "n1")
    assert core.agents.boot_plan(node_id, token).action is PlanAction.WAIT
    core.agents.report(node_id, token, AgentPhase.MOUNTED, "late")  # ignored
    with pytest.raises(errors.FailedPrecondition, match="do not pivot"):
        core.agents.report(node_id, token, AgentPhase.PIVOTING, "too late")
    assert core.state.get_node(node_id).state is S.AVAILABLE


def test_unknown_nodes_boot_the_agent_for_inventory_then_their_plan(golden_inventory_core):
    core = golden_inventory_core
    action = core.planner.action_for(MAC, Smbios(serial="SN-1"))
    assert action.kind is BootKind.AGENT and action.node.state is S.DISCOVERED
    node_id, token = action.node.id, action.token
    node = core.agents.register(node_id, token, inventory(MAC))
    assert node.state is S.DISCOVERED  # inventory changes no state
    plan = core.agents.boot_plan(node_id, token)
    assert (plan.action, plan.reason) == (PlanAction.WAIT, "waiting to be enrolled")
    assert core.agents.heartbeat(node_id, token) is False
    core.registry.enrol(ADMIN, name="n1", project="alice", macs=[], discovered_node=node_id)
    assert core.agents.boot_plan(node_id, token).reason == "waiting to be provisioned"
    core.provisioner.provision(ALICE, "n1", image="golden", boot_mode=BootMode.AGENT)
    assert core.agents.heartbeat(node_id, token) is True
    assert core.agents.boot_plan(node_id, token).action is PlanAction.ATTACH
    assert reasons(core, node_id)[-1] == "agent took its boot plan"
    assert core.state.get_node(node_id).state is S.BOOTING
    # The inventory stays with the enrolled node.
    assert core.agents.inventory(core.state.get_node(node_id)).system.serial == "SN-1"


def test_a_waiting_agent_of_a_sanboot_node_is_told_to_reboot(golden_inventory_core):
    core = golden_inventory_core
    action = core.planner.action_for(MAC, Smbios())
    core.registry.enrol(ADMIN, name="n1", project="alice", macs=[], discovered_node=action.node.id)
    core.provisioner.provision(ALICE, "n1", image="golden")  # sanboot
    plan = core.agents.boot_plan(action.node.id, action.token)
    assert plan.action is PlanAction.REBOOT and plan.target is None
    # Its next boot script is the sanboot one.
    assert core.planner.action_for(MAC, Smbios()).kind is BootKind.SANBOOT


@pytest.fixture
def golden_inventory_core(state, store, targets, inspector, tmp_path):
    core = Core.build(state, store, targets, advertised_portals=["10.0.2.2:3260"],
                      retry_seconds=5, discovery_mode="inventory")  # fmt: skip
    upload(core, store, inspector, tmp_path, ADMIN, "golden", project="ops",
           visibility=Visibility.PUBLIC)  # fmt: skip
    return core


def test_wait_mode_keeps_unknown_nodes_waiting(core):
    assert core.planner.action_for(MAC, Smbios()).kind is BootKind.RETRY


def test_sanboot_nodes_are_unchanged(core, golden, targets):
    node = provision(core, "n1", MAC, BootMode.SANBOOT)
    action = core.planner.action_for(MAC, Smbios())
    assert action.kind is BootKind.SANBOOT and not action.token
    targets.logged_in.add(node.target.iqn)
    assert core.sessions.poll_once() == 1


def test_older_databases_get_the_boot_mode_column(tmp_path):
    path = tmp_path / "old.sqlite3"
    SqlStateStore(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE alembic_version")  # as a release before migrations left it
        db.execute("ALTER TABLE nodes DROP COLUMN boot_mode")
        db.execute(
            "INSERT INTO nodes (id, name, state, failure_reason, smbios_uuid, smbios_serial,"
            " smbios_manufacturer, smbios_product, owns_disk, create_time) VALUES"
            " ('node-0000000000000001', 'old', 'available', '', '', '', '', '', 0,"
            " '2026-01-01 00:00:00')"
        )
    store = SqlStateStore(f"sqlite:///{path}")
    try:
        assert store.get_node("node-0000000000000001").boot_mode is BootMode.SANBOOT
    finally:
        store.close()


def test_inventory_from_an_agent_is_checked():
    message = inventory_pb2.Inventory(
        cpu=inventory_pb2.Cpu(model="X", count=4, architecture="x86_64"),
        interfaces=[inventory_pb2.NetworkInterface(name="eth0", mac="52-54-00-AA-BB-CC")],
        firmware=inventory_pb2.Firmware(kind=inventory_pb2.FIRMWARE_KIND_UEFI),
    )
    parsed = convert.inventory_of(message)
    assert parsed.macs() == ["52:54:00:aa:bb:cc"] and parsed.firmware.kind == "uefi"
    assert convert.inventory_message(parsed).interfaces[0].mac == "52:54:00:aa:bb:cc"
    for bad in (
        inventory_pb2.Inventory(interfaces=[inventory_pb2.NetworkInterface(mac="zz")]),
        inventory_pb2.Inventory(cpu=inventory_pb2.Cpu(model="a\x1b[31m")),
        inventory_pb2.Inventory(system=inventory_pb2.SystemInfo(serial="s" * 200)),
        inventory_pb2.Inventory(block_devices=[inventory_pb2.BlockDevice()] * 300),
    ):
        with pytest.raises(errors.InvalidArgument):
            convert.inventory_of(bad)


def agent_boot():
    from bmi_server.api.ipxe_scripts import AgentBoot

    return AgentBoot("http://10.0.2.2:8080", "10.0.2.2:50051", "console=ttyS0 quiet")


def test_agent_script_needs_an_agent_image(core, golden):
    provision(core, "n1", MAC)
    action, _, _ = booted(core)
    assert "kernel" not in render(action, "http://h/x")
    assert "not available" in render(action, "http://h/x")
    with pytest.raises(ValueError, match="expand"):
        AgentImageConfig(image_dir=Path("/x"), grpc_port=1, kernel_args="console=${x}")


def test_boot_endpoint_serves_the_agent_and_its_script(core, golden, tmp_path):
    (tmp_path / "vmlinuz").write_bytes(b"K" * 3000)
    (tmp_path / "initrd").write_bytes(b"I" * 5000)
    config = AgentImageConfig(image_dir=tmp_path, grpc_port=50051)
    http = BootHttpServer(("127.0.0.1", 0), core.planner, None, config)
    http.start()
    base = f"http://127.0.0.1:{http.server_address[1]}"
    try:
        with urllib.request.urlopen(f"{base}/agent/initrd") as reply:
            assert reply.read() == b"I" * 5000
        provision(core, "n1", MAC)
        with urllib.request.urlopen(f"{base}/boot.ipxe?mac={MAC}") as reply:
            script = reply.read().decode()
        assert f"kernel {base}/agent/vmlinuz initrd=initrd" in script
        assert "bmi.server=127.0.0.1:50051" in script  # the host the node used + gRPC port
        (tmp_path / "initrd").unlink()
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{base}/agent/initrd")
        assert missing.value.code == 404
        with urllib.request.urlopen(f"{base}/boot.ipxe?mac={MAC}") as reply:
            assert "not available" in reply.read().decode()  # no half-served agent
    finally:
        http.stop()


# -- hostile input on BootService ---------------------------------------------------------

HOSTILE = st.one_of(
    st.text(max_size=200),
    st.sampled_from(["", "node-0000000000000000", "node-" + "f" * 16, "../x", "a" * 3000,
                     "\x00", "${net0/mac}", "ünï"]),
)  # fmt: skip
CLEAR = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
         grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION}  # fmt: skip


class _NoTokens:
    def authenticate(self, credentials, *_):
        raise errors.Unauthenticated("no API tokens here")


@pytest.fixture
def boot_rpc(core, golden, inspector, tmp_path):
    provision(core, "n1", MAC)
    _, node_id, token = booted(core)
    server = build_grpc_server(core, inspector, _NoTokens(), tmp_path / "spool", workers=4)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield boot_pb2_grpc.BootServiceStub(channel), node_id, token
    channel.close()
    server.stop(0)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(node=HOSTILE, token=HOSTILE, text=HOSTILE, number=st.integers(-(2**31), 2**31 - 1),
       real_node=st.booleans(), real_token=st.booleans())  # fmt: skip
def test_boot_service_answers_hostile_calls_clearly(boot_rpc, core, node, token, text, number,
                                                    real_node, real_token):  # fmt: skip
    stub, node_id, good = boot_rpc
    node = node_id if real_node else node
    # gRPC metadata values are printable ASCII; anything else never reaches the server.
    token = good if real_token else "".join(c for c in token if " " <= c <= "~")
    md = ((boot_servicer.TOKEN_METADATA, token),)
    inventory = inventory_pb2.Inventory(
        cpu=inventory_pb2.Cpu(model=text, count=number),
        interfaces=[inventory_pb2.NetworkInterface(name=text, mac=text)],
        system=inventory_pb2.SystemInfo(serial=text),
    )
    calls = [
        lambda: stub.Register(boot_pb2.RegisterRequest(node_id=node, inventory=inventory),
                              metadata=md),
        lambda: stub.GetBootPlan(boot_pb2.GetBootPlanRequest(node_id=node), metadata=md),
        lambda: stub.Heartbeat(boot_pb2.HeartbeatRequest(node_id=node), metadata=md),
        # Phases outside the enum (or none): never a state change.
        lambda: stub.ReportStatus(boot_pb2.ReportStatusRequest(
            node_id=node, phase=number if abs(number) > 5 else 0, detail=text), metadata=md),
    ]  # fmt: skip
    for call in calls:
        before = [(n.id, n.state, n.project) for n in core.state.all_nodes()]
        try:
            call()
        except grpc.RpcError as exc:
            assert exc.code() in CLEAR, (exc.code(), exc.details())
            assert [(n.id, n.state, n.project) for n in core.state.all_nodes()] == before
    assert core.agents.inventory(core.state.get_node(node_id)) is None  # never accepted


def _cpio_members(archive: bytes) -> dict[str, bytes]:
    """name -> content of a newc archive's entries (directories: b"")."""
    members, at = {}, 0
    while True:
        assert archive[at:at + 6] == b"070701"
        fields = [int(archive[at + 6 + 8 * i:at + 14 + 8 * i], 16) for i in range(13)]
        size, name_size = fields[6], fields[11]
        name_at = at + 110
        name = archive[name_at:name_at + name_size - 1].decode()
        data_at = name_at + name_size + (-(110 + name_size) % 4)
        if name == "TRAILER!!!":
            return members
        members[name] = archive[data_at:data_at + size]
        at = data_at + size + (-size % 4)


def test_with_tls_the_agent_gets_the_ca_as_a_second_initrd(core, golden, tmp_path):
    (tmp_path / "vmlinuz").write_bytes(b"K")
    (tmp_path / "initrd").write_bytes(b"I")
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    config = AgentImageConfig(image_dir=tmp_path, grpc_port=50051, tls=True, ca_pem=pem)
    http = BootHttpServer(("127.0.0.1", 0), core.planner, None, config)
    http.start()
    base = f"http://127.0.0.1:{http.server_address[1]}"
    try:
        provision(core, "n1", MAC)
        with urllib.request.urlopen(f"{base}/boot.ipxe?mac={MAC}") as reply:
            script = reply.read().decode()
        assert f"initrd --name ca.cpio {base}/agent/ca.cpio || goto failed" in script
        assert "initrd=initrd initrd=ca.cpio " in script
        assert "bmi.ca=/etc/bmi/ca.pem" in script
        with urllib.request.urlopen(f"{base}/agent/ca.cpio") as reply:
            members = _cpio_members(reply.read())
        assert members == {"etc": b"", "etc/bmi": b"", "etc/bmi/ca.pem": pem}
    finally:
        http.stop()


def test_without_tls_the_agent_gets_no_ca_and_without_a_ca_no_agent(core, golden, tmp_path):
    (tmp_path / "vmlinuz").write_bytes(b"K")
    (tmp_path / "initrd").write_bytes(b"I")
    plain = AgentImageConfig(image_dir=tmp_path, grpc_port=50051)
    no_ca = AgentImageConfig(image_dir=tmp_path, grpc_port=50051, tls=True)
    assert no_ca.missing() == ["agent_ca_file"]
    provision(core, "n1", MAC)
    for config, expected in ((plain, "kernel "), (no_ca, "not available")):
        http = BootHttpServer(("127.0.0.1", 0), core.planner, None, config)
        http.start()
        base = f"http://127.0.0.1:{http.server_address[1]}"
        try:
            with urllib.request.urlopen(f"{base}/boot.ipxe?mac={MAC}") as reply:
                script = reply.read().decode()
            assert expected in script and "bmi.ca" not in script
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{base}/agent/ca.cpio")
            assert refused.value.code == 404
        finally:
            http.stop()
