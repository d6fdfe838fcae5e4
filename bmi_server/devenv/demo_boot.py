"""Demo part 2: QEMU nodes PXE-boot, register themselves, get provisioned and boot their
own clone over iSCSI; a live table shows states and per-node timings."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import rados
import rbd
from bmi.v1 import images_pb2, nodes_pb2
from bmi_client.client import BmiClient
from rich.console import Console
from rich.live import Live
from rich.table import Table

from bmi_server.devenv import test_rootfs
from bmi_server.devenv.qemu_node import QemuNode, write_chain_script
from bmi_server.devenv.stack import DevStack
from bmi_server.devenv.test_disk import LABEL_LBA, MARKER_RE, SECTOR, build_test_disk

NODES = 3
TIMEOUT = 240
STATE_NAMES = {v: k.removeprefix("NODE_STATE_").lower() for k, v in nodes_pb2.NodeState.items()}


@dataclass
class Watched:
    vm: QemuNode
    name: str
    state: str = "powered on"
    # Seconds after power-on at which each milestone was seen.
    times: dict[str, float] = field(default_factory=dict)
    marker: str = ""
    node_id: str = ""

    def mark(self, milestone: str) -> None:
        if milestone not in self.times and self.vm.powered_on_at is not None:
            self.times[milestone] = time.monotonic() - self.vm.powered_on_at


MILESTONES = ("registered", "provisioned", "boot script", "iSCSI login", "OS marker")
ON_STATE = {
    "discovered": "registered",
    "provisioned": "provisioned",
    "booting": "boot script",
    "active": "iSCSI login",
}


def _table(nodes: list[Watched]) -> Table:
    table = Table(title="Nodes (seconds after power-on)")
    for column in ("node", "MAC", "state", *MILESTONES, "disk says"):
        table.add_column(column, justify="right" if column in MILESTONES else "left")
    for n in nodes:
        table.add_row(
            n.name,
            n.vm.mac,
            n.state,
            *(f"{n.times[m]:.1f}" if m in n.times else "…" for m in MILESTONES),
            n.marker or "…",
        )
    return table


def _watch(bmi: BmiClient, by_mac: dict[str, Watched], stop: threading.Event) -> None:
    stream = bmi.watch_nodes()
    threading.Thread(target=lambda: (stop.wait(), stream.cancel()), daemon=True).start()
    try:
        for event in stream:
            for mac in event.node.macs:
                watched = by_mac.get(mac)
                if watched is None:
                    continue
                state = STATE_NAMES[event.transition.to_state]
                watched.state = state
                if state in ON_STATE:
                    watched.mark(ON_STATE[state])
    except Exception:
        if not stop.is_set():
            raise


def run(
    stack: DevStack, bmi: BmiClient, folder: Path, console: Console, boot_mode: str = "sanboot"
) -> bool:
    """``boot_mode`` "agent": the nodes boot the node agent, which attaches their clone of
    a tiny ext4 OS (bmi_server/devenv/test_rootfs.py) and pivots into it."""
    agent = boot_mode == "agent"
    if agent:
        from bmi_server.devenv.agent_image import busybox_binary

        disk = test_rootfs.build_root_fs(folder / "demo-os.img", busybox_binary())
    else:
        disk = build_test_disk(folder / "demo-os.raw", label="GOLDEN")
    image = bmi.upload_image(
        disk, "demo-os", project="ops", visibility=images_pb2.VISIBILITY_PUBLIC
    )
    tftp = folder / "tftp"
    tftp.mkdir()
    write_chain_script(tftp, f"10.0.2.2:{stack.http_address.rpartition(':')[2]}")
    nodes = [
        Watched(
            QemuNode(
                f"vm-{i}",
                f"52:54:00:de:00:{i:02x}",
                tftp,
                _mkdir(folder / f"vm-{i}"),
                serial=f"DEMO-{i:04d}",
                memory_mib=512 if agent else 256,  # the agent's Python needs room
            ),
            f"node-{i}",
        )
        for i in range(1, NODES + 1)
    ]
    by_mac = {n.vm.mac: n for n in nodes}
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(bmi, by_mac, stop), daemon=True)
    watcher.start()
    time.sleep(0.5)  # the watch is subscribed before the first node can register
    try:
        for n in nodes:
            n.vm.power_on()
        with Live(_table(nodes), console=console, refresh_per_second=4) as live:
            _drive(
                bmi,
                nodes,
                image.id,
                _label_writer(stack),
                lambda: live.update(_table(nodes)),
                agent,
            )
        console.print()
        for n in nodes:
            bmi.deprovision_node(n.name)
    finally:
        stop.set()
        for n in nodes:
            n.vm.power_off()
    bmi.delete_image(image.id)
    if agent:  # one golden OS; its init names the node it booted on
        return all(n.marker and f"node={n.node_id} pid=1 " in n.marker for n in nodes)
    return all(n.marker.startswith(f"id={_label(n)}") for n in nodes)


def _drive(
    bmi: BmiClient,
    nodes: list[Watched],
    image_id: str,
    write_label,
    refresh,
    agent: bool = False,
) -> None:
    marker_re = test_rootfs.MARKER_RE if agent else MARKER_RE
    mode = nodes_pb2.BOOT_MODE_AGENT if agent else nodes_pb2.BOOT_MODE_SANBOOT
    deadline = time.monotonic() + TIMEOUT
    enrolled: set[str] = set()
    while time.monotonic() < deadline:
        for n in nodes:
            if n.name not in enrolled:
                seen = next(
                    (
                        x
                        for x in bmi.list_nodes(state=nodes_pb2.NODE_STATE_DISCOVERED)
                        if n.vm.mac in x.macs
                    ),
                    None,
                )
                if seen is not None:
                    bmi.enroll_node(n.name, "demo", discovered_node=seen.id)
                    node = bmi.provision_node(n.name, image=image_id, boot_mode=mode)
                    n.node_id = node.id
                    if not agent:
                        write_label(node.disk_id, _label(n))
                    enrolled.add(n.name)
            match = marker_re.search(n.vm.serial_text())
            if match and not n.marker:
                n.marker = re.sub(r"^BMI-(BOOT|ROOT)-MARKER ", "", match.group(0))
                n.mark("OS marker")
        refresh()
        if all(n.marker and "iSCSI login" in n.times for n in nodes):
            return
        time.sleep(0.25)
    raise TimeoutError("nodes did not boot in time")


def _label(n: Watched) -> str:
    return n.name.upper()


def _label_writer(stack: DevStack):
    """Gives each node's fresh clone its own identity, so the marker shows whose disk booted."""
    assert stack.cluster is not None
    conf, pool = str(stack.cluster.conf_path), stack.cluster.pool

    def write(disk_id: str, label: str) -> None:
        cluster = rados.Rados(conffile=conf)
        cluster.connect()
        try:
            with cluster.open_ioctx(pool) as ioctx, rbd.Image(ioctx, "bmi-" + disk_id) as vol:
                vol.write(label.encode().ljust(SECTOR, b"\0"), LABEL_LBA * SECTOR)
        finally:
            cluster.shutdown()

    return write


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
