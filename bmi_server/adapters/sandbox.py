"""Runs a tool on an untrusted file where it can see nothing else of the host.

bubblewrap puts the command in fresh mount, network, PID, IPC and user namespaces as an
unprivileged user with no capabilities: its file system is /usr (read-only, for the
program and its libraries), an empty /tmp, and exactly the paths given, at fixed names.
Whatever the file names inside it (a backing file, an external data file, a ``json:``
spec), there is nothing else to open and no network to reach. This is the second line:
the header checks (qcow2.py) refuse such files before any tool runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SANDBOX_USER = 65534  # nobody, inside the sandbox's own user namespace


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create namespaces on this host."""


@dataclass(frozen=True)
class SandboxResult:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False


class Sandbox:
    def __init__(self, bwrap: str = "bwrap") -> None:
        self.bwrap = shutil.which(bwrap) or bwrap

    def run(
        self,
        command: Sequence[str],
        *,
        read_only: Mapping[str, Path] = {},
        writable: Mapping[str, Path] = {},
        timeout: float,
    ) -> SandboxResult:
        """Run ``command`` with each host path bound at its name (absolute, inside)."""
        args = [
            self.bwrap,
            "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
            "--uid", str(SANDBOX_USER), "--gid", str(SANDBOX_USER), "--cap-drop", "ALL",
            "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
            "--symlink", "usr/bin", "/bin", "--symlink", "usr/sbin", "/sbin",
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
            "--setenv", "PATH", "/usr/bin:/usr/sbin", "--setenv", "LC_ALL", "C",
        ]
        for inside, host in read_only.items():
            args += ["--ro-bind", str(host), inside]
        for inside, host in writable.items():
            args += ["--bind", str(host), inside]
        args += ["--", *command]
        try:
            proc = subprocess.Popen(
                args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                start_new_session=True,
            )
        except FileNotFoundError:
            raise SandboxUnavailable(f"{self.bwrap} not found (Debian: bubblewrap)") from None
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            return SandboxResult(proc.returncode, out, err, timed_out=True)
        except BaseException:
            _kill_group(proc)
            proc.wait()
            raise
        if proc.returncode != 0 and err.startswith("bwrap:"):
            raise SandboxUnavailable(err.strip().splitlines()[0])
        return SandboxResult(proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen) -> None:
    """The sandbox's whole session: bwrap and the tool it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
