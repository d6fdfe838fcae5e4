"""The Debian image builder's pure parts (the build itself runs in
tests/integration/test_real_os_boot.py), cloud-init seeds, and QEMU nodes' command lines."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess

import pytest

from bmi_server.devenv import os_image
from bmi_server.devenv.guest_ssh import GuestSsh
from bmi_server.devenv.qemu_node import OVMF_CODE, QemuNode

SECTOR = 512


def test_bios_grub_is_set_up_as_grub_bios_setup_would(tmp_path):
    disk = tmp_path / "disk.raw"
    mbr_tail = bytes(range(72))  # disk signature, partition table, 0x55AA: must survive
    disk.write_bytes(b"\xee" * 440 + mbr_tail + bytes(4 * 1024 * SECTOR))
    boot_img = bytes([0xB0]) * SECTOR
    core_img = b"\xc0" * (3 * SECTOR + 17)  # 4 sectors once padded
    os_image.install_bios_grub(disk, boot_img, core_img, core_lba=2048, max_sectors=2048)

    data = disk.read_bytes()
    assert data[440:512] == mbr_tail
    assert struct.unpack_from("<Q", data, 0x5C)[0] == 2048  # boot.img -> core.img's sector
    assert data[:0x5C] == boot_img[:0x5C] and data[0x64:440] == boot_img[0x64:440]
    core = data[2048 * SECTOR : 2052 * SECTOR]
    # diskboot's blocklist: the rest of core.img, from the next sector, 3 sectors long.
    assert struct.unpack_from("<QH", core, 0x1F4) == (2049, 3)
    assert core[0x1FE:] == core_img[0x1FE:] + bytes(SECTOR - 17)


def test_bios_grub_refuses_a_core_image_larger_than_its_partition(tmp_path):
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(64 * SECTOR))
    with pytest.raises(os_image.BuildError, match="BIOS-boot partition"):
        os_image.install_bios_grub(disk, bytes(SECTOR), bytes(9 * SECTOR), 8, max_sectors=8)


def test_cache_key_follows_package_versions_and_ids_follow_the_key():
    versions = {"linux-image-amd64": "6.1.1", "cloud-init": "22.4.2-1"}
    key = os_image.cache_key(versions)
    assert key == os_image.cache_key(dict(reversed(versions.items())))
    assert key != os_image.cache_key({**versions, "cloud-init": "22.4.2-2"})
    root_uuid, esp_id = os_image._ids(key)
    assert (root_uuid, esp_id) == os_image._ids(key)  # same inputs, same disk identity
    assert os_image._ids(os_image.cache_key({})) != (root_uuid, esp_id)
    assert len(esp_id) == 8 and int(esp_id, 16) >= 0


def test_golden_image_files_leave_per_machine_identity_out():
    overlay = os_image.FILES
    assert overlay["etc/iscsi/iscsi.initramfs"].count("ISCSI_AUTO=true") == 1
    assert "datasource_list: [NoCloud, ConfigDrive, None]" in overlay[
        "etc/cloud/cloud.cfg.d/90-bmi.cfg"
    ]
    customize = os_image.CUSTOMIZE
    assert "rm -f \"$root\"/etc/ssh/ssh_host_*" in customize
    assert ': > "$root"/etc/machine-id' in customize
    assert "GenerateName=yes" in customize and "update-initramfs -u" in customize
    grub = overlay["boot/grub/grub.cfg"].format(root_uuid="U", esp_id="E", kernel_args="K")
    assert "console" in os_image.KERNEL_ARGS and "ttyS0" in os_image.KERNEL_ARGS
    assert "linux /vmlinuz root=UUID=U K" in grub and "initrd /initrd.img" in grub


def test_seed_files_carry_hostname_keys_and_extra_user_data():
    files = os_image.seed_files(
        "node-7", ["ssh-ed25519 AAAA test"], user_data={"packages": ["htop"]},
        network_config="version: 2\n",
    )  # fmt: skip
    assert json.loads(files["meta-data"]) == {"instance-id": "iid-node-7",
                                              "local-hostname": "node-7"}  # fmt: skip
    assert files["user-data"].startswith("#cloud-config\n")
    config = json.loads(files["user-data"].split("\n", 1)[1])
    assert config == {"hostname": "node-7", "ssh_authorized_keys": ["ssh-ed25519 AAAA test"],
                      "packages": ["htop"]}  # fmt: skip
    assert files["network-config"] == "version: 2\n"
    script = os_image.seed_files("n", user_data="#!/bin/sh\necho hi\n", instance_id="i-2")
    assert script["user-data"] == "#!/bin/sh\necho hi\n"
    assert json.loads(script["meta-data"])["instance-id"] == "i-2"
    with pytest.raises(ValueError, match="host name"):
        os_image.seed_files("bad name; rm -rf /")


@pytest.mark.skipif(not (shutil.which("mkfs.vfat") and shutil.which("mtype")),
                    reason="needs dosfstools and mtools (make setup)")  # fmt: skip
def test_seed_is_a_cidata_vfat_with_the_files(tmp_path):
    seed = os_image.build_seed(tmp_path / "seed.img", "node-1", ["ssh-ed25519 AAAA k"])
    env = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
    label = subprocess.run(["mlabel", "-s", "-i", str(seed), "::"], capture_output=True,
                           text=True, env=env, check=True).stdout  # fmt: skip
    assert "cidata" in label
    meta = subprocess.run(["mtype", "-i", str(seed), "::/meta-data"], capture_output=True,
                          text=True, env=env, check=True).stdout  # fmt: skip
    assert json.loads(meta)["local-hostname"] == "node-1"


def test_qemu_node_under_uefi_with_seed_and_ssh_forward(tmp_path):
    seed = tmp_path / "seed.img"
    node = QemuNode("n", "52:54:00:00:00:01", tmp_path / "tftp", tmp_path / "w", firmware="uefi",
                    drives=[seed], forwards={2222: 22}, cpus=2)  # fmt: skip
    cmd = " ".join(node.command())
    assert f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}" in cmd
    assert f"if=pflash,format=raw,file={tmp_path / 'w' / 'OVMF_VARS.fd'}" in cmd
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in cmd
    assert "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01,bootindex=0" in cmd
    assert f"file={seed},format=raw,if=virtio,readonly=on" in cmd and "-smp 2" in cmd
    bios = " ".join(QemuNode("b", "52:54:00:00:00:02", tmp_path, tmp_path).command())
    assert "pflash" not in bios and "hostfwd" not in bios and "bootindex" not in bios
    with pytest.raises(ValueError, match="firmware"):
        QemuNode("x", "52:54:00:00:00:03", tmp_path, tmp_path, firmware="coreboot")


def test_qemu_node_with_a_local_disk_boots_it_first(tmp_path):
    qcow2, raw = tmp_path / "disk.qcow2", tmp_path / "disk.raw"
    qcow2.write_bytes(b"QFI\xfb" + bytes(60))
    raw.write_bytes(bytes(512))
    for disk, fmt in ((qcow2, "qcow2"), (raw, "raw")):
        cmd = QemuNode("l", "52:54:00:00:00:04", tmp_path, tmp_path, boot="c",
                       local_disk=disk).command()  # fmt: skip
        assert f"file={disk},format={fmt},if=none,id=local0" in cmd
        assert "virtio-blk-pci,drive=local0,bootindex=0" in cmd


def test_guest_ssh_command_line_is_what_a_person_types(tmp_path):
    ssh = GuestSsh(2222, tmp_path / "key", "debian")
    line = ssh.command_line()
    assert line.startswith("ssh ") and line.endswith(" -p 2222 debian@127.0.0.1")
    assert f"-i {tmp_path / 'key'}" in line and "StrictHostKeyChecking=no" in line
