"""UploadSpool on a local directory: files for qcow2 uploads and their raw conversions.

Each file is created 0600 and stays locked (flock) while its upload holds it open, so the
sweep at start removes exactly the files no live upload owns, even when another server
process shares the directory. Before a file is made, the file system must have room for
what will be written into it plus a reserve, so uploads never fill the server's disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
from pathlib import Path

from bmi_server.core.errors import ResourceExhausted

log = logging.getLogger(__name__)
PREFIX = "bmi-upload-"


class LocalSpoolFile:
    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._file = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)

    def close(self) -> None:
        """Flush what was written; the lock holds until ``discard``."""
        self._file.flush()

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        if not self._file.closed:
            self._file.close()  # releases the lock


class LocalSpool:
    def __init__(self, directory: Path, reserve_bytes: int = 1 << 30) -> None:
        self.directory = Path(directory)
        self.reserve_bytes = reserve_bytes

    def new_file(self, expected_bytes: int, suffix: str) -> LocalSpoolFile:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        free = self.free_bytes()
        if expected_bytes + self.reserve_bytes > free:
            raise ResourceExhausted(
                f"the server has no room for this upload now ({expected_bytes} bytes needed "
                f"for it, {max(free - self.reserve_bytes, 0)} free); retry later"
            )
        fd, name = tempfile.mkstemp(prefix=PREFIX, suffix=suffix, dir=self.directory)
        fcntl.flock(fd, fcntl.LOCK_EX)  # mkstemp made it 0600
        return LocalSpoolFile(Path(name), fd)

    def free_bytes(self) -> int:
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    def sweep(self) -> int:
        """Make the spool directory if missing and remove spool files no live upload holds
        (left by a crash); how many went."""
        if not self.directory.is_dir():
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            return 0
        removed = 0
        for path in self.directory.glob(f"{PREFIX}*"):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # an upload in progress (this or another process)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
            finally:
                os.close(fd)
        if removed:
            log.info("removed %d upload spool files left by an earlier run", removed)
        return removed
