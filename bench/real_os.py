"""A real operating system: the Debian 12 golden image (bmi_server/devenv/os_image.py) from
power-on to SSH answering, and repurposing a node, the M2 paper's headline.

* **Boot**: QEMU power-on -> sshd answers (its banner through QEMU's port forward; the
  key the node was provisioned with must then log in, not timed), for a node that
  PXE-boots iPXE, fetches its script from BMI and ``sanboot``s its clone over iSCSI from
  tgtd (BIOS; the cloud-init seed is the config drive, LUN 2 of its target), against
  the same image on the node's own local virtio disk: an uncompressed copy of the golden
  image with a fresh qcow2 overlay per boot, so that every boot is a first boot as a
  fresh clone's is, and the same cloud-init files on a NoCloud seed drive. Same QEMU
  otherwise: memory, CPUs, NIC, TCG (this machine's /dev/kvm does not run guests).
* **Repurpose**: a node that booted one image to SSH is powered off (the plug pulled),
  then, timed from here: deprovisioned, provisioned with another image and another
  identity (host name, SSH key: the previous key must no longer log in), powered on and
  waited for until sshd answers; against one boot (the median power-on -> sshd above).
  The other image is a second import of the same qcow2 under another name: its own RBD
  parent, nothing of the first image's cached. Standalone mode (no HIL here) cannot move
  a node to another project (an admin enrols a node in one project; TakeNode and
  GiveBackNode need HIL), so the node stays in its project and the new tenant is the new
  image and identity; with HIL a move adds its GiveBack + Take (HIL's network calls),
  which this machine cannot measure.
* Local and network boots alternate (local 1, network 1, local 2, repurpose 1, ...), so
  that the load of other work on the machine falls on both alike.

Where the time goes is read from the serial console (GRUB's menu, the kernel's banner,
systemd's welcome, cloud-init's final message) and, for the network boot, the node's
history in BMI (boot script fetched, iPXE logged in to the target).
"""

from __future__ import annotations

import re
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path

from bmi.v1 import images_pb2, nodes_pb2
from bmi_client.client import BmiClient, node_config

from bench.common import Figure, Results, median, scale
from bmi_server.devenv import os_image
from bmi_server.devenv.guest_ssh import GuestSsh, make_key
from bmi_server.devenv.qemu_node import QemuNode, write_chain_script
from bmi_server.devenv.stack import DevStack, free_port

RUNS = scale(1, 3)  # repurposes; boots: RUNS + 1 over iSCSI and as many local, alternating
MEMORY_MIB = 1024
CPUS = 2
BOOT_TIMEOUT = 900  # power-on -> ssh: ~90 s alone under TCG, much more on a busy machine
BANNER_SECONDS = 3.0
POLL_SECONDS = 0.5
LOGIN_TIMEOUT = 300  # sshd answered: the key logs in soon after (cloud-init put it first)
MAC = "52:54:00:be:05:01"
NODE = "bench-os"
PROJECT = "bench"
IMAGES = ("debian-12", "debian-12-b")
REPURPOSE_GOAL_SECONDS = 300.0  # the M2 paper: a node moves between tenants in < 5 minutes

# Milestones of a boot, in the order they happen: (key, what, regex on the serial console).
# The network boot's first two come from BMI's record of the node instead.
SCRIPT, SAN = "script", "san"
SERIAL_MARKS = (
    ("grub", "GRUB menu", r"GNU GRUB"),
    ("kernel", "kernel banner", r"Linux version \d"),
    ("systemd", "systemd (root mounted)", r"Welcome to .*Debian"),
    ("cloud-init", "cloud-init finished", r"Cloud-init v\. \S+ finished"),
)
LABELS = {
    SCRIPT: "boot script fetched",
    SAN: "iPXE logged in to the target",
    **{key: what for key, what, _ in SERIAL_MARKS},
    "ssh": "sshd answers",
}
ORDER = (SCRIPT, SAN, *(key for key, _, _ in SERIAL_MARKS))


