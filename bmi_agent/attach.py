"""Attach the node's disk over iSCSI, mount its root and pivot into the OS.

Login uses ``iscsistart`` (open-iscsi's one-shot initiator for initramfs use, as in
Debian's initramfs-tools and dracut): it needs no iscsid and no node database, and takes
the target, portal and CHAP credentials on its command line. The plan names the target,
so no SendTargets discovery is needed; each portal of the plan is tried in turn.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .runner import CommandFailed, Runner
from .sysroot import SysRoot

# How long the kernel holds the OS's disk I/O while the iSCSI connection is down (tgtd
# restarted, a network blip) before failing it. BMI's target audit re-creates targets a
# restarted tgtd lost within target_audit_seconds (30 s by default); this must be well
# above that. (open-iscsi's default is 120 s; a failed root disk is worse than a pause.)
REPLACEMENT_TIMEOUT_SECONDS = 300

NEW_ROOT = "/newroot"
# Moved into the new root before switch_root (busybox's switch_root does not move them).
MOVED_MOUNTS = ("/dev", "/proc", "/sys", "/run")
# /sys/block/sdX leads to .../sessionN/targetH:C:T/H:C:T:LUN/block/sdX
_SCSI_PATH = re.compile(r"/session(\d+)/target[\d:]+/\d+:\d+:\d+:(\d+)/block/([^/]+)$")


class StepFailed(Exception):
    """A step of attaching or pivoting failed; the message says why, for the operator."""


@dataclass(frozen=True)
class IscsiLogin:
    portals: tuple[str, ...]
    iqn: str
    lun: int
    initiator_iqn: str
    chap_user: str
    chap_secret: str = field(repr=False)


def _has_partition_table(head: bytes) -> bool:
    """An MBR (boot signature at 510) or a GPT header (at LBA 1) at the start of a disk.
    An ext4 file system on the whole disk has neither (it leaves its first 1 KiB zero)."""
    return head[510:512] == b"\x55\xaa" or head[512:520] == b"EFI PART"


def split_portal(portal: str) -> tuple[str, str]:
    """``10.0.2.2:3260`` -> (10.0.2.2, 3260); ``[fd00::1]:3260`` -> (fd00::1, 3260)."""
    host, sep, port = portal.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise StepFailed(f"portal {portal!r} is not host:port")
    return host.strip("[]"), port


class Attacher:
    def __init__(
        self,
        runner: Runner,
        root: SysRoot,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        device_timeout: float = 30.0,
        new_root: str = NEW_ROOT,
    ) -> None:
        self._run = runner
        self._root = root
        self._sleep = sleep
        self._clock = clock
        self._device_timeout = device_timeout
        self.new_root = new_root
        self._portal_of: dict[str, str] = {}  # target -> the portal its session went through

    # -- iSCSI -----------------------------------------------------------------------

    def session_for(self, iqn: str) -> str | None:
        """The iSCSI session (e.g. ``session1``) logged in to ``iqn``, if any."""
        for session in self._root.listdir("/sys/class/iscsi_session"):
            if self._root.read(f"/sys/class/iscsi_session/{session}/targetname") == iqn:
                return session
        return None

    def login(self, login: IscsiLogin, on_portal: Callable[[str], None]) -> str:
        """Log in through the first portal that works; returns it. A session left by an
        earlier attempt is reused (a second login would make a second session)."""
        if self.session_for(login.iqn):
            return self._portal_of.get(login.iqn, login.portals[0] if login.portals else "")
        if not login.portals:
            raise StepFailed("the boot plan names no portal")
        errors = []
        for portal in login.portals:
            host, port = split_portal(portal)
            on_portal(portal)
            try:
                self._run.run(
                    [
                        "iscsistart",
                        "-i", login.initiator_iqn,
                        "-t", login.iqn,
                        "-g", "1",
                        "-a", host,
                        "-p", port,
                        "-u", login.chap_user,
                        "-w", login.chap_secret,
                        "-P", "node.session.timeo.replacement_timeout="
                        f"{REPLACEMENT_TIMEOUT_SECONDS}",
                    ],
                    timeout=60,
                    secrets=[login.chap_secret],
                )  # fmt: skip
                self._portal_of[login.iqn] = portal
                return portal
            except CommandFailed as exc:
                errors.append(f"{portal}: {exc}")
        raise StepFailed(f"iSCSI login to {login.iqn} failed: " + "; ".join(errors))

    def disk_of(self, iqn: str, lun: int) -> str | None:
        """Kernel name of the disk that is LUN ``lun`` of the session with ``iqn``."""
        session = self.session_for(iqn)
        if session is None:
            return None
        for name in self._root.listdir("/sys/block"):
            match = _SCSI_PATH.search(self._root.realpath(f"/sys/block/{name}"))
            if match and f"session{match.group(1)}" == session and int(match.group(2)) == lun:
                return name
        return None

    def wait_for_disk(self, iqn: str, lun: int) -> str:
        """``/dev/sdX`` of the LUN, once the kernel has scanned it and devtmpfs has it."""
        deadline = self._clock() + self._device_timeout
        while True:
            name = self.disk_of(iqn, lun)
            if name and self._root.exists(f"/dev/{name}"):
                return f"/dev/{name}"
            if self._clock() >= deadline:
                where = "no session" if self.session_for(iqn) is None else f"no LUN {lun}"
                raise StepFailed(
                    f"no block device for LUN {lun} of {iqn} after "
                    f"{self._device_timeout:g}s ({where})"
                )
            self._sleep(0.2)

    def root_device(self, disk: str, partition: int) -> str:
        """The whole disk, or its partition ``partition`` once the kernel has read it."""
        if partition <= 0:
            return disk
        name = disk.removeprefix("/dev/")
        part = f"{name}p{partition}" if name[-1].isdigit() else f"{name}{partition}"
        deadline = self._clock() + self._device_timeout
        while not (
            self._root.exists(f"/sys/block/{name}/{part}") and self._root.exists(f"/dev/{part}")
        ):
            if self._clock() >= deadline:
                raise StepFailed(f"{disk} has no partition {partition}")
            self._sleep(0.2)
        return f"/dev/{part}"

    def partitions_of(self, disk: str) -> list[str]:
        """``/dev`` names of the disk's partitions, largest first (the root is usually
        the largest: a real image also holds a BIOS-boot partition and an ESP). A disk
        with a partition table is given time for the kernel to show its partitions."""
        name = disk.removeprefix("/dev/")
        found = self._partitions(name)
        if found or not _has_partition_table(self._root.read_head(disk, 1024)):
            return found
        deadline = self._clock() + self._device_timeout
        while not (found := self._partitions(name)) and self._clock() < deadline:
            self._sleep(0.2)
        return found  # none after all (a FAT file system also ends its sector in 55 AA)

    def _partitions(self, name: str) -> list[str]:
        found = [
            (self._root.read_int(f"/sys/block/{name}/{entry}/size"), entry)
            for entry in self._root.listdir(f"/sys/block/{name}")
            if entry.startswith(name) and self._root.exists(f"/sys/block/{name}/{entry}/partition")
        ]
        return [f"/dev/{entry}" for _, entry in sorted(found, key=lambda f: (-f[0], f[1]))
                if self._root.exists(f"/dev/{entry}")]

    def mount_os_root(
        self, disk: str, partition: int, init: str, fs_type: str = "", options: str = ""
    ) -> str:
        """Mount the OS's root file system and check it has ``init``; its device.

        ``partition`` 0 means: the whole disk if it has no partitions, else the first
        partition (largest first) that holds ``init``."""
        if partition > 0:
            candidates = [self.root_device(disk, partition)]
        else:
            candidates = self.partitions_of(disk) or [disk]
        problems = []
        for device in candidates:
            try:
                self.mount_root(device, fs_type, options)
            except StepFailed as exc:
                problems.append(str(exc))
                continue
            try:
                self.check_init(init)
                return device
            except StepFailed as exc:
                problems.append(str(exc))
                self.unmount_root()
        if len(candidates) == 1:
            raise StepFailed(problems[0])
        raise StepFailed(f"no partition of {disk} holds the OS ({'; '.join(problems)})")

    # -- root and pivot ----------------------------------------------------------------

    def mount_root(self, device: str, fs_type: str = "", options: str = "") -> None:
        self._run.run(["mkdir", "-p", self.new_root])
        argv = ["mount"]
        if fs_type:
            argv += ["-t", fs_type]
        argv += ["-o", options or "rw", device, self.new_root]
        try:
            self._run.run(argv, timeout=60)
        except CommandFailed as exc:
            raise StepFailed(f"cannot mount {device}: {exc}") from None

    def check_init(self, init: str) -> None:
        if not init.startswith("/"):
            raise StepFailed(f"init must be an absolute path, not {init!r}")
        # lexists: the init is often a symlink that is absolute inside the new root.
        if not self._root.exists(self.new_root + init):
            raise StepFailed(f"the root file system has no {init}")

    def unmount_root(self) -> None:
        self._run.run(["umount", self.new_root], check=False)

    def pivot(self, init: str, args: Sequence[str] = ()) -> None:
        """Move /dev, /proc, /sys and /run into the new root and switch_root into its init.

        Returns only if the runner does not really exec (tests)."""
        for mount in MOVED_MOUNTS:
            if not self._root.exists(self.new_root + mount):
                continue  # the OS does without it (or mounts its own)
            try:
                self._run.run(["mount", "--move", mount, self.new_root + mount])
            except CommandFailed as exc:
                raise StepFailed(f"cannot move {mount} into the new root: {exc}") from None
        self._run.exec(["switch_root", self.new_root, init, *args])
