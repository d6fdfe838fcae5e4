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
        return nodes_pb2.ListNodesResponse(nodes=[self._node("n1")], free_nodes=free)

    def TakeNode(self, request, context):
        self._record("TakeNode", request, context)
        return self._node(request.node, request.project or "alice")

    def GiveBackNode(self, request, context):
        self._record("GiveBackNode", request, context)
        return nodes_pb2.GiveBackNodeResponse()

    def ProvisionNode(self, request, context):
        self._record("ProvisionNode", request, context)
        return self._node(request.node)


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
