"""newc ("070701") cpio archives: the initramfs format the Linux kernel unpacks. Used for
the agent's initrd and for the small extra initrd that hands nodes the TLS CA."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class Cpio:
    """A newc ("070701") archive, the format the kernel unpacks into its rootfs."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)):
        encoded = name.encode() + b"\0"
        fields = [self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0]
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._parts.append(header + encoded + b"\0" * (-(110 + len(encoded)) % 4))
        self._parts.append(data + b"\0" * (-len(data) % 4))

    def add_tree(self, root: Path) -> None:
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            here = Path(folder)
            rel = here.relative_to(root)
            if str(rel) != ".":
                self._entry(str(rel), stat.S_IFDIR | (here.stat().st_mode & 0o7777))
            for name in sorted(files) + sorted(d for d in dirs if (here / d).is_symlink()):
                path = here / name
                info = path.lstat()
                entry = str(path.relative_to(root))
                if stat.S_ISLNK(info.st_mode):
                    self._entry(entry, stat.S_IFLNK | 0o777, os.readlink(path).encode())
                else:
                    self._entry(entry, stat.S_IFREG | (info.st_mode & 0o7777), path.read_bytes())

    def add_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)

    def add_directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode)

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)
