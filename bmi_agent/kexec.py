"""Starts another kernel in place of the agent's (kexec_file_load + reboot(KEXEC)).

The syscalls are made directly, so the agent image needs no kexec-tools (whose Debian
build pulls in the Xen libraries). Injected, so unit tests record instead of rebooting.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Protocol

_SYS_KEXEC_FILE_LOAD = 320  # x86_64
_LINUX_REBOOT_CMD_KEXEC = 0x45584543


class KexecFailed(Exception):
    pass


class Kexec(Protocol):
    def load(self, kernel: Path, initrd: Path, command_line: str) -> None:
        """Load the kernel to start; KexecFailed if the running kernel refuses it."""

    def execute(self) -> None:
        """Start the loaded kernel (does not return when it works)."""


class SyscallKexec:
    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)

    def load(self, kernel: Path, initrd: Path, command_line: str) -> None:
        line = command_line.encode() + b"\0"
        kernel_fd = os.open(kernel, os.O_RDONLY)
        try:
            initrd_fd = os.open(initrd, os.O_RDONLY)
            try:
                done = self._libc.syscall(
                    ctypes.c_long(_SYS_KEXEC_FILE_LOAD), ctypes.c_int(kernel_fd),
                    ctypes.c_int(initrd_fd), ctypes.c_ulong(len(line)),
                    ctypes.c_char_p(line), ctypes.c_ulong(0),
                )
            finally:
                os.close(initrd_fd)
        finally:
            os.close(kernel_fd)
        if done != 0:
            err = ctypes.get_errno()
            raise KexecFailed(f"kexec_file_load: {os.strerror(err)} (errno {err})")

    def execute(self) -> None:
        os.sync()
        self._libc.reboot(ctypes.c_int(_LINUX_REBOOT_CMD_KEXEC))
        err = ctypes.get_errno()
        raise KexecFailed(f"reboot(KEXEC): {os.strerror(err)} (errno {err})")
