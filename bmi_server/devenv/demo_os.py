"""Demo part 2 with a real OS (``BMI_DEMO_OS=debian make demo``): the Debian golden image
(bmi_server/devenv/os_image.py, built once and cached) is uploaded as a qcow2; one QEMU
node PXE-boots, registers, is provisioned with it and sanboots its clone over iSCSI; when
its sshd answers, the demo prints the ``ssh`` command that logs in to it (the key went in
through a cloud-init seed) and, on a terminal, waits for Enter before powering it off."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bmi.v1 import images_pb2, nodes_pb2
from bmi_client.client import BmiClient
from rich.console import Console

from bmi_server.devenv import os_image
from bmi_server.devenv.guest_ssh import GuestSsh, make_key
from bmi_server.devenv.qemu_node import QemuNode, write_chain_script
from bmi_server.devenv.stack import DevStack, free_port

OSES = ("debian",)
BOOT_TIMEOUT = 900  # TCG: ~90 s on a quiet machine
MAC = "52:54:00:de:0a:01"
NODE = "debian-node"


def run(
    stack: DevStack, bmi: BmiClient, folder: Path, console: Console, firmware: str = "bios"
) -> bool:
    started = time.monotonic()
    image = os_image.build(log=console.print)
    console.print(
        f"golden image {image.qcow2} ({image.manifest['qcow2_bytes'] >> 20} MiB qcow2, kernel "
        f"{image.kernel_version}; {'cached' if image.cached else 'built'})"
    )
    t = time.monotonic()
    uploaded = bmi.upload_image(
        image.qcow2, "debian-12", project="ops", visibility=images_pb2.VISIBILITY_PUBLIC
    )
    console.print(f"uploaded as {uploaded.id} in {time.monotonic() - t:.1f} s")

    tftp = folder / "tftp"
    write_chain_script(tftp, f"10.0.2.2:{stack.http_address.rpartition(':')[2]}")
    key = make_key(folder / "ssh")
    seed = os_image.build_seed(
        folder / "seed.img", NODE, [key.with_suffix(".pub").read_text().strip()]
    )
    port = free_port()
    ssh = GuestSsh(port, key, image.default_user)
    vm = QemuNode(NODE, MAC, tftp, folder / "vm", serial="DEMO-OS-1", memory_mib=1024,
                  cpus=2, firmware=firmware, drives=[seed], forwards={port: 22})  # fmt: skip
    (folder / "vm").mkdir(exist_ok=True)
    try:
        vm.power_on()
        t0 = time.monotonic()
        console.print(f"{NODE} ({firmware}) powered on; serial console: {vm.serial_log}")
        seen = _wait(lambda: next((n for n in bmi.list_nodes() if MAC in n.macs), None), 120)
        console.print(f"  {time.monotonic() - t0:5.1f} s  registered as {seen.id}")
        bmi.enroll_node(NODE, "demo", discovered_node=seen.id)
        node = bmi.provision_node(NODE, image=uploaded.id)
        console.print(f"  {time.monotonic() - t0:5.1f} s  provisioned: {node.target.iqn}")
        _wait(lambda: bmi.get_node(NODE).state == nodes_pb2.NODE_STATE_ACTIVE, BOOT_TIMEOUT)
        console.print(f"  {time.monotonic() - t0:5.1f} s  logged in to its iSCSI target (active)")
        with console.status("waiting for sshd (GRUB, kernel, initramfs, systemd, cloud-init)"):
            ssh.wait(BOOT_TIMEOUT, alive=lambda: vm.running)
        console.print(f"  {time.monotonic() - t0:5.1f} s  sshd answers")
        console.print(ssh.run("echo; hostname; uname -r; findmnt -n -o SOURCE,TARGET /; "
                              "sudo iscsiadm -m session 2>/dev/null"))  # fmt: skip
        console.print(f"[bold]Log in with:[/bold]\n  {ssh.command_line()}")
        if sys.stdin.isatty():
            input("Press Enter to power the node off and clean up ... ")
        ssh.run("sudo systemctl poweroff", check=False, timeout=30)
        waited = vm.wait_exit(120)
        console.print(f"powered off cleanly in {waited:.1f} s")
        bmi.deprovision_node(NODE)
    finally:
        vm.power_off()
    bmi.delete_image(uploaded.id)
    console.print(f"real OS demo: {time.monotonic() - started:.1f} s")
    return True


def _wait(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError("the node did not get there in time")
