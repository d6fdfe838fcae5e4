"""The agent's inventory: collectors read fixture trees shaped like real machines'."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from bmi_agent import inventory
from bmi_agent.client import inventory_message
from bmi_agent.inventory import (
    Collector,
    GenericCollector,
    NotMine,
    Support,
    SystemInfo,
    collect,
    load_plugins,
)
from bmi_agent.sysroot import SysRoot

FIXTURES = Path(__file__).parent / "agent_fixtures"
AGENT = Path(__file__).resolve().parents[2] / "bmi_agent"


def root(name: str) -> SysRoot:
    return SysRoot(FIXTURES / name, machine="x86_64")


def test_dell_r640():
    inv = collect(root("dell-r640"), [GenericCollector()])
    assert inv.cpu.model == "Intel(R) Xeon(R) Silver 4110 CPU @ 2.10GHz"
    assert (inv.cpu.count, inv.cpu.sockets, inv.cpu.architecture) == (32, 2, "x86_64")
    # 96 online 2 GiB blocks (one block is offline), not MemTotal.
    assert inv.memory.physical_bytes == 192 << 30
    assert inv.memory.usable_bytes == 196520684 * 1024
    assert [(d.name, d.size_bytes, d.rotational) for d in inv.block_devices] == [
        ("nvme0n1", 3125627568 * 512, False),
        ("sda", 2341994496 * 512, True),
    ]
    nvme, sda = inv.block_devices
    assert (nvme.model, nvme.serial) == ("Dell Express Flash PM1725a 1.6TB SFF", "S39XNX0K301522")
    assert (sda.vendor, sda.model) == ("DELL", "PERC H730P Mini")
    assert sda.serial == "0077bf2a0e2c1d8a2600f54a0ba00506"  # from VPD page 0x80
    assert [(n.name, n.mac, n.driver, n.speed_mbps, n.carrier) for n in inv.interfaces] == [
        ("eno1", "e4:43:4b:1a:2b:3c", "bnxt_en", 10000, True),
        ("eno2", "e4:43:4b:1a:2b:3d", "bnxt_en", 0, False),  # no link: speed unknown
        ("idrac", "0a:94:ef:5c:d2:11", "cdc_ether", 425, True),
    ]
    assert inv.system == SystemInfo(
        "Dell Inc.", "PowerEdge R640", "7XYZ123", "4c4c4544-0058-5910-805a-b7c04f313233"
    )
    assert (inv.firmware.kind, inv.firmware.vendor, inv.firmware.version) == (
        "uefi",
        "Dell Inc.",
        "2.17.1",
    )
    assert inv.collectors == ["generic"]


def test_qemu_node():
    inv = collect(root("qemu-pc"), [GenericCollector()])
    assert (inv.cpu.model, inv.cpu.count) == ("QEMU Virtual CPU version 2.5+", 2)
    assert inv.memory.physical_bytes == 512 << 20
    assert inv.block_devices == []
    assert [(n.name, n.driver, n.speed_mbps, n.carrier) for n in inv.interfaces] == [
        ("eth0", "virtio_net", 0, True)
    ]
    assert inv.macs() == ["52:54:00:a6:00:01"]
    assert inv.firmware.kind == "bios" and inv.firmware.vendor == "SeaBIOS"
    assert inv.system.serial == "SN-AGENT-1"


def test_missing_files_give_empty_answers_not_errors(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cpuinfo").write_text("processor\t: 0\nmodel name\t: X\n")
    inv = collect(SysRoot(tmp_path, machine="aarch64"), [GenericCollector()])
    assert (inv.cpu.count, inv.cpu.model, inv.cpu.architecture) == (1, "X", "aarch64")
    assert inv.memory.physical_bytes == 0 and inv.interfaces == [] and inv.block_devices == []
    assert inv.firmware.kind == "bios" and inv.system == SystemInfo()


class RackDb(Collector):
    """A site collector: knows the serial numbers of Dells better, nothing else."""

    name = "rack-db"

    def support(self, root):
        dell = root.read("/sys/class/dmi/id/sys_vendor") == "Dell Inc."
        return Support.SITE if dell else Support.NONE

    def system(self, root):
        return SystemInfo("Dell Inc.", "PowerEdge R640", "RACK-7-U12", "from-rack-db")

    def cpu(self, root):
        raise NotMine


class Broken(Collector):
    name = "broken"

    def support(self, root):
        return Support.PLATFORM

    def memory(self, root):
        raise OSError("EIO on /sys")


class Never(Collector):
    name = "never"

    def cpu(self, root):  # NONE support: never asked
        raise AssertionError("asked a collector that does not support the machine")


def test_collectors_are_asked_in_order_of_support():
    everyone = [GenericCollector(), Never(), Broken(), RackDb()]
    ranked = [c.name for _, c in inventory.ranked(root("dell-r640"), everyone)]
    assert ranked == ["rack-db", "broken", "generic"]
    inv = collect(root("dell-r640"), everyone)
    assert inv.system.serial == "RACK-7-U12"  # the site's answer wins
    assert inv.cpu.count == 32  # rack-db passed: generic answered
    assert inv.memory.physical_bytes == 192 << 30  # broken failed: generic answered
    assert inv.collectors == ["rack-db", "generic"]
    # On the QEMU node the site collector does not apply at all.
    assert collect(root("qemu-pc"), everyone).system.serial == "SN-AGENT-1"


def test_site_collectors_load_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "site_bmi_collectors.py").write_text(
        "from bmi_agent.inventory import Collector, register\n"
        "@register\n"
        "class Asset(Collector):\n"
        "    name = 'asset-tags'\n"
        "    def support(self, root):\n"
        "        return 3\n"
        "    def system(self, root):\n"
        "        from bmi_agent.inventory import SystemInfo\n"
        "        return SystemInfo(serial='ASSET-1')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        problems = load_plugins({"BMI_AGENT_COLLECTORS": "site_bmi_collectors, no_such_module"})
        assert len(problems) == 1 and "no_such_module" in problems[0]
        assert "asset-tags" in inventory.registered()
        inv = collect(root("qemu-pc"))
        assert inv.system.serial == "ASSET-1" and inv.collectors == ["asset-tags", "generic"]
    finally:
        inventory._REGISTRY.pop("asset-tags", None)
        sys.modules.pop("site_bmi_collectors", None)


def test_inventory_message_carries_every_field():
    msg = inventory_message(collect(root("dell-r640"), [GenericCollector()]))
    assert msg.cpu.count == 32 and msg.memory.physical_bytes == 192 << 30
    assert [d.serial for d in msg.block_devices] == ["S39XNX0K301522", sda_serial()]
    assert [n.speed_mbps for n in msg.interfaces] == [10000, 0, 425]
    assert msg.system.uuid == "4c4c4544-0058-5910-805a-b7c04f313233"
    assert msg.firmware.kind == 2 and list(msg.collectors) == ["generic"]  # UEFI


def sda_serial() -> str:
    return "0077bf2a0e2c1d8a2600f54a0ba00506"


def test_the_agent_imports_nothing_of_the_server():
    """It must fit in the initramfs: grpcio, protobuf, the bmi.v1 stubs and the stdlib."""
    allowed_third_party = {"grpc", "google", "bmi", "bmi_agent"}
    for source in AGENT.glob("*.py"):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top != "bmi_server", f"{source.name} imports {name}"
                assert top in allowed_third_party or top in sys.stdlib_module_names, (
                    f"{source.name} imports {name}, which the agent image does not hold"
                )


@pytest.mark.parametrize(("text", "count"), [("0", 1), ("0-3", 4), ("0-3,8-11", 8), ("0,2,4-5", 4)])
def test_cpu_list_count(text, count):
    assert inventory._cpu_list_count(text) == count
