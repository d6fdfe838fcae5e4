"""A real operating system through BMI: Debian 12 (the golden image built by
bmi_server/devenv/os_image.py, cached) imported as a qcow2 with the ``bmi`` CLI, cloned for
a node and booted by iPXE ``sanboot`` from tgtd, on BIOS (SeaBIOS) and on UEFI (OVMF).

In each boot: the image's GRUB, kernel and initramfs (which logs in to the iSCSI target
from the iBFT iPXE published) reach systemd's multi-user.target; root is the iSCSI disk;
sshd answers with the key from a cloud-init seed; a file written survives a reboot (which
goes through iPXE and BMI again); ``poweroff`` ends QEMU within a bound, so the root's
iSCSI session does not hang the shutdown.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from bmi.v1 import nodes_pb2
from boot_fixtures import module_client, qemu_boot_env
from server_process import ADMIN_TOKEN, TENANT_TOKENS, ServerProcess, free_port

from bmi_server.devenv import os_image
from bmi_server.devenv.guest_ssh import GuestSsh, make_key
from bmi_server.devenv.qemu_node import QemuNode, write_chain_script

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

BOOT_TIMEOUT = 600  # power-on to ssh: ~85 s alone under TCG; much more on a busy machine
POWEROFF_TIMEOUT = 120
MEMORY_MIB = 1024
CPUS = 2
IMAGE = "debian-12"


@pytest.fixture(scope="module")
def golden():
    """The Debian image (built once; reused while its inputs are unchanged)."""
    return os_image.build(log=print)


@pytest.fixture(scope="module")
def os_server(ceph_cluster, tgtd, tmp_path_factory):
    process = ServerProcess(
        tmp_path_factory.mktemp("realos-state"), str(ceph_cluster.conf_path), ceph_cluster.pool,
        tgtd=tgtd, extra_env=qemu_boot_env(tgtd),
    )  # fmt: skip
    process.start()
    yield process
    process.stop()


admin = module_client("os_server", ADMIN_TOKEN, timeout=300)
alice = module_client("os_server", TENANT_TOKENS["alice"])


@pytest.fixture(scope="module")
def imported(golden, os_server, admin, tmp_path_factory):
    """The qcow2 imported as it is, the way an operator would: ``bmi image import``."""
    home = tmp_path_factory.mktemp("cli-home")
    env = {"BMI_SERVER": os_server.address, "BMI_TOKEN": ADMIN_TOKEN,
           "PATH": os.environ["PATH"], "HOME": str(home)}  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(
        [str(Path(sys.executable).parent / "bmi"), "image", "import", IMAGE, "--file",
         str(golden.qcow2), "--project", "ops", "--public"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    print(f"bmi image import of {golden.qcow2.stat().st_size >> 20} MiB qcow2: "
          f"{time.monotonic() - started:.1f} s")  # fmt: skip
    image = next(i for i in admin.list_images() if i.name == IMAGE)
    yield image
    admin.delete_image(image.id)


@pytest.fixture(scope="module")
def tftp(os_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tftp")
    write_chain_script(folder, f"10.0.2.2:{os_server.http_address.rpartition(':')[2]}")
    return folder


def boot_script(server: ServerProcess, mac: str) -> dict[str, str]:
    """What BMI tells the node (initiator IQN and CHAP user), read as the node would."""
    with urllib.request.urlopen(f"http://{server.http_address}/boot.ipxe?mac={mac}") as reply:
        script = reply.read().decode()
    return dict(re.findall(r"^set (initiator-iqn|username) (\S+)$", script, re.M))


# One command, one line each, so a failure shows everything at once.
FACTS = r"""
echo "root=$(findmnt -n -o SOURCE /)"
disk=$(lsblk -n -o PKNAME "$(findmnt -n -o SOURCE /)")
echo "root_disk_sysfs=$(readlink -f /sys/block/$disk)"
echo "session_target=$(cat /sys/class/iscsi_session/session*/targetname)"
echo "session_initiator=$(cat /sys/class/iscsi_session/session*/initiatorname)"
echo "ibft=$(ls /sys/firmware/ibft | tr '\n' ' ')"
echo "ibft_initiator=$(sudo cat /sys/firmware/ibft/initiator/initiator-name)"
echo "ibft_target=$(sudo cat /sys/firmware/ibft/target0/target-name)"
echo "ibft_chap=$(sudo cat /sys/firmware/ibft/target0/chap-name)"
echo "ibft_lun=$(sudo cat /sys/firmware/ibft/target0/lun)"
echo "iscsiadm=$(sudo iscsiadm -m session 2>&1 | tr '\n' ' ')"
echo "initiatorname_file=$(sudo sed -n 's/^InitiatorName=//p' /etc/iscsi/initiatorname.iscsi)"
echo "hostname=$(hostname)"
echo "machine_id=$(cat /etc/machine-id)"
echo "efi=$(test -d /sys/firmware/efi && echo yes || echo no)"
echo "multi_user=$(systemctl is-active multi-user.target)"
echo "system=$(systemctl is-system-running)"
echo "failed_units=$(systemctl list-units --failed --plain --no-legend | tr '\n' ' ')"
echo "sshd=$(systemctl is-active ssh.service)"
echo "cloud_init=$(cloud-init status | tr '\n' ' ')"
echo "boot_id=$(cat /proc/sys/kernel/random/boot_id)"
"""


def facts(ssh: GuestSsh) -> dict[str, str]:
    out = ssh.run(FACTS, timeout=120, check=False)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture
def started_vms():
    vms: list[QemuNode] = []
    yield vms
    for vm in vms:
        vm.power_off()


@pytest.fixture
def provision(admin, alice):
    """provision(name, mac) -> the node, enrolled in alice's project and provisioned with
    the image; deprovisioned afterwards even if the test failed (the image can go then)."""
    names: list[str] = []

    def make(name: str, mac: str):
        admin.enroll_node(name, "alice", macs=[mac])
        names.append(name)
        return alice.provision_node(name, image=IMAGE)

    yield make
    for name in names:
        if alice.get_node(name).disk_id:
            alice.deprovision_node(name)


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_debian_boots_from_its_iscsi_clone(
    firmware, alice, imported, golden, os_server, tftp, tgtd, tmp_path, started_vms, provision
):
    mac = {"bios": "52:54:00:d0:00:01", "uefi": "52:54:00:d0:00:02"}[firmware]
    name = f"debian-{firmware}"
    timings: dict[str, float] = {}
    node = provision(name, mac)
    told = boot_script(os_server, mac)

    key = make_key(tmp_path / "ssh")
    seed = os_image.build_seed(tmp_path / "seed.img", name, [key.with_suffix(".pub").read_text()])
    port = free_port()
    ssh = GuestSsh(port, key, golden.default_user)
    vm = QemuNode(name, mac, tftp, tmp_path / "vm", serial=f"SN-{name}", memory_mib=MEMORY_MIB,
                  cpus=CPUS, firmware=firmware, drives=[seed], forwards={port: 22})  # fmt: skip
    started_vms.append(vm)
    t0 = time.monotonic()
    vm.power_on()

    def until_ssh(what: str, command: str = "true") -> str:
        try:
            out = ssh.wait(BOOT_TIMEOUT, command, alive=lambda: vm.running)
        except (TimeoutError, RuntimeError) as exc:
            raise AssertionError(f"{what}: {exc}; serial:\n{vm.serial_text()[-4000:]}") from None
        timings[what] = time.monotonic() - t0
        return out

    # Boot 1: iPXE sanboot -> GRUB -> kernel -> initramfs (iBFT login) -> systemd -> sshd.
    until_ssh("first boot to ssh", "systemctl is-system-running --wait || true")
    seen = facts(ssh)
    print(f"{firmware}: {seen}")
    assert re.fullmatch(r"/dev/sd[a-z]+\d+", seen["root"]), seen
    assert "/session" in seen["root_disk_sysfs"], seen  # the disk hangs off an iSCSI session
    assert seen["session_target"] == node.target.iqn, seen
    # The kernel prints the iBFT's 8-byte SAM LUN a byte at a time (%x): LUN 1 is 00 01 00 ...
    assert seen["ibft_target"] == node.target.iqn and seen["ibft_lun"] == "01000000", seen
    assert seen["ibft_initiator"] == told["initiator-iqn"] == seen["session_initiator"], seen
    assert seen["ibft_chap"] == told["username"] == f"bmi-{node.disk_id}", seen
    assert node.target.iqn in seen["iscsiadm"], seen
    assert seen["initiatorname_file"] == told["initiator-iqn"], seen
    assert seen["efi"] == ("yes" if firmware == "uefi" else "no"), seen
    assert seen["hostname"] == name, seen
    assert re.fullmatch(r"[0-9a-f]{32}", seen["machine_id"]), seen
    assert seen["multi_user"] == "active" and seen["sshd"] == "active", seen
    assert seen["system"] == "running", seen  # no failed unit
    assert "done" in seen["cloud_init"], seen
    assert alice.get_node(name).state == nodes_pb2.NODE_STATE_ACTIVE

    # Written, synced, rebooted (through the firmware, iPXE and BMI again): still there.
    ssh.run("echo bmi-was-here | sudo tee /var/lib/bmi-persist >/dev/null && sync")
    boot_id = seen["boot_id"]
    ssh.run("sudo systemctl reboot", check=False, timeout=30)
    until_ssh("reboot to ssh", f"test \"$(cat /proc/sys/kernel/random/boot_id)\" != {boot_id}")
    assert ssh.run("cat /var/lib/bmi-persist").strip() == "bmi-was-here"
    assert facts(ssh)["session_target"] == node.target.iqn

    # A clean poweroff: QEMU exits, the root's iSCSI session did not hang it.
    ssh.run("sudo systemctl poweroff", check=False, timeout=30)
    down = time.monotonic()
    try:
        vm.wait_exit(POWEROFF_TIMEOUT)
    except TimeoutError as exc:
        raise AssertionError(f"poweroff hung: {exc}") from None
    timings["poweroff"] = time.monotonic() - down
    print(f"{firmware}: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))

    alice.deprovision_node(name)
    assert node.target.iqn not in tgtd.tgtadm("--op", "show", "--mode", "target").stdout


# What makes a node itself, as its OS sees it (one line each).
IDENTITY = r"""
echo "hostname=$(hostname)"
echo "machine_id=$(cat /etc/machine-id)"
echo "host_key=$(ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub | cut -d' ' -f2)"
echo "instance_id=$(cat /var/lib/cloud/data/instance-id)"
echo "datasource=$(cat /var/lib/cloud/instance/datasource)"
echo "runcmd=$(cat /var/lib/bmi-runcmd 2>/dev/null)"
root_disk=$(lsblk -n -o PKNAME "$(findmnt -n -o SOURCE /)")
echo "root_hctl=$(lsblk -d -n -o HCTL "/dev/$root_disk" | tr -d ' ')"
echo "drive=$(lsblk -d -n -o HCTL,LABEL,FSTYPE | awk '$2 == "cidata" {print $1, $3}')"
echo "cloud_init=$(cloud-init status | tr '\n' ' ')"
"""
USER_DATA = """#cloud-config
runcmd:
  - [sh, -c, "echo ran-on-$(hostname) > /var/lib/bmi-runcmd"]
