"""Hardware inventory from pluggable collectors.

A collector answers some of the questions (CPU, memory, block devices, network
interfaces, system identity, firmware) and says how well it supports this machine. The
agent asks the collectors in order of support, highest first; the first one that answers
a question wins it, and one that does not know (it raises ``NotMine``, or fails) passes
the question on. ``GenericCollector`` answers everything from /proc and /sys on any Linux
machine, at the lowest support level, so a site collector only overrides what it must.

A site adds its own collector by registering a subclass: from a module named in
``BMI_AGENT_COLLECTORS`` (comma-separated, imported at start), or from a Python entry
point in the ``bmi_agent.collectors`` group. In the agent's image: build it with
``python -m bmi_server.devenv.agent_image --add rack_collectors.py`` and add
``BMI_AGENT_COLLECTORS=rack_collectors`` to the server's ``agent_kernel_args`` (the kernel
hands such arguments to /init as environment variables)::

    from bmi_agent.inventory import Collector, Support, register

    @register
    class RackCollector(Collector):
        name = "rack-db"

        def support(self, root):
            return Support.SITE if root.read("/sys/class/dmi/id/sys_vendor") == "ACME" else 0

        def system(self, root):
            ...
"""

from __future__ import annotations

import enum
import importlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from .sysroot import SysRoot

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "bmi_agent.collectors"
MODULES_ENV = "BMI_AGENT_COLLECTORS"


class Support(enum.IntEnum):
    """How well a collector supports this machine (larger: asked earlier)."""

    NONE = 0  # not at all: never asked
    GENERIC = 1  # any Linux machine
    PLATFORM = 2  # this hardware family (a vendor's servers, a hypervisor)
    SITE = 3  # the operator's own knowledge of this machine


class NotMine(Exception):
    """This collector does not answer that question here: ask the next one."""


@dataclass
class Cpu:
    model: str = ""
    count: int = 0
    architecture: str = ""
    sockets: int = 0


@dataclass
class Memory:
    physical_bytes: int = 0
    usable_bytes: int = 0


@dataclass
class BlockDevice:
    name: str
    size_bytes: int
    model: str = ""
    serial: str = ""
    rotational: bool = False
    vendor: str = ""


@dataclass
class NetworkInterface:
    name: str
    mac: str
    driver: str = ""
    speed_mbps: int = 0
    carrier: bool = False


@dataclass
class SystemInfo:
    manufacturer: str = ""
    product: str = ""
    serial: str = ""
    uuid: str = ""


@dataclass
class Firmware:
    kind: str = ""  # "bios" | "uefi" | "" (unknown)
    vendor: str = ""
    version: str = ""


@dataclass
class Inventory:
    cpu: Cpu = field(default_factory=Cpu)
    memory: Memory = field(default_factory=Memory)
    block_devices: list[BlockDevice] = field(default_factory=list)
    interfaces: list[NetworkInterface] = field(default_factory=list)
    system: SystemInfo = field(default_factory=SystemInfo)
    firmware: Firmware = field(default_factory=Firmware)
    collectors: list[str] = field(default_factory=list)  # who answered, in asking order

    def macs(self) -> list[str]:
        return [nic.mac for nic in self.interfaces]


class Collector:
    """Base of every collector: answers nothing until a subclass overrides a question."""

    name = "collector"

    def support(self, root: SysRoot) -> int:
        return Support.NONE

    def cpu(self, root: SysRoot) -> Cpu:
        raise NotMine

    def memory(self, root: SysRoot) -> Memory:
        raise NotMine

    def block_devices(self, root: SysRoot) -> list[BlockDevice]:
        raise NotMine

    def interfaces(self, root: SysRoot) -> list[NetworkInterface]:
        raise NotMine

    def system(self, root: SysRoot) -> SystemInfo:
        raise NotMine

    def firmware(self, root: SysRoot) -> Firmware:
        raise NotMine


QUESTIONS = ("cpu", "memory", "block_devices", "interfaces", "system", "firmware")

_REGISTRY: dict[str, type[Collector]] = {}
C = TypeVar("C", bound=type[Collector])


def register(cls: C) -> C:
    """Class decorator: make a collector known to ``collect``."""
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Collector]]:
    return dict(_REGISTRY)


