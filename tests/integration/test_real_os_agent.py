"""A real operating system through BMI's node agent: iPXE boots the agent's kernel and
initramfs, the agent attaches the Debian image's clone over iSCSI and starts **the image's
own kernel and initramfs** (kexec), which log in to the target again with the settings
the agent appended and mount the root: ``uname -r`` is the image's, root is the iSCSI disk,
sshd answers, a file survives a reboot (agent again, kexec again), poweroff is clean.
"""

from __future__ import annotations

import re
import time

import pytest
from bmi.v1 import nodes_pb2
from boot_fixtures import module_client, qemu_boot_env
from server_process import ADMIN_TOKEN, TENANT_TOKENS, ServerProcess, free_port

from bmi_server.devenv import agent_image, os_image
from bmi_server.devenv.guest_ssh import GuestSsh, make_key
from bmi_server.devenv.qemu_node import QemuNode, write_chain_script

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

BOOT_TIMEOUT = 900  # agent (Python under TCG) + the image's kernel + systemd, on a busy host
POWEROFF_TIMEOUT = 120
IMAGE = "debian-12-agent"


@pytest.fixture(scope="module")
def golden():
    return os_image.build(log=print)


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    return agent_image.build(log=print)


@pytest.fixture(scope="module")
def agent_os_server(ceph_cluster, tgtd, tmp_path_factory, agent):
    process = ServerProcess(
        tmp_path_factory.mktemp("agent-os-state"), str(ceph_cluster.conf_path),
        ceph_cluster.pool, tgtd=tgtd,
        extra_env=qemu_boot_env(tgtd, BMI_AGENT_IMAGE_DIR=str(agent.directory),
                                BMI_AGENT_HEARTBEAT_SECONDS="1",
                                # Under TCG on a busy host the kexec'd kernel's IO-APIC
                                # timer check can fail (a panic); what a VM site sets.
                                BMI_OS_KERNEL_ARGS="no_timer_check"),
    )  # fmt: skip
    process.start()
    yield process
    process.stop()


admin = module_client("agent_os_server", ADMIN_TOKEN, timeout=600)
alice = module_client("agent_os_server", TENANT_TOKENS["alice"])


FACTS = r"""
echo "kernel=$(uname -r)"
echo "root=$(findmnt -n -o SOURCE /)"
disk=$(lsblk -n -o PKNAME "$(findmnt -n -o SOURCE /)")
echo "root_disk_sysfs=$(readlink -f /sys/block/$disk)"
echo "session_target=$(cat /sys/class/iscsi_session/session*/targetname)"
echo "cmdline=$(cat /proc/cmdline)"
echo "hostname=$(hostname)"
echo "system=$(systemctl is-system-running)"
echo "sshd=$(systemctl is-active ssh.service)"
echo "boot_id=$(cat /proc/sys/kernel/random/boot_id)"
"""


def facts(ssh: GuestSsh) -> dict[str, str]:
    out = ssh.run(FACTS, timeout=120, check=False)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_the_agent_starts_the_images_own_kernel_on_its_iscsi_clone(
    golden, admin, alice, agent_os_server, tgtd, tmp_path
):
    image = admin.upload_image(golden.qcow2, IMAGE, project="alice")
    mac, name = "52:54:00:a6:0d:01", "debian-agent"
    admin.enroll_node(name, "alice", macs=[mac])
    node = alice.provision_node(name, image=IMAGE, boot_mode=nodes_pb2.BOOT_MODE_AGENT)
    tftp = tmp_path / "tftp"
    write_chain_script(tftp, f"10.0.2.2:{agent_os_server.http_address.rpartition(':')[2]}")
    key = make_key(tmp_path / "ssh")
    seed = os_image.build_seed(tmp_path / "seed.img", name, [key.with_suffix(".pub").read_text()])
    port = free_port()
    ssh = GuestSsh(port, key, golden.default_user)
    vm = QemuNode(name, mac, tftp, tmp_path / "vm", serial=f"SN-{name}", memory_mib=1024,
                  cpus=2, drives=[seed], forwards={port: 22})  # fmt: skip
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    vm.power_on()
    try:

        def until_ssh(what: str, command: str = "true") -> None:
            try:
                ssh.wait(BOOT_TIMEOUT, command, alive=lambda: vm.running)
            except (TimeoutError, RuntimeError) as exc:
                tail = vm.serial_text()[-5000:]
                raise AssertionError(f"{what}: {exc}; serial:\n{tail}") from None
            timings[what] = time.monotonic() - t0

        until_ssh("first boot to ssh", "systemctl is-system-running --wait || true")
        seen = facts(ssh)
        print(f"agent path: {seen}")
        serial = vm.serial_text()
        assert "kexec into the image's kernel" in serial, serial[-3000:]
        assert seen["kernel"] == golden.kernel_version, seen  # the image's, not the agent's
        assert re.fullmatch(r"/dev/sd[a-z]+\d+", seen["root"]), seen
        assert "/session" in seen["root_disk_sysfs"], seen
        assert seen["session_target"] == node.target.iqn, seen
        assert "ISCSI_PASSWORD" not in seen["cmdline"] and "bmi.token" not in seen["cmdline"]
        assert "no_timer_check" in seen["cmdline"].split()  # os_kernel_args reached it
        assert seen["hostname"] == name and seen["sshd"] == "active", seen
        assert seen["system"] == "running", seen
        assert alice.get_node(name).state == nodes_pb2.NODE_STATE_ACTIVE

        ssh.run("echo agent-was-here | sudo tee /var/lib/bmi-persist >/dev/null && sync")
        boot_id = seen["boot_id"]
        ssh.run("sudo systemctl reboot", check=False, timeout=30)
        until_ssh("reboot to ssh", f"test \"$(cat /proc/sys/kernel/random/boot_id)\" != {boot_id}")
        assert ssh.run("cat /var/lib/bmi-persist").strip() == "agent-was-here"
        assert ssh.run("uname -r").strip() == golden.kernel_version

        ssh.run("sudo systemctl poweroff", check=False, timeout=30)
        down = time.monotonic()
        try:
            vm.wait_exit(POWEROFF_TIMEOUT)
        except TimeoutError as exc:
            raise AssertionError(f"poweroff hung: {exc}") from None
        timings["poweroff"] = time.monotonic() - down
        print("agent path: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    finally:
        vm.power_off()
    alice.deprovision_node(name)
    admin.delete_image(image.id)