@dataclass
class Boot:
    """One boot: seconds from power-on to SSH, and to each milestone seen."""

    ssh: float  # sshd's banner
    marks: dict[str, float] = field(default_factory=dict)
    login: float = 0.0  # the key logged in (ssh tried every 2 s)


def phases(marks: dict[str, float], end: float) -> list[tuple[str, float]]:
    """The durations between consecutive milestones (in ``ORDER``; those not seen are
    skipped, as are any seen out of order), from power-on to ``end`` (SSH answers):
    ``[("power-on -> GRUB menu", 12.0), ("GRUB menu -> kernel banner", 3.1), ...]``."""
    out, at, since = [], 0.0, "power-on"
    for key in ORDER:
        t = marks.get(key)
        if t is None or t < at or t > end:
            continue
        out.append((f"{since} -> {LABELS[key]}", t - at))
        at, since = t, LABELS[key]
    out.append((f"{since} -> {LABELS['ssh']}", end - at))
    return out


def median_marks(boots: list[Boot]) -> dict[str, float]:
    """Per milestone, the median over the boots that saw it."""
    keys = {k for b in boots for k in b.marks}
    return {k: median([b.marks[k] for b in boots if k in b.marks]) for k in keys}


def describe(marks: dict[str, float], end: float) -> str:
    return "; ".join(f"{what} {seconds:.1f} s" for what, seconds in phases(marks, end))


class _SerialWatch:
    """Notes when each serial milestone first appears (seconds since power-on)."""

    def __init__(self, vm: QemuNode) -> None:
        self._vm = vm
        self._patterns = [(key, re.compile(rx)) for key, _, rx in SERIAL_MARKS]
        self.marks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic() - (self._vm.powered_on_at or 0)
            text = self._vm.serial_text()
            for key, regex in self._patterns:
                if key not in self.marks and regex.search(text):
                    self.marks[key] = now
            self._stop.wait(0.25)

    def __enter__(self) -> _SerialWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _sshd_answers(port: int) -> bool:
    """Whether the guest's sshd sends its banner through the forwarded port. QEMU's user
    networking accepts the host's connection at once and only then tries the guest, so
    only the banner says that sshd is there."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=BANNER_SECONDS) as s:
            s.settimeout(BANNER_SECONDS)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def _boot_to_ssh(vm: QemuNode, ssh: GuestSsh) -> Boot:
    """Power on, wait until sshd answers (the figure), then until the key logs in (it must:
    the node was given it at provisioning). The VM is left running."""
    vm.power_on()
    on = vm.powered_on_at or time.monotonic()
    with _SerialWatch(vm) as watch:
        while not _sshd_answers(ssh.port):
            if not vm.running:
                raise RuntimeError(f"{vm.name} died; serial:\n{vm.serial_text()[-3000:]}")
            if time.monotonic() > on + BOOT_TIMEOUT:
                raise TimeoutError(f"{vm.name}: no sshd within {BOOT_TIMEOUT} s; serial:\n"
                                   f"{vm.serial_text()[-3000:]}")  # fmt: skip
            time.sleep(POLL_SECONDS)
        answered = time.monotonic() - on
        ssh.wait(LOGIN_TIMEOUT, alive=lambda: vm.running)
        login = time.monotonic() - on
    return Boot(answered, dict(watch.marks), login)


def _wall(vm: QemuNode) -> float:
    """The VM's power-on on the wall clock, which the server's timestamps use."""
    return time.time() - (time.monotonic() - (vm.powered_on_at or 0))


def _history_marks(admin: BmiClient, on: float) -> dict[str, float]:
    reasons = {"fetched its boot script": SCRIPT, "initiator logged in to its target": SAN}
    marks: dict[str, float] = {}
    for t in admin.get_node(NODE).history:
        at = t.time.ToDatetime(tzinfo=UTC).timestamp() - on
        key = reasons.get(t.reason)
        if key and at >= 0 and key not in marks:
            marks[key] = at
    return marks


def _local_base(golden: os_image.OsImage, folder: Path) -> Path:
    """The image for the machine's own disk: an uncompressed copy (the clone BMI exports is
    not compressed either); each boot gets a fresh overlay on it."""
    base = folder / "local-base.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(golden.qcow2),
                    str(base)], check=True, capture_output=True)  # fmt: skip
    (folder / "tftp-empty").mkdir()
    return base


def _local_boot(golden: os_image.OsImage, folder: Path, base: Path, i: int) -> Boot:
    """Boot ``i`` of the image from the machine's own virtio disk, then power it off."""
    work = folder / f"local-{i}"
    overlay = work / "disk.qcow2"
    work.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base),
                    str(overlay)], check=True, capture_output=True)  # fmt: skip
    key = make_key(work / "ssh")
    seed = os_image.build_seed(work / "seed.img", f"local-{i}",
                               [key.with_suffix(".pub").read_text().strip()],
                               instance_id=f"iid-local-{i}")  # fmt: skip
    port = free_port()
    vm = QemuNode(f"local-{i}", MAC, folder / "tftp-empty", work / "vm", memory_mib=MEMORY_MIB,
                  cpus=CPUS, boot="c", local_disk=overlay, drives=[seed],
                  forwards={port: 22})  # fmt: skip
    try:
        boot = _boot_to_ssh(vm, GuestSsh(port, key, golden.default_user))
    finally:
        vm.power_off()
    print(f"  local boot {i + 1}/{RUNS + 1}: sshd after {boot.ssh:.1f} s, login "
          f"{boot.login:.1f} s ({describe(boot.marks, boot.ssh)})", flush=True)  # fmt: skip
    return boot


