"""`bmi node take|give|ls --free|provision --power-cycle`, and HIL credentials from the CLI,
against an in-process fake NodeService that records what it was sent."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from bmi.v1 import nodes_pb2, nodes_pb2_grpc
from bmi_client.cli import cli
from click.testing import CliRunner


class FakeNodes(nodes_pb2_grpc.NodeServiceServicer):
    def __init__(self) -> None:
        self.seen: list[tuple[str, object, dict[str, str]]] = []

    def _record(self, method, request, context) -> None:
        self.seen.append((method, request, dict(context.invocation_metadata())))

    def _node(self, name: str, project: str = "alice") -> nodes_pb2.Node:
        return nodes_pb2.Node(id="node-00000000000000a1", name=name, project=project,
                              state=nodes_pb2.NODE_STATE_AVAILABLE)

    def ListNodes(self, request, context):
        self._record("ListNodes", request, context)
        free = ["free1", "free2"] if request.include_free else []
        unrecorded = nodes_pb2.Node(name="n2", project="alice",
                                    state=nodes_pb2.NODE_STATE_AVAILABLE)
        return nodes_pb2.ListNodesResponse(nodes=[self._node("n1"), unrecorded],
                                           free_nodes=free)

    def GetNode(self, request, context):
        self._record("GetNode", request, context)
        node = self._node(request.node)
        first = node.history.add(to_state=nodes_pb2.NODE_STATE_AVAILABLE, reason="recorded")
        first.time.FromSeconds(1_700_000_000)
        return node

    def TakeNode(self, request, context):
        self._record("TakeNode", request, context)
        return self._node(request.node, request.project or "alice")

    def GiveBackNode(self, request, context):
        self._record("GiveBackNode", request, context)
        return nodes_pb2.GiveBackNodeResponse()

    def ProvisionNode(self, request, context):
        self._record("ProvisionNode", request, context)
        return self._node(request.node)

    def ReprovisionNode(self, request, context):
        self._record("ReprovisionNode", request, context)
        node = self._node(request.node)
        node.target.CopyFrom(nodes_pb2.TargetInfo(iqn="iqn.2026-11.org.moc.bmi:dsk-1", lun=1,
                                                  config_lun=2))  # fmt: skip
        node.identity.CopyFrom(nodes_pb2.NodeIdentity(
            instance_id="i-00000000000000c1", hostname="web1",
            ssh_authorized_keys=["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIabcdefghijkl me@laptop"],
            user_data_set=True, metadata={"role": "db"}))  # fmt: skip
        return node


@pytest.fixture
def nodes():
    fake = FakeNodes()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    nodes_pb2_grpc.add_NodeServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    fake.address = f"127.0.0.1:{port}"
    yield fake
    server.stop(None)


@pytest.fixture
def bmi(nodes, tmp_path):
    config = tmp_path / "client.toml"
    config.write_text("")
    env = {"BMI_CONFIG": str(config), "BMI_SERVER": nodes.address, "BMI_TOKEN": None,
           "BMI_USER": None, "BMI_PASSWORD": None, "BMI_PROJECT": None}

    def run(*args: str, **extra_env: str):
        return CliRunner().invoke(cli, list(args), env={**env, **extra_env},
                                  catch_exceptions=False)

    return run


def test_take_and_give_with_hil_credentials(bmi, nodes):
    taken = bmi("--user", "alice", "--project", "alice", "node", "take", "free1",
                BMI_PASSWORD="pw:with:colons")
    assert taken.exit_code == 0, taken.output
    method, request, metadata = nodes.seen[-1]
    assert (method, request.node, request.project) == ("TakeNode", "free1", "")
    assert metadata["authorization"] == "Basic " + base64.b64encode(
        b"alice:pw:with:colons").decode()
    assert metadata["bmi-project"] == "alice"
    given = bmi("node", "give", "free1", BMI_USER="alice", BMI_PASSWORD="pw")
    assert given.exit_code == 0 and "gave back node free1" in given.output
    assert nodes.seen[-1][0] == "GiveBackNode" and nodes.seen[-1][1].node == "free1"
    assert "bmi-project" not in nodes.seen[-1][2]


def test_ls_free_lists_the_free_pool(bmi, nodes):
    out = bmi("--token", "t", "node", "ls", "--free")
    assert out.exit_code == 0 and out.output.split() == ["free1", "free2"]
    assert nodes.seen[-1][1].include_free
    out = bmi("--token", "t", "--json", "node", "ls", "--free")
    assert json.loads(out.output) == ["free1", "free2"]
    assert bmi("--token", "t", "node", "ls", "--free", "--state", "active").exit_code == 2


def test_provision_power_cycle_flag(bmi, nodes):
    out = bmi("--token", "t", "node", "provision", "n1", "--image", "golden", "--power-cycle")
    assert out.exit_code == 0, out.output
    request = nodes.seen[-1][1]
    assert (request.image, request.power_cycle) == ("golden", True)
    bmi("--token", "t", "node", "provision", "n1", "--image", "golden")
    assert nodes.seen[-1][1].power_cycle is False


def test_no_credentials_says_how_to_give_them(bmi, nodes):
    out = bmi("node", "take", "free1", BMI_USER="alice")  # a user but no password
    assert out.exit_code == 1 and "--user" in out.output and "BMI_PASSWORD" in out.output
    assert nodes.seen == []


def test_json_is_accepted_after_the_subcommand_too(bmi, nodes):
    for args in (["--json", "node", "ls", "--free"], ["node", "ls", "--free", "--json"]):
        out = bmi("--token", "t", *args)
        assert out.exit_code == 0 and json.loads(out.output) == ["free1", "free2"]
    listed = json.loads(bmi("--token", "t", "node", "ls", "--json").output)
    assert [(n["name"], n["id"]) for n in listed] == [("n1", "node-00000000000000a1"),
                                                      ("n2", "")]
    shown = json.loads(bmi("--token", "t", "node", "show", "n1", "--json").output)
    assert shown["name"] == "n1" and shown["history"][0]["from_state"] == (
        "NODE_STATE_UNSPECIFIED")


def test_a_node_not_recorded_yet_has_no_id_and_a_first_transition_reads_new(bmi, nodes):
    rows = bmi("--token", "t", "node", "ls").output.splitlines()
    assert [r.split()[:2] for r in rows[1:]] == [["node-00000000000000a1", "n1"], ["-", "n2"]]
    shown = bmi("--token", "t", "node", "show", "n1").output
    assert "new -> available: recorded" in shown


KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHC5ZJbn1ZKpHC2Vhfi6JjwN2LVbQMFN4nD6AX4mhTS6 me@x"


def test_provision_sends_the_node_config_from_files(bmi, nodes, tmp_path):
    keys = tmp_path / "keys.pub"
    keys.write_text(f"# mine\n{KEY}\n\nssh-rsa AAAAB3NzaC1yc2E other\n")
    more = tmp_path / "more.pub"
    more.write_text("ecdsa-sha2-nistp256 AAAAE2VjZHNh third\n")
    user_data = tmp_path / "user-data"
    user_data.write_bytes(b"#cloud-config\nruncmd: [touch /x]\n")
    network = tmp_path / "net.yaml"
    network.write_bytes(b"version: 2\n")
    done = bmi("--token", "t", "node", "provision", "n1", "--image", "debian",
               "--hostname", "web1", "--ssh-key", str(keys), "--ssh-key", str(more),
               "--user-data", str(user_data), "--network-config", str(network),
               "--meta", "role=db", "--meta", "rack=r7=x")  # fmt: skip
    assert done.exit_code == 0, done.output
    method, request, _ = nodes.seen[-1]
    assert method == "ProvisionNode" and request.image == "debian"
    config = request.config
    assert config.hostname == "web1"
    assert list(config.ssh_authorized_keys) == [KEY, "ssh-rsa AAAAB3NzaC1yc2E other",
                                                "ecdsa-sha2-nistp256 AAAAE2VjZHNh third"]
    assert config.user_data == b"#cloud-config\nruncmd: [touch /x]\n"
    assert config.network_config == b"version: 2\n"
    assert dict(config.metadata) == {"role": "db", "rack": "r7=x"}


def test_provision_without_config_options_sends_an_empty_config(bmi, nodes):
    assert bmi("--token", "t", "node", "provision", "n1", "--image", "d").exit_code == 0
    assert nodes.seen[-1][1].config == nodes_pb2.NodeConfig()


def test_reprovision_keeps_the_config_unless_options_replace_it(bmi, nodes, tmp_path):
    kept = bmi("--token", "t", "node", "reprovision", "n1")
    assert kept.exit_code == 0, kept.output
    assert not nodes.seen[-1][1].HasField("config")
    assert "web1" in kept.output and "i-00000000000000c1" in kept.output
    assert "LUN 2 of iqn.2026-11.org.moc.bmi:dsk-1" in kept.output
    assert "set" in kept.output and "me@laptop" in kept.output
    replaced = bmi("--token", "t", "node", "reprovision", "n1", "--hostname", "web2")
    assert replaced.exit_code == 0, replaced.output
    request = nodes.seen[-1][1]
    assert request.HasField("config") and request.config.hostname == "web2"
    as_json = json.loads(bmi("--token", "t", "--json", "node", "reprovision", "n1").output)
    assert as_json["identity"]["user_data_set"] is True and "user_data" not in as_json["identity"]


def test_bad_meta_is_a_usage_error(bmi, nodes):
    done = bmi("--token", "t", "node", "provision", "n1", "--image", "d", "--meta", "novalue")
    assert done.exit_code == 2 and "KEY=VALUE" in done.output
    assert not nodes.seen


def test_show_says_whether_the_nodes_session_is_on_and_since_when():
    from datetime import UTC, datetime

    from bmi_client.node_cli import _node_details

    node = nodes_pb2.Node(name="n1", state=nodes_pb2.NODE_STATE_ACTIVE,
                          target=nodes_pb2.TargetInfo(iqn="iqn.x:t", lun=1))
    node.session.time.FromDatetime(datetime(2026, 12, 1, 12, 0, 5, tzinfo=UTC))
    shown = {}
    for state, words in ((nodes_pb2.SESSION_STATE_LOGGED_IN, "logged in since "),
                         (nodes_pb2.SESSION_STATE_ENDED, "ended at "),
                         (nodes_pb2.SESSION_STATE_NONE, "none seen yet")):
        node.session.state = state
        shown[state] = dict(_node_details(node))["session"]
        assert shown[state].startswith(words)
    assert "2026-12-01 12:00:05.000Z" in shown[nodes_pb2.SESSION_STATE_ENDED]
    node.ClearField("session")  # no target, no session line
    assert "session" not in dict(_node_details(node))
