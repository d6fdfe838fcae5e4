"""`make demo`: BMI's main job end to end on throwaway parts (no HIL needed).

Starts a one-node Ceph cluster, tgtd and a bmi-server; shows the image catalogue at
work (64 MiB import, 100 clones, a snapshot); then powers on QEMU nodes that PXE-boot,
register themselves, get provisioned and boot their own clone over iSCSI, with a live
table of states and timings; then removes everything and checks nothing is left.

``BMI_DEMO_OS=debian``: part 2 is one node booting the real Debian golden image instead
(``demo_os.py``), with the ``ssh`` command that logs in to it.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

from bmi_client.client import BmiClient
from rich.console import Console
from rich.table import Table

from bmi_server.adapters.ceph.rbd_store import RbdImageStore
from bmi_server.adapters.tgt.layout import default_processes
from bmi_server.devenv import demo_boot, demo_catalogue, demo_os
from bmi_server.devenv.stack import DevStack

console = Console(width=None if sys.stdout.isatty() else 140)

# Nodes ask again every second while waiting, and logins are noticed quickly.
STACK_ENV = {"BMI_DISCOVERY_RETRY_SECONDS": "1", "BMI_SESSION_POLL_SECONDS": "0.2"}
# BMI_DEMO_BOOT_MODE=agent make demo: the nodes boot through the node agent instead.
BOOT_MODE = os.environ.get("BMI_DEMO_BOOT_MODE", "sanboot")
# BMI_DEMO_OS=debian make demo: one node sanboots the real Debian golden image and the demo
# prints the ssh command that logs in to it (BMI_DEMO_FIRMWARE=uefi: under OVMF).
DEMO_OS = os.environ.get("BMI_DEMO_OS", "")
FIRMWARE = os.environ.get("BMI_DEMO_FIRMWARE", "bios")


def run() -> int:
    if DEMO_OS and DEMO_OS not in demo_os.OSES:
        console.print(f"BMI_DEMO_OS must be one of {', '.join(demo_os.OSES)}, not {DEMO_OS!r}")
        return 2
    if FIRMWARE not in ("bios", "uefi"):
        console.print(f"BMI_DEMO_FIRMWARE must be bios or uefi, not {FIRMWARE!r}")
        return 2
    with tempfile.TemporaryDirectory(prefix="bmi-demo-") as tmp:
        folder = Path(tmp)
        t0 = time.monotonic()
        env = dict(STACK_ENV)
        if BOOT_MODE == "agent":
            from bmi_server.devenv.agent_image import build

            image = build(log=console.print)
            env.update(
                BMI_AGENT_IMAGE_DIR=str(image.directory), BMI_AGENT_HEARTBEAT_SECONDS="1"
            )
        # As many tgtds as a server of its own would run on this machine.
        with DevStack(extra_env=env, advertise_host="10.0.2.2",
                      tgtd_processes=default_processes()) as stack:
            timings = [("Ceph + tgtd + bmi-server up", time.monotonic() - t0)]
            with BmiClient(stack.address, stack.admin_token, timeout=120) as bmi:
                console.rule("1. Image catalogue")
                timings += demo_catalogue.run(bmi, folder, console)
                if DEMO_OS:
                    console.rule(f"2. A node boots {DEMO_OS} from its own clone over iSCSI")
                    booted = demo_os.run(stack, bmi, folder, console, FIRMWARE)
                else:
                    how = " through the node agent" if BOOT_MODE == "agent" else ""
                    console.rule(f"2. Nodes boot their own clones over iSCSI{how}")
                    booted = demo_boot.run(stack, bmi, folder, console, BOOT_MODE)
                left = _left_behind(stack, bmi)
        _summary(timings)
        clean = not any(left.values())
        console.print(
            "left behind: "
            + ", ".join(f"{v} {k}" for k, v in left.items())
            + " -> "
            + ("[green]clean[/green]" if clean else "[red]NOT clean[/red]")
        )
        return 0 if booted and clean else 1


def _left_behind(stack: DevStack, bmi: BmiClient) -> dict[str, int]:
    assert stack.cluster is not None and stack.tgtds is not None
    store = RbdImageStore(str(stack.cluster.conf_path), stack.cluster.pool)
    try:
        volumes = len(store.list_volumes())
    finally:
        store.close()
    show = "".join(d.tgtadm("--op", "show", "--mode", "target").stdout
                   for d in stack.tgtds.daemons)
    return {
        "images": len(list(bmi.list_images())),
        "disks": len(list(bmi.list_disks())),
        "Ceph volumes": volumes,
        "iSCSI targets": len(re.findall(r"^Target \d+:", show, re.MULTILINE)),
    }


def _summary(timings: list[tuple[str, float]]) -> None:
    table = Table(title="Timings")
    table.add_column("step")
    table.add_column("time", justify="right")
    for step, seconds in timings:
        table.add_row(step, f"{seconds * 1000:.1f} ms")
    console.print(table)


if __name__ == "__main__":
    sys.exit(run())
