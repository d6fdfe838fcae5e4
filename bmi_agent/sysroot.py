"""Reading /proc and /sys under a root directory: "/" on a node, a fixture tree in tests."""

from __future__ import annotations

import os
import platform
from pathlib import Path


class SysRoot:
    def __init__(self, base: str | Path = "/", machine: str | None = None) -> None:
        self.base = Path(base)
        # The architecture is the running kernel's (uname), not a file: fixtures pass it.
        self.machine = machine if machine is not None else platform.machine()

    def path(self, path: str) -> Path:
        return self.base / path.lstrip("/")

    def read(self, path: str, default: str = "") -> str:
        """A sysfs attribute, stripped; ``default`` if it is missing or unreadable (sysfs
        answers EINVAL for e.g. the speed of a link that is down)."""
        try:
            return self.path(path).read_text(errors="replace").strip()
        except OSError:
            return default

    def read_bytes(self, path: str) -> bytes:
        try:
            return self.path(path).read_bytes()
        except OSError:
            return b""

    def read_head(self, path: str, length: int) -> bytes:
        """The first ``length`` bytes (of a block device, say), or b"" if unreadable."""
        try:
            with open(self.path(path), "rb") as f:
                return f.read(length)
        except OSError:
            return b""

    def read_int(self, path: str, default: int = 0, base: int = 10) -> int:
        try:
            return int(self.read(path), base)
        except ValueError:
            return default

    def exists(self, path: str) -> bool:
        return os.path.lexists(self.path(path))

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(path)))
        except OSError:
            return []

    def link_name(self, path: str) -> str:
        """Last component of a symlink's target (e.g. a device's driver), or ""."""
        try:
            return os.path.basename(os.readlink(self.path(path)))
        except OSError:
            return ""

    def realpath(self, path: str) -> str:
        """Where ``path`` leads, relative to the root, e.g. ``/sys/devices/...``."""
        real = os.path.realpath(self.path(path))
        try:
            return "/" + os.path.relpath(real, os.path.realpath(self.base))
        except ValueError:
            return real