def load_plugins(env: dict[str, str] | None = None) -> list[str]:
    """Import site collectors (entry points and BMI_AGENT_COLLECTORS); returns failures."""
    problems = []
    env = os.environ if env is None else env
    for module in filter(None, (m.strip() for m in env.get(MODULES_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except Exception as exc:
            problems.append(f"collector module {module}: {exc}")
    try:
        from importlib.metadata import entry_points

        for point in entry_points(group=ENTRY_POINT_GROUP):
            try:
                loaded = point.load()
                if isinstance(loaded, type) and issubclass(loaded, Collector):
                    register(loaded)
            except Exception as exc:
                problems.append(f"collector entry point {point.name}: {exc}")
    except Exception as exc:  # no metadata at all (a stripped initramfs): not fatal
        problems.append(f"entry points: {exc}")
    return problems


def ranked(root: SysRoot, collectors: Iterable[Collector]) -> list[tuple[int, Collector]]:
    """Collectors that support this machine, best first (ties: by name)."""
    rated = []
    for collector in collectors:
        try:
            level = int(collector.support(root))
        except Exception:
            log.exception("collector %s failed to rate this machine", collector.name)
            continue
        if level > Support.NONE:
            rated.append((level, collector))
    return sorted(rated, key=lambda pair: (-pair[0], pair[1].name))


def collect(root: SysRoot, collectors: Iterable[Collector] | None = None) -> Inventory:
    """Ask each question of the collectors in order of support; first answer wins."""
    if collectors is None:
        collectors = [cls() for cls in _REGISTRY.values()]
    order = [c for _, c in ranked(root, collectors)]
    inventory = Inventory()
    answered: list[str] = []
    for question in QUESTIONS:
        for collector in order:
            method: Callable[[SysRoot], object] = getattr(collector, question)
            try:
                answer = method(root)
            except NotMine:
                continue
            except Exception as exc:  # one broken collector must not stop the boot
                log.warning("collector %s failed on %s: %s", collector.name, question, exc)
                continue
            setattr(inventory, question, answer)
            if collector.name not in answered:
                answered.append(collector.name)
            break
    inventory.collectors = [c.name for c in order if c.name in answered]
    return inventory


# -- the generic collector: /proc and /sys ----------------------------------------------

# Block devices that are not disks of the machine.
_VIRTUAL_BLOCK = ("loop", "ram", "zram", "dm-", "md", "sr", "fd", "nbd")


def _cpu_list_count(text: str) -> int:
    """``0-3,8-11`` -> 8."""
    count = 0
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


def _printable(raw: bytes) -> str:
    return "".join(chr(b) for b in raw if 32 <= b < 127).strip()


@register
class GenericCollector(Collector):
    """Everything from /proc, /sys and /sys/class/dmi/id, on any Linux machine."""

    name = "generic"

    def support(self, root: SysRoot) -> int:
        return Support.GENERIC if root.exists("/proc/cpuinfo") else Support.NONE

    def cpu(self, root: SysRoot) -> Cpu:
        blocks = [
            dict(
                (k.strip(), v.strip())
                for k, _, v in (line.partition(":") for line in block.splitlines())
            )
            for block in root.read("/proc/cpuinfo").split("\n\n")
            if block.strip()
        ]
        processors = [b for b in blocks if "processor" in b]
        first = processors[0] if processors else {}
        model = first.get("model name") or first.get("cpu model") or first.get("Processor", "")
        online = root.read("/sys/devices/system/cpu/online")
        count = _cpu_list_count(online) if online else len(processors)
        sockets = len({b["physical id"] for b in processors if "physical id" in b})
        return Cpu(model=model, count=count, architecture=root.machine, sockets=sockets)

    def memory(self, root: SysRoot) -> Memory:
        usable = 0
        for line in root.read("/proc/meminfo").splitlines():
            key, _, value = line.partition(":")
            if key == "MemTotal":
                usable = int(value.split()[0]) * 1024
        # Installed memory: the online memory blocks (MemTotal lacks what the firmware
        # and the kernel keep for themselves).
        block = root.read_int("/sys/devices/system/memory/block_size_bytes", 0, 16)
        blocks = [
            d
            for d in root.listdir("/sys/devices/system/memory")
            if d.startswith("memory") and d[6:].isdigit()
        ]
        online = sum(
            1 for d in blocks if root.read(f"/sys/devices/system/memory/{d}/state") == "online"
        )
        physical = block * online if block and online else usable
        return Memory(physical_bytes=physical, usable_bytes=usable)

    def block_devices(self, root: SysRoot) -> list[BlockDevice]:
        devices = []
        for name in root.listdir("/sys/block"):
            if name.startswith(_VIRTUAL_BLOCK):
                continue
            base = f"/sys/block/{name}"
            size = root.read_int(f"{base}/size") * 512
            if size == 0:
                continue  # an empty card reader or CD drive
            serial = root.read(f"{base}/device/serial") or root.read(f"{base}/serial")
            if not serial:
                # SCSI/SATA: the unit serial number VPD page (4 header bytes, then ASCII).
                serial = _printable(root.read_bytes(f"{base}/device/vpd_pg80")[4:])
            devices.append(
                BlockDevice(
                    name=name,
                    size_bytes=size,
                    model=root.read(f"{base}/device/model"),
                    serial=serial,
                    rotational=root.read(f"{base}/queue/rotational") == "1",
                    vendor=root.read(f"{base}/device/vendor"),
                )
            )
        return devices

    def interfaces(self, root: SysRoot) -> list[NetworkInterface]:
        nics = []
        for name in root.listdir("/sys/class/net"):
            base = f"/sys/class/net/{name}"
            if not root.exists(f"{base}/device"):
                continue  # virtual: loopback, bridge, bond, VLAN, veth
            speed = root.read_int(f"{base}/speed", 0)
            nics.append(
                NetworkInterface(
                    name=name,
                    mac=root.read(f"{base}/address").lower(),
                    driver=root.link_name(f"{base}/device/driver"),
                    speed_mbps=speed if speed > 0 else 0,
                    carrier=root.read(f"{base}/carrier") == "1",
                )
            )
        return nics

    def system(self, root: SysRoot) -> SystemInfo:
        dmi = "/sys/class/dmi/id"
        return SystemInfo(
            manufacturer=root.read(f"{dmi}/sys_vendor"),
            product=root.read(f"{dmi}/product_name"),
            serial=root.read(f"{dmi}/product_serial"),
            uuid=root.read(f"{dmi}/product_uuid").lower(),
        )

    def firmware(self, root: SysRoot) -> Firmware:
        dmi = "/sys/class/dmi/id"
        return Firmware(
            kind="uefi" if root.exists("/sys/firmware/efi") else "bios",
            vendor=root.read(f"{dmi}/bios_vendor"),
            version=root.read(f"{dmi}/bios_version"),
        )