"""


def test_nodes_of_one_image_get_their_own_identity_from_their_config_drive(
    admin, alice, imported, golden, os_server, tftp, tmp_path
):
    """Two nodes boot the same golden image with nothing of theirs in it: each comes up
    with the host name, SSH key and user-data it was provisioned with (cloud-init, as the
    image ships it, finds LUN 2 of its target by its label), and its own machine id and
    SSH host keys; after a reprovision, a new instance id and new host keys."""
    from bmi_client.client import node_config

    macs = {"ident-a": "52:54:00:d1:00:01", "ident-b": "52:54:00:d1:00:02"}
    keys = {name: make_key(tmp_path / f"ssh-{name}") for name in macs}
    nodes = {}
    for name, mac in macs.items():
        admin.enroll_node(name, "alice", macs=[mac])
        nodes[name] = alice.provision_node(name, image=IMAGE, config=node_config(
            hostname=f"{name}.example.org", user_data=USER_DATA,
            ssh_authorized_keys=[keys[name].with_suffix(".pub").read_text().strip()]))

    def boot(name: str, tag: str) -> dict[str, str]:
        """Power on, log in with the key given at provisioning, read the facts, power off."""
        port = free_port()
        ssh = GuestSsh(port, keys[name], golden.default_user)
        vm = QemuNode(f"{name}-{tag}", macs[name], tftp, tmp_path / f"vm-{name}-{tag}",
                      serial=f"SN-{name}", memory_mib=MEMORY_MIB, cpus=CPUS,
                      forwards={port: 22})  # fmt: skip
        started = time.monotonic()
        vm.power_on()
        try:
            try:
                ssh.wait(BOOT_TIMEOUT, "cloud-init status --wait >/dev/null || true",
                         alive=lambda: vm.running)  # fmt: skip
            except (TimeoutError, RuntimeError) as exc:
                raise AssertionError(f"{name}: {exc}; serial:\n{vm.serial_text()[-4000:]}") \
                    from None
            out = ssh.run(IDENTITY, timeout=120, check=False)
            seen = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
            print(f"{name} ({tag}, ssh after {time.monotonic() - started:.0f} s): {seen}")
            ssh.run("sudo systemctl poweroff", check=False, timeout=30)
            vm.wait_exit(POWEROFF_TIMEOUT)
        finally:
            vm.power_off()
        return seen

    try:
        first = {name: boot(name, "first") for name in macs}
        for name, seen in first.items():
            node = nodes[name]
            assert seen["hostname"] == name, seen  # the short name of local-hostname
            assert seen["instance_id"] == node.identity.instance_id, seen
            assert "NoCloud" in seen["datasource"], seen
            assert seen["runcmd"] == f"ran-on-{name}", seen  # user-data ran
            # The drive is LUN 2 of the target whose LUN 1 is the root, one session.
            host_chan_target = seen["root_hctl"].rsplit(":", 1)[0]
            assert seen["root_hctl"] == f"{host_chan_target}:1", seen
            assert seen["drive"] == f"{host_chan_target}:2 vfat", seen
            assert "done" in seen["cloud_init"], seen
        a, b = first["ident-a"], first["ident-b"]
        assert a["machine_id"] != b["machine_id"] and a["host_key"] != b["host_key"]
        assert re.fullmatch(r"[0-9a-f]{32}", a["machine_id"]), a

        again = alice.reprovision_node("ident-a")  # the same config, a new instance
        assert again.identity.instance_id != nodes["ident-a"].identity.instance_id
        second = boot("ident-a", "reprovisioned")
        assert second["instance_id"] == again.identity.instance_id, second
        assert second["hostname"] == "ident-a" and second["runcmd"] == "ran-on-ident-a"
        assert second["host_key"] not in (a["host_key"], b["host_key"]), second
        assert second["machine_id"] not in (a["machine_id"], b["machine_id"]), second
    finally:
        for name in macs:
            if alice.get_node(name).disk_id:
                alice.deprovision_node(name)