@dataclass
class Repurpose:
    total: float  # deprovision called -> sshd answers (then the new key logs in, the old not)
    deprovision: float
    provision: float
    boot: Boot


def run(results: Results) -> None:
    golden = os_image.build(log=print)  # cached: seconds; else a few minutes, untimed
    with tempfile.TemporaryDirectory(prefix="bmi-real-os-") as tmp:
        folder = Path(tmp)
        network: list[Boot] = []
        repurposes: list[Repurpose] = []
        env = {"BMI_SESSION_POLL_SECONDS": "0.2", "BMI_DISCOVERY_RETRY_SECONDS": "2"}
        with (
            DevStack(extra_env=env, advertise_host="10.0.2.2", projects=(PROJECT,)) as stack,
            BmiClient(stack.address, stack.admin_token, timeout=300) as admin,
            BmiClient(stack.address, stack.project_tokens[PROJECT], timeout=300) as tenant,
        ):
            for name in IMAGES:
                t = time.monotonic()
                admin.upload_image(golden.qcow2, name, project="ops",
                                   visibility=images_pb2.VISIBILITY_PUBLIC)  # fmt: skip
                print(f"  imported {name} ({golden.qcow2.stat().st_size >> 20} MiB qcow2) in "
                      f"{time.monotonic() - t:.1f} s", flush=True)  # fmt: skip
            base = _local_base(golden, folder)
            local: list[Boot] = []
            admin.enroll_node(NODE, PROJECT, macs=[MAC])
            tftp = folder / "tftp"
            write_chain_script(tftp, f"10.0.2.2:{stack.http_address.rpartition(':')[2]}")

            def identity(i: int) -> tuple[Path, nodes_pb2.NodeConfig]:
                """Tenant i's SSH key and the node's config for it."""
                key = make_key(folder / f"ssh-{i}")
                return key, node_config(
                    hostname=f"tenant-{i}",
                    ssh_authorized_keys=[key.with_suffix(".pub").read_text().strip()],
                )

            def boot(i: int, key: Path) -> tuple[QemuNode, Boot]:
                port = free_port()
                vm = QemuNode(f"net-{i}", MAC, tftp, folder / f"net-{i}", serial=f"SN-{NODE}",
                              memory_mib=MEMORY_MIB, cpus=CPUS,
                              forwards={port: 22})  # fmt: skip
                try:
                    booted = _boot_to_ssh(vm, GuestSsh(port, key, golden.default_user))
                except BaseException:
                    vm.power_off()
                    raise
                booted.marks.update(_history_marks(admin, _wall(vm)))
                print(f"  iSCSI boot {i + 1}/{RUNS + 1} ({IMAGES[i % 2]}): sshd after "
                      f"{booted.ssh:.1f} s, login {booted.login:.1f} s "
                      f"({describe(booted.marks, booted.ssh)})", flush=True)  # fmt: skip
                network.append(booted)
                return vm, booted

            # Local and network boots alternate, so that both see the same machine (other
            # work shares the two cores and comes and goes); the baseline boots with the
            # stack up and idle, as the network boots find it.
            vm: QemuNode | None = None
            key = Path()
            try:
                for i in range(RUNS + 1):
                    local.append(_local_boot(golden, folder, base, i))
                    old_key = key
                    key, config = identity(i)
                    if i == 0:
                        tenant.provision_node(NODE, image=IMAGES[0], config=config)
                        vm, _ = boot(0, key)
                        vm.power_off()  # the tenant is done with it: the plug pulled
                        continue
                    started = time.monotonic()
                    tenant.deprovision_node(NODE)
                    deprovisioned = time.monotonic()
                    tenant.provision_node(NODE, image=IMAGES[i % 2], config=config)
                    provisioned = time.monotonic()
                    vm, booted = boot(i, key)
                    total = (vm.powered_on_at or 0) + booted.ssh - started
                    port = next(iter(vm.forwards))
                    if GuestSsh(port, old_key, golden.default_user).try_run("true") is not None:
                        raise AssertionError("the previous tenant's key still logs in")
                    vm.power_off()
                    repurposes.append(
                        Repurpose(
                            total, deprovisioned - started, provisioned - deprovisioned, booted
                        )
                    )
                    print(f"  repurpose {i}/{RUNS}: {total:.1f} s (deprovision "
                          f"{deprovisioned - started:.1f} s, provision "
                          f"{provisioned - deprovisioned:.1f} s, boot {booted.ssh:.1f} s)",
                          flush=True)  # fmt: skip
            finally:
                if vm is not None:
                    vm.power_off()
            tenant.deprovision_node(NODE)
    report(results, local, network, repurposes)


