"""Starting the OS's own kernel from its disk, logging in to its target again.

A real image's userland needs the modules of its own kernel, so the agent does not pivot
into it under the agent's kernel: it loads the image's kernel and initramfs (kexec) and
appends a small cpio holding ``/etc/iscsi.initramfs`` (the initramfs's copy of
``/etc/iscsi/iscsi.initramfs``) with the target, portal,
initiator name and CHAP credentials, which open-iscsi's initramfs script (Debian and
Ubuntu's initramfs-tools) reads to log in again and mount the root. The credentials stay
out of the kernel command line (``/proc/cmdline`` is world-readable).

An image with no kernel of its own (BMI's busybox test OS) is entered with switch_root.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .attach import IscsiLogin, split_portal

# Where Debian, Ubuntu (symlinks in / or /boot) and most distributions keep the kernel.
_KERNEL_LINKS = (("vmlinuz", "initrd.img"), ("boot/vmlinuz", "boot/initrd.img"))
_VERSIONED = re.compile(r"vmlinuz-(.+)")
_INITRD_NAMES = ("initrd.img-{v}", "initramfs-{v}.img", "initrd-{v}")
# Where open-iscsi's initramfs hook puts /etc/iscsi/iscsi.initramfs inside the initramfs.
_CONFIG_PATH = "etc/iscsi.initramfs"
_SAFE_VALUE = re.compile(r"[A-Za-z0-9.:@_+=/-]+")


class NoUsableKernel(Exception):
    """The image has a kernel, but something needed to start it is missing."""


@dataclass(frozen=True)
class OsKernel:
    kernel: Path
    initrd: Path
    version: str
    root: str  # root= for the kernel command line, as the image's fstab names it


def find_os_kernel(new_root: Path) -> OsKernel | None:
    """The image's newest kernel and its initramfs, or None if the image has no kernel."""
    for kernel_link, initrd_link in _KERNEL_LINKS:
        kernel = _inside(new_root, kernel_link)
        if kernel is not None:
            initrd = _inside(new_root, initrd_link)
            if initrd is None:
                raise NoUsableKernel(f"the image has /{kernel_link} but no /{initrd_link}")
            version = _VERSIONED.fullmatch(kernel.name)
            return OsKernel(kernel, initrd, version[1] if version else kernel.name,
                            root_of(new_root))
    boot = new_root / "boot"
    names = [p.name for p in boot.iterdir()] if boot.is_dir() else []
    versions = sorted((m[1] for n in names if (m := _VERSIONED.fullmatch(n))), key=_version_key)
    if not versions:
        return None
    version = versions[-1]
    for pattern in _INITRD_NAMES:
        initrd = boot / pattern.format(v=version)
        if initrd.is_file():
            return OsKernel(boot / f"vmlinuz-{version}", initrd, version, root_of(new_root))
    raise NoUsableKernel(f"the image has /boot/vmlinuz-{version} but no initramfs for it")


def root_of(new_root: Path) -> str:
    """The root file system's spec from the image's /etc/fstab (UUID=, LABEL=, ...)."""
    try:
        lines = (new_root / "etc" / "fstab").read_text(errors="replace").splitlines()
    except OSError:
        raise NoUsableKernel("the image has no /etc/fstab naming its root") from None
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and not fields[0].startswith("#") and fields[1] == "/":
            return fields[0]
    raise NoUsableKernel("the image's /etc/fstab names no / file system")


def command_line(kernel: OsKernel, extra_args: list[str]) -> str:
    return " ".join(["BOOT_IMAGE=/boot/vmlinuz-" + kernel.version, f"root={kernel.root}", "ro",
                     *extra_args])


def iscsi_config(login: IscsiLogin, portal: str) -> bytes:
    """open-iscsi initramfs settings (a shell fragment) for the target the agent reached."""
    host, port = split_portal(portal)
    values = {
        "ISCSI_INITIATOR": login.initiator_iqn,
        "ISCSI_TARGET_NAME": login.iqn,
        "ISCSI_TARGET_IP": host,
        "ISCSI_TARGET_PORT": port,
        "ISCSI_TARGET_GROUP": "1",
        "ISCSI_USERNAME": login.chap_user,
        "ISCSI_PASSWORD": login.chap_secret,
    }
    for name, value in values.items():
        if not _SAFE_VALUE.fullmatch(value):
            raise NoUsableKernel(f"{name} holds characters a shell fragment cannot carry")
    return "".join(f"{name}='{value}'\n" for name, value in values.items()).encode()


def initrd_with_config(image_initrd: bytes, config: bytes) -> bytes:
    """The image's initramfs followed by a cpio holding ``config``; the kernel unpacks
    concatenated archives in order, so the file replaces the image's own."""
    padding = b"\0" * (-len(image_initrd) % 4)
    return image_initrd + padding + _newc([("etc", None), (_CONFIG_PATH, config)])


def _newc(entries: list[tuple[str, bytes | None]]) -> bytes:
    """An uncompressed newc cpio: directories (None) and 0600 files."""
    out = bytearray()
    for ino, (name, data) in enumerate([*entries, ("TRAILER!!!", b"")], start=1):
        mode = 0o040755 if data is None else 0o100600
        if name == "TRAILER!!!":
            mode, ino = 0, 0
        body = data or b""
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(body), 0, 0, 0, 0, len(encoded), 0)
        out += b"070701" + b"".join(b"%08X" % f for f in fields)
        out += encoded + b"\0" * (-(110 + len(encoded)) % 4)
        out += body + b"\0" * (-len(body) % 4)
    return bytes(out)


def _inside(new_root: Path, path: str) -> Path | None:
    """``path`` in the image, its symlinks resolved inside the image (absolute links in
    the image point into the image, not into the agent's file system)."""
    current = path
    for _ in range(16):
        candidate = new_root / current
        if candidate.is_symlink():
            target = os.readlink(candidate)
            parent = os.path.dirname(current)
            current = os.path.normpath(target.lstrip("/") if target.startswith("/")
                                       else os.path.join(parent, target))
            if current.startswith(".."):
                return None
            continue
        return candidate if candidate.is_file() else None
    return None


def _version_key(version: str) -> list[tuple[int, object]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.-]", version)]
