"""Logging in to a QEMU guest's sshd through a QEMU ``hostfwd`` port, with the system ``ssh``
client and a throwaway key (handed to the guest in a cloud-init seed: see
``os_image.build_seed``)."""

from __future__ import annotations

import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSH_OPTIONS = (
    "-o", "BatchMode=yes",
    "-o", "StrictHostKeyChecking=no",  # a new machine: new host keys on every first boot
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "ConnectTimeout=10",
    "-o", "ServerAliveInterval=5",
    "-o", "ServerAliveCountMax=3",
)  # fmt: skip


def make_key(folder: Path, name: str = "id_ed25519") -> Path:
    """A new passphrase-less ed25519 key pair in ``folder``; returns the private key's path
    (the public one is beside it, ``.pub``)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = folder / name
    key.unlink(missing_ok=True)
    key.with_suffix(".pub").unlink(missing_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bmi-test", "-f", str(key)],
        check=True,
        capture_output=True,
    )
    return key


@dataclass(frozen=True)
class GuestSsh:
    port: int
    key: Path
    user: str = "debian"
    host: str = "127.0.0.1"

    def argv(self, command: str | None = None) -> list[str]:
        base = ["ssh", *SSH_OPTIONS, "-i", str(self.key), "-p", str(self.port),
                f"{self.user}@{self.host}"]  # fmt: skip
        return base if command is None else [*base, command]

    def command_line(self) -> str:
        """What a person types to log in."""
        return shlex.join(self.argv())

    def run(self, command: str, timeout: float = 60, check: bool = True) -> str:
        """Run ``command`` (a shell line) on the guest; its stdout."""
        done = subprocess.run(
            self.argv(command), capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise subprocess.CalledProcessError(
                done.returncode, command, done.stdout, done.stderr
            )
        return done.stdout

    def try_run(self, command: str, timeout: float = 30) -> str | None:
        """stdout, or None if ssh could not log in or the command failed."""
        try:
            return self.run(command, timeout=timeout)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            return None

    def wait(self, timeout: float, command: str = "true", alive=None) -> str:
        """Retry ``command`` until it succeeds (sshd answers and the key is accepted);
        its stdout. ``alive()``, if given, is asked between tries and stops the wait early
        when false (e.g. the VM died)."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.try_run(command)
            if out is not None:
                return out
            if alive is not None and not alive():
                raise RuntimeError(f"the guest went away before ssh answered ({self.port})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no ssh on 127.0.0.1:{self.port} within {timeout} s")
            time.sleep(2)
