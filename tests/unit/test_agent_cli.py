"""`bmi node show` shows the boot mode and the agent's inventory; `bmi node provision
--boot-mode agent` asks for agent boot. Against an in-process fake NodeService."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from bmi.v1 import inventory_pb2, nodes_pb2, nodes_pb2_grpc
from bmi_client.cli import cli
from click.testing import CliRunner

INVENTORY = inventory_pb2.Inventory(
    cpu=inventory_pb2.Cpu(model="Intel(R) Xeon(R) Silver 4110", count=32, architecture="x86_64"),
    memory=inventory_pb2.Memory(physical_bytes=192 << 30, usable_bytes=187 << 30),
    block_devices=[
        inventory_pb2.BlockDevice(
            name="sda",
            size_bytes=1199 * 10**9,
            model="PERC H730P Mini",
            serial="0077bf2a",
            rotational=True,
        ),
    ],
    interfaces=[
        inventory_pb2.NetworkInterface(
            name="eno1", mac="e4:43:4b:1a:2b:3c", driver="bnxt_en", speed_mbps=10000, carrier=True
        ),
        inventory_pb2.NetworkInterface(name="eno2", mac="e4:43:4b:1a:2b:3d", driver="bnxt_en"),
    ],
    firmware=inventory_pb2.Firmware(kind=inventory_pb2.FIRMWARE_KIND_UEFI, version="2.17.1"),
    collectors=["generic"],
)


class FakeNodes(nodes_pb2_grpc.NodeServiceServicer):
    def __init__(self) -> None:
        self.provisioned: list[nodes_pb2.ProvisionNodeRequest] = []

    def _node(self, name: str) -> nodes_pb2.Node:
        return nodes_pb2.Node(
            id="node-00000000000000a1",
            name=name,
            project="alice",
            state=nodes_pb2.NODE_STATE_ACTIVE,
            boot_mode=nodes_pb2.BOOT_MODE_AGENT,
            inventory=INVENTORY,
        )

    def GetNode(self, request, context):
        return self._node(request.node)

    def ProvisionNode(self, request, context):
        self.provisioned.append(request)
        return self._node(request.node)


@pytest.fixture
def bmi(tmp_path):
    fake = FakeNodes()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    nodes_pb2_grpc.add_NodeServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    config = tmp_path / "client.toml"
    config.write_text("")
    env = {"BMI_CONFIG": str(config), "BMI_SERVER": f"127.0.0.1:{port}", "BMI_TOKEN": "t"}

    def run(*args: str):
        return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)

    run.fake = fake
    yield run
    server.stop(None)


def test_show_has_boot_mode_and_inventory(bmi):
    out = bmi("node", "show", "n1")
    assert out.exit_code == 0, out.output
    lines = [" ".join(line.split()) for line in out.output.splitlines()]
    assert "boot mode agent" in lines
    assert "cpu 32 x Intel(R) Xeon(R) Silver 4110 (x86_64)" in lines
    assert "memory 192.0 GiB" in lines and "firmware uefi 2.17.1" in lines
    assert "disk sda 1199.0 GB hdd PERC H730P Mini 0077bf2a" in lines
    assert "nic eno1 e4:43:4b:1a:2b:3c bnxt_en up 10000 Mb/s" in lines
    assert "nic eno2 e4:43:4b:1a:2b:3d bnxt_en down" in lines
    shown = json.loads(bmi("--json", "node", "show", "n1").output)
    assert shown["boot_mode"] == "BOOT_MODE_AGENT"
    assert shown["inventory"]["interfaces"][0]["speed_mbps"] == 10000


def test_provision_boot_mode(bmi):
    assert bmi("node", "provision", "n1", "--image", "g", "--boot-mode", "agent").exit_code == 0
    assert bmi("node", "provision", "n1", "--image", "g").exit_code == 0
    modes = [r.boot_mode for r in bmi.fake.provisioned]
    assert modes == [nodes_pb2.BOOT_MODE_AGENT, nodes_pb2.BOOT_MODE_SANBOOT]
    assert bmi("node", "provision", "n1", "--image", "g", "--boot-mode", "pxe").exit_code == 2
