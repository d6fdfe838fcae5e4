"""Builds a Debian 12 golden image that boots through BMI by ``sanboot`` on BIOS and UEFI.

    python -m bmi_server.devenv.os_image [--out DIR] [--force]     (make os-image)

Everything comes from Debian's packages (``mmdebstrap``, with its default Debian mirrors
for the suite: the release, its updates and security); no loop device, no mount:

1. ``mmdebstrap --variant=apt`` makes a root tree with Debian's own kernel
   (``linux-image-amd64``), systemd, openssh-server, cloud-init, open-iscsi and
   initramfs-tools. Fetched .debs are kept in ``<out>/debs`` for the next build.
2. A customize step (``CUSTOMIZE``, run by mmdebstrap inside the tree) makes it a golden
   image: the initramfs logs in to the root disk from the iBFT that iPXE publishes
   (``/etc/iscsi/iscsi.initramfs``: ``ISCSI_AUTO=true``, then ``update-initramfs``);
   ``/etc/machine-id`` is empty and no SSH host key is baked in (cloud-init makes them at
   first boot; ``bmi-ssh-host-keys.service`` runs ``ssh-keygen -A`` before sshd in case it
   did not); the iSCSI initiator name is the iBFT's (``bmi-iscsi-initiator-name.service``)
   or generated per machine; cloud-init looks for NoCloud, ConfigDrive, then nothing;
   GRUB and the kernel print to the serial console (``console=ttyS0``).
3. The disk is assembled in a sparse file: a GPT (``sfdisk``) with a BIOS-boot partition,
   an EFI system partition and the root; the root ext4 is written from the tree
   (``mkfs.ext4 -d -E offset=``), the ESP with ``mkfs.vfat --offset`` + mtools holding
   ``EFI/BOOT/BOOTX64.EFI`` (``grub-mkimage -O x86_64-efi``); for BIOS, GRUB's
   ``boot.img`` goes into the MBR's code area and ``core.img`` (``grub-mkimage -O
   i386-pc``) into the BIOS-boot partition, with the sectors ``grub-bios-setup`` would
   patch set here (it cannot set up an image file). Both GRUBs find the root by file
   system UUID and read its ``/boot/grub/grub.cfg``, which boots ``/vmlinuz`` and
   ``/initrd.img`` (Debian's symlinks: kernel updates need no GRUB change).
4. ``qemu-img convert -c -O qcow2``: a plain compressed qcow2 that ``bmi image import
   NAME --file`` takes as it is.

A build is skipped when its key -- the candidate versions of the packages (the kernel's
ABI package included), the layout, and this builder's source -- is unchanged. The kernel
and initramfs are also copied next to the image (``vmlinuz``, ``initrd.img``), for boots
that start the image's own kernel without its GRUB.

Cloud-init seeds for such images (NoCloud, a ``cidata`` vfat file) come from
:func:`build_seed`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "build" / "os-image"
SUITE = "bookworm"
IMAGE_NAME = "debian-12"

KERNEL_META = "linux-image-amd64"
KERNEL_PATTERN = re.compile(r"linux-image-6\.1\.0-\d+-amd64")
PACKAGES = (
    KERNEL_META, "systemd-sysv", "udev", "dbus", "kmod", "iproute2", "ifupdown",
    "isc-dhcp-client", "netbase", "openssh-server", "cloud-init", "open-iscsi",
    "initramfs-tools", "busybox", "e2fsprogs", "dosfstools", "sudo", "procps", "less",
    "grub-pc-bin", "grub-efi-amd64-bin",
)  # fmt: skip
# Left out of the tree by dpkg (also for packages installed later): docs, man pages and
# translations are a tenth of it.
DPKG_EXCLUDES = (
    "/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*",
    "/usr/share/lintian/*",
)  # fmt: skip
DPKG_INCLUDES = ("/usr/share/doc/*/copyright", "/usr/share/locale/locale.alias")

SECTOR = 512
MIB = 1 << 20
# GPT layout, in 512-byte sectors: BIOS-boot (core.img), ESP, root (the rest).
BIOS_BOOT_START, BIOS_BOOT_SECTORS = 2048, 2048
ESP_START, ESP_SECTORS = 4096, 64 * MIB // SECTOR
ROOT_START = ESP_START + ESP_SECTORS
BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
# boot.img: where it reads core.img's first sector from (GRUB_BOOT_MACHINE_KERNEL_SECTOR);
# core.img's first sector (diskboot.img) ends with a blocklist: start sector (8 bytes) and
# sector count (2 bytes) of the rest of core.img.
BOOT_IMG_CODE_BYTES = 440
BOOT_IMG_KERNEL_SECTOR = 0x5C
DISKBOOT_BLOCKLIST_START = 0x1F4
DISKBOOT_BLOCKLIST_LEN = 0x1FC

GRUB_BIOS_MODULES = (
    "biosdisk", "part_gpt", "ext2", "search", "search_fs_uuid", "normal", "configfile",
    "linux", "echo", "serial", "terminal", "test", "gzio",
)  # fmt: skip
GRUB_EFI_MODULES = (
    "part_gpt", "ext2", "fat", "search", "search_fs_uuid", "normal", "configfile", "linux",
    "echo", "serial", "terminal", "test", "gzio", "efi_gop",
)  # fmt: skip
KERNEL_ARGS = "ro console=tty0 console=ttyS0,115200n8"
DEFAULT_USER = "debian"  # Debian's cloud-init default user

# Run by mmdebstrap (as "$1" = the tree) after the files of FILES are synced in.
CUSTOMIZE = r"""#!/bin/sh
set -eu
root="$1"
# Per machine, never in a golden image: host keys, machine id, initiator name.
rm -f "$root"/etc/ssh/ssh_host_*
: > "$root"/etc/machine-id
rm -f "$root"/var/lib/dbus/machine-id
ln -s /etc/machine-id "$root"/var/lib/dbus/machine-id
printf 'GenerateName=yes\n' > "$root"/etc/iscsi/initiatorname.iscsi
# mmdebstrap copied these from the build host.
printf '%s\n' debian > "$root"/etc/hostname
: > "$root"/etc/resolv.conf
chroot "$root" systemctl enable bmi-ssh-host-keys.service bmi-iscsi-initiator-name.service
# GRUB modules and lists where both GRUBs' prefix (/boot/grub) points, as grub-install does.
for platform in i386-pc x86_64-efi; do
  mkdir -p "$root/boot/grub/$platform"
  cp "$root/usr/lib/grub/$platform"/*.mod "$root/usr/lib/grub/$platform"/*.lst \
     "$root/boot/grub/$platform/"
done
chroot "$root" update-initramfs -u -k all
"""

# Written into the tree before CUSTOMIZE; {root_uuid}, {esp_id}, {kernel_args} filled in.
FILES = {
    "etc/iscsi/iscsi.initramfs": """\
# The initramfs logs in to the root disk with what the firmware's iBFT says (iPXE's
# sanboot publishes one: portal, target, LUN, initiator name, CHAP).
ISCSI_AUTO=true
""",
    "etc/fstab": """\
UUID={root_uuid} / ext4 errors=remount-ro 0 1
UUID={esp_id} /boot/efi vfat umask=0077,nofail 0 2
""",
    "etc/hosts": "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
    "boot/grub/grub.cfg": """\
# BMI's golden image: one entry, serial console and screen.
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=1
set default=0
search --no-floppy --fs-uuid --set=root {root_uuid}
menuentry 'Debian GNU/Linux 12' {{
    linux /vmlinuz root=UUID={root_uuid} {kernel_args}
    initrd /initrd.img
}}
""",
    "etc/cloud/cloud.cfg.d/90-bmi.cfg": """\
# Seeds: a cidata/CIDATA file system or a kernel/SMBIOS ds=nocloud (NoCloud), a config-2
# file system (ConfigDrive); without either, cloud-init runs with defaults (None).
datasource_list: [NoCloud, ConfigDrive, None]
# New SSH host keys for every new instance (the image has none).
ssh_deletekeys: true
ssh_genkeytypes: [rsa, ecdsa, ed25519]
# /etc/hosts names this machine (sudo looks its own name up).
manage_etc_hosts: true
# The image has no locales package: keep the locale it has.
locale: C.UTF-8
# GRUB was set up by the image builder, not by grub-pc's debconf.
grub_dpkg:
  enabled: false
""",
    "etc/systemd/system/bmi-ssh-host-keys.service": """\
[Unit]
Description=SSH host keys for this machine, if cloud-init made none
After=cloud-init.service
Before=ssh.service
ConditionPathExists=/usr/bin/ssh-keygen

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=ssh.service
""",
    "etc/systemd/system/bmi-iscsi-initiator-name.service": """\
[Unit]
Description=iSCSI initiator name from the firmware's iBFT
DefaultDependencies=no
After=local-fs.target
Before=iscsid.service open-iscsi.service
ConditionPathExists=/sys/firmware/ibft/initiator/initiator-name

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'name=$$(cat /sys/firmware/ibft/initiator/initiator-name) && \\
    echo "InitiatorName=$$name" > /etc/iscsi/initiatorname.iscsi'

[Install]
WantedBy=sysinit.target
""",
}


class BuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class OsImage:
    """A built golden image and what is known about it."""

    qcow2: Path
    kernel: Path  # the image's own kernel and initramfs, copied out of it
    initrd: Path
    manifest: dict
    cached: bool  # True when the previous build was reused

    @property
    def kernel_version(self) -> str:
        return self.manifest["kernel"]

    @property
    def root_uuid(self) -> str:
        return self.manifest["root_uuid"]

    @property
    def kernel_args(self) -> str:
        """The kernel command line its GRUB uses."""
        return f"root=UUID={self.root_uuid} {KERNEL_ARGS}"

    @property
    def default_user(self) -> str:
        return DEFAULT_USER


def _run(argv: Sequence[str], **kwargs) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise BuildError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


# -- inputs and cache key -------------------------------------------------------------------


def resolve_packages() -> dict[str, str]:
    """Package -> candidate version (apt's lists on this machine), the kernel's ABI package
    (the one linux-image-amd64 depends on) included."""
    depends = _run(["apt-cache", "depends", KERNEL_META])
    kernels = KERNEL_PATTERN.findall(depends)
    if not kernels:
        raise BuildError(f"{KERNEL_META} depends on no linux-image-6.1.0-*-amd64:\n{depends}")
    versions = {}
    for package in (*PACKAGES, kernels[0]):
        policy = _run(["apt-cache", "policy", package])
        match = re.search(r"Candidate:\s*(\S+)", policy)
        if not match or match.group(1) == "(none)":
            raise BuildError(f"no candidate version of {package} (apt-get update?)")
        versions[package] = match.group(1)
    return versions


def _apt_lists_newer_than(path: Path) -> bool:
    lists = list(Path("/var/lib/apt/lists").glob("*_Packages*"))
    return not lists or max(p.stat().st_mtime for p in lists) > path.stat().st_mtime


def cache_key(versions: dict[str, str]) -> str:
    inputs = {
        "suite": SUITE,
        "packages": versions,
        "builder": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def _ids(key: str) -> tuple[str, str]:
    """Root file system UUID and ESP volume id, stable for one key (same inputs, same ids)."""
    root_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"bmi-os-image:{key}:root"))
    esp_id = hashlib.sha256(f"bmi-os-image:{key}:esp".encode()).hexdigest()[:8].upper()
    return root_uuid, esp_id


# -- the tree ---------------------------------------------------------------------------------


def _mmdebstrap(tree: Path, overlay: Path, debs: Path, work: Path, log_path: Path, log) -> None:
    debs.mkdir(parents=True, exist_ok=True)
    hook = work / "customize.sh"
    hook.write_text(CUSTOMIZE)
    hook.chmod(0o755)
    mode = "root" if os.geteuid() == 0 else "unshare"
    argv = [
        "mmdebstrap", f"--mode={mode}", "--variant=apt", "--format=directory",
        f"--include={','.join(PACKAGES)}",
        "--aptopt=Acquire::Retries \"3\"",
        *(f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES),
        *(f"--dpkgopt=path-include={p}" for p in DPKG_INCLUDES),
        # Keep every fetched .deb (essential ones too) for the next build.
        "--skip=essential/unlink",
        "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/",
        f"--setup-hook=sync-in {debs} /var/cache/apt/archives/",
        f"--customize-hook=sync-out /var/cache/apt/archives {debs}",
        f"--customize-hook=sync-in {overlay} /",
        f"--customize-hook={hook}",
        SUITE, str(tree),
    ]  # fmt: skip
    log(f"mmdebstrap {SUITE} ({len(PACKAGES)} packages and their dependencies) ...")
    env = {**os.environ, "TMPDIR": str(work)}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    log_path.write_text(done.stderr)
    if done.returncode != 0:
        raise BuildError(f"mmdebstrap failed ({done.returncode}):\n{done.stderr[-4000:]}")


def _write_overlay(overlay: Path, root_uuid: str, esp_id: str) -> None:
    esp_fs_id = f"{esp_id[:4]}-{esp_id[4:]}"
    for rel, text in FILES.items():
        path = overlay / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.format(root_uuid=root_uuid, esp_id=esp_fs_id, kernel_args=KERNEL_ARGS))
    (overlay / "boot" / "efi").mkdir(parents=True, exist_ok=True)


def _installed(tree: Path) -> dict[str, str]:
    out = _run(
        ["dpkg-query", f"--admindir={tree}/var/lib/dpkg", "-W", "-f=${Package} ${Version}\n"]
    )
    return dict(line.split(" ", 1) for line in out.splitlines() if line)


def _kernel_version(tree: Path) -> str:
    found = sorted(p.name.removeprefix("vmlinuz-") for p in (tree / "boot").glob("vmlinuz-*"))
    if len(found) != 1:
        raise BuildError(f"expected one kernel in /boot, found {found}")
    return found[0]


# -- the disk ---------------------------------------------------------------------------------


def _tree_bytes(tree: Path) -> int:
    return int(_run(["du", "-s", "--block-size=1", "-x", str(tree)]).split()[0])


def _grub_images(tree: Path, work: Path, root_uuid: str) -> tuple[Path, Path, bytes]:
    """(core.img, BOOTX64.EFI, boot.img) built from the tree's own GRUB modules."""
    early = work / "early.cfg"
    early.write_text(
        f"search --no-floppy --fs-uuid --set=root {root_uuid}\nset prefix=($root)/boot/grub\n"
    )
    core, efi = work / "core.img", work / "BOOTX64.EFI"
    grub = tree / "usr" / "lib" / "grub"
    _run(["grub-mkimage", "-O", "i386-pc", "-d", str(grub / "i386-pc"), "-c", str(early),
          "-p", "/boot/grub", "-o", str(core), *GRUB_BIOS_MODULES])  # fmt: skip
    _run(["grub-mkimage", "-O", "x86_64-efi", "-d", str(grub / "x86_64-efi"), "-c", str(early),
          "-p", "/boot/grub", "-o", str(efi), *GRUB_EFI_MODULES])  # fmt: skip
    return core, efi, (grub / "i386-pc" / "boot.img").read_bytes()


def install_bios_grub(disk: Path, boot_img: bytes, core_img: bytes, core_lba: int,
                      max_sectors: int) -> None:  # fmt: skip
    """What ``grub-bios-setup`` does for a GPT disk with a BIOS-boot partition at
    ``core_lba``: boot.img's code into the MBR (its partition table and signature kept),
    pointed at core.img's first sector; core.img into the partition, its first sector's
    blocklist pointed at the rest of it."""
    if len(boot_img) != SECTOR:
        raise BuildError(f"boot.img is {len(boot_img)} bytes, not {SECTOR}")
    sectors = -(-len(core_img) // SECTOR)
    if sectors > max_sectors:
        raise BuildError(f"core.img needs {sectors} sectors; the BIOS-boot partition has "
                         f"{max_sectors}")  # fmt: skip
    if sectors - 1 > 0xFFFF:
        raise BuildError("core.img too large for one blocklist entry")
    code = bytearray(boot_img[:BOOT_IMG_CODE_BYTES])
    code[BOOT_IMG_KERNEL_SECTOR : BOOT_IMG_KERNEL_SECTOR + 8] = struct.pack("<Q", core_lba)
    core = bytearray(core_img.ljust(sectors * SECTOR, b"\0"))
    core[DISKBOOT_BLOCKLIST_START : DISKBOOT_BLOCKLIST_START + 8] = struct.pack("<Q", core_lba + 1)
    core[DISKBOOT_BLOCKLIST_LEN : DISKBOOT_BLOCKLIST_LEN + 2] = struct.pack("<H", sectors - 1)
    with open(disk, "r+b") as f:
        f.seek(0)
        f.write(code)
        f.seek(core_lba * SECTOR)
        f.write(core)


def assemble_disk(tree: Path, raw: Path, work: Path, root_uuid: str, esp_id: str) -> dict:
    """Write the GPT disk image ``raw`` from ``tree``; returns its layout."""
    used = _tree_bytes(tree)
    # Room for ext4's metadata and for the tenant's first changes; whole 64 MiB units.
    root_bytes = -(-(int(used * 1.25) + 384 * MIB) // (64 * MIB)) * 64 * MIB
    root_sectors = root_bytes // SECTOR
    total_sectors = ROOT_START + root_sectors + MIB // SECTOR  # backup GPT in the last MiB
    raw.unlink(missing_ok=True)
    with open(raw, "wb") as f:
        f.truncate(total_sectors * SECTOR)
    layout = (
        "label: gpt\nunit: sectors\nfirst-lba: 2048\n"
        f"start={BIOS_BOOT_START}, size={BIOS_BOOT_SECTORS}, type={BIOS_BOOT_TYPE}, "
        'name="bios-boot"\n'
        f'start={ESP_START}, size={ESP_SECTORS}, type={ESP_TYPE}, name="esp"\n'
        f'start={ROOT_START}, size={root_sectors}, type={LINUX_TYPE}, name="root"\n'
    )
    _run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(raw)], input=layout)
    _run(["mkfs.ext4", "-q", "-F", "-t", "ext4", "-L", "root", "-U", root_uuid,
          "-d", str(tree), "-E", f"offset={ROOT_START * SECTOR}",
          str(raw), f"{root_bytes // 1024}k"])  # fmt: skip
    core, efi, boot_img = _grub_images(tree, work, root_uuid)
    _run(["mkfs.vfat", "-F", "16", "-n", "ESP", "-i", esp_id, f"--offset={ESP_START}",
          str(raw), str(ESP_SECTORS * SECTOR // 1024)])  # fmt: skip
    esp = f"{raw}@@{ESP_START * SECTOR}"
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    _run(["mmd", "-i", esp, "::/EFI", "::/EFI/BOOT"], env=env)
    _run(["mcopy", "-i", esp, str(efi), "::/EFI/BOOT/BOOTX64.EFI"], env=env)
    install_bios_grub(raw, boot_img, core.read_bytes(), BIOS_BOOT_START, BIOS_BOOT_SECTORS)
    return {
        "disk_bytes": total_sectors * SECTOR,
        "tree_bytes": used,
        "partitions": {
            "bios-boot": [BIOS_BOOT_START, BIOS_BOOT_SECTORS],
            "esp": [ESP_START, ESP_SECTORS],
            "root": [ROOT_START, root_sectors],
        },
        "core_img_bytes": core.stat().st_size,
        "bootx64_efi_bytes": efi.stat().st_size,
    }


# -- build --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # parallel builders wait, then reuse
        yield


def _load(out: Path, manifest: dict, cached: bool) -> OsImage:
    return OsImage(out / f"{IMAGE_NAME}.qcow2", out / "vmlinuz", out / "initrd.img", manifest,
                   cached)  # fmt: skip


def build(out: Path = DEFAULT_OUT, *, force: bool = False, log=print) -> OsImage:
    """Build (or reuse) the golden image in ``out``: ``<out>/debian-12.qcow2``, the image's
    ``vmlinuz`` and ``initrd.img``, and ``manifest.json``."""
    out = out.resolve()
    with _lock(out):
        started = time.monotonic()
        manifest_path = out / "manifest.json"
        previous = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        # apt-cache is slow (seconds): ask it again only when apt's lists changed.
        if previous.get("inputs") and not _apt_lists_newer_than(manifest_path):
            versions = previous["inputs"]
        else:
            versions = resolve_packages()
        key = cache_key(versions)
        image = _load(out, previous, cached=True)
        outputs = (image.qcow2, image.kernel, image.initrd)
        if not force and previous.get("key") == key and all(p.exists() for p in outputs):
            return image
        log(f"building the Debian golden image in {out} (a few minutes) ...")
        root_uuid, esp_id = _ids(key)
        for stale in out.glob("work-*"):
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=out, prefix="work-") as tmp:
            work = Path(tmp)
            (work / "tmp").mkdir()
            tree, overlay = work / "tree", work / "overlay"
            _write_overlay(overlay, root_uuid, esp_id)
            _mmdebstrap(tree, overlay, out / "debs", work / "tmp", out / "mmdebstrap.log", log)
            tree_at = time.monotonic()
            kver = _kernel_version(tree)
            installed = _installed(tree)
            raw = work / "disk.raw"
            log("assembling the disk ...")
            layout = assemble_disk(tree, raw, work, root_uuid, esp_id)
            shutil.copy2(tree / "boot" / f"vmlinuz-{kver}", work / "vmlinuz")
            shutil.copy2(tree / "boot" / f"initrd.img-{kver}", work / "initrd.img")
            shutil.rmtree(tree)
            log("compressing to qcow2 ...")
            qcow2 = work / f"{IMAGE_NAME}.qcow2"
            _run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)])
            for name in (qcow2.name, "vmlinuz", "initrd.img"):
                os.replace(work / name, out / name)
            manifest = {
                "key": key,
                "suite": SUITE,
                "kernel": kver,
                "root_uuid": root_uuid,
                "esp_id": esp_id,
                "kernel_args": f"root=UUID={root_uuid} {KERNEL_ARGS}",
                "default_user": DEFAULT_USER,
                "inputs": versions,
                "installed": installed,
                **layout,
                "qcow2_bytes": (out / qcow2.name).stat().st_size,
                "tree_seconds": round(tree_at - started, 1),
                "build_seconds": round(time.monotonic() - started, 1),
            }
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        return _load(out, manifest, cached=False)


# -- cloud-init seeds ---------------------------------------------------------------------------


def seed_files(
    hostname: str,
    ssh_keys: Sequence[str] = (),
    *,
    instance_id: str | None = None,
    user_data: dict | str | None = None,
    network_config: str | None = None,
) -> dict[str, str]:
    """The NoCloud files for one machine: ``meta-data`` (instance id, hostname) and
    ``user-data`` (``#cloud-config``: the hostname and ``ssh_keys`` for the image's default
    user, merged with ``user_data`` when it is a dict; a str is used as it is, e.g. a
    script), plus ``network-config`` when given."""
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", hostname):
        raise ValueError(f"not a host name: {hostname!r}")
    instance = instance_id or f"iid-{hostname}"
    files = {"meta-data": json.dumps({"instance-id": instance, "local-hostname": hostname})}
    if isinstance(user_data, str):
        files["user-data"] = user_data
    else:
        config = {"hostname": hostname}
        if ssh_keys:
            config["ssh_authorized_keys"] = list(ssh_keys)
        config.update(user_data or {})
        # JSON is YAML: no YAML library needed to write it.
        files["user-data"] = "#cloud-config\n" + json.dumps(config, indent=2) + "\n"
    if network_config is not None:
        files["network-config"] = network_config
    return files


def build_seed(path: Path, hostname: str, ssh_keys: Sequence[str] = (), **kwargs) -> Path:
    """A NoCloud seed: a small vfat file system labelled ``cidata`` holding
    :func:`seed_files` (``mkfs.vfat`` + ``mcopy``, no mount), to attach as a drive."""
    files = seed_files(hostname, ssh_keys, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    _run(["mkfs.vfat", "-C", "-n", "cidata", str(path), "2048"])
    with tempfile.TemporaryDirectory(prefix="bmi-seed-") as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
            _run(["mcopy", "-i", str(path), str(Path(tmp) / name), f"::/{name}"],
                 env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})  # fmt: skip
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args()
    started = time.monotonic()
    try:
        image = build(args.out, force=args.force)
    except BuildError as exc:
        sys.exit(f"os-image: {exc}")
    m = image.manifest
    state = "up to date" if image.cached else f"built in {m['build_seconds']}s"
    print(
        f"os image {state} ({time.monotonic() - started:.1f}s): {image.qcow2} "
        f"({m['qcow2_bytes'] / MIB:.0f} MiB qcow2, {m['disk_bytes'] / MIB:.0f} MiB disk), "
        f"kernel {m['kernel']}, root UUID {m['root_uuid']}"
    )


if __name__ == "__main__":
    main()