def report(results: Results, local: list[Boot], network: list[Boot],
           repurposes: list[Repurpose]) -> None:  # fmt: skip
    base = median([b.ssh for b in local])
    one = median([b.ssh for b in network])
    results.add(Figure(
        "real OS", "Debian 12 power-on -> SSH, iPXE sanboot over iSCSI via BMI", one, "s",
        base, "same image, local virtio disk", "<= 1.3x", one <= 1.3 * base,
        note=f"{len(network)} boots; {describe(median_marks(network), one)}",
    ))  # fmt: skip
    results.add(Figure(
        "real OS", "Debian 12 power-on -> SSH from a local virtio disk", base, "s",
        note=f"{len(local)} boots; {describe(median_marks(local), base)}",
    ))  # fmt: skip
    total = median([r.total for r in repurposes])
    results.add(Figure(
        "real OS", "repurpose: deprovision, provision another image, power-on -> SSH", total,
        "s", one, "one boot over iSCSI", "<= 1.5x", total <= 1.5 * one,
        note=f"deprovision {median([r.deprovision for r in repurposes]):.1f} s, provision "
             f"{median([r.provision for r in repurposes]):.1f} s, boot "
             f"{median([r.boot.ssh for r in repurposes]):.1f} s ({len(repurposes)} runs)",
    ))  # fmt: skip
    results.add(Figure(
        "real OS", "repurpose, absolute", total, "s", goal="< 300 s (5 min)",
        ok=total < REPURPOSE_GOAL_SECONDS,
    ))  # fmt: skip
