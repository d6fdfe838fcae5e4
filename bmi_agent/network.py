"""Bring up the NIC the node PXE-booted from, with DHCP (busybox udhcpc)."""

from __future__ import annotations

import time
from collections.abc import Callable

from .attach import StepFailed
from .runner import CommandFailed, Runner
from .sysroot import SysRoot

# Written into the initramfs by the image builder (ipxe/agent_image/udhcpc.script).
DHCP_SCRIPT = "/etc/bmi/udhcpc.script"


class Network:
    def __init__(
        self,
        runner: Runner,
        root: SysRoot,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        wait_seconds: float = 20.0,
        dhcp_attempts: int = 3,
    ) -> None:
        self._run = runner
        self._root = root
        self._sleep = sleep
        self._clock = clock
        self._wait = wait_seconds
        self._attempts = dhcp_attempts

    def physical(self) -> dict[str, str]:
        """Interface name -> MAC, for NICs with a device (not lo, bridges, ...)."""
        found = {}
        for name in self._root.listdir("/sys/class/net"):
            if self._root.exists(f"/sys/class/net/{name}/device"):
                found[name] = self._root.read(f"/sys/class/net/{name}/address").lower()
        return found

    def boot_interface(self, mac: str) -> str:
        """The interface with ``mac`` (or, without one, the first NIC), once its driver
        has made it appear."""
        deadline = self._clock() + self._wait
        while True:
            nics = self.physical()
            for name, address in nics.items():
                if address == mac or (not mac and address):
                    return name
            if self._clock() >= deadline:
                seen = ", ".join(f"{n}={m}" for n, m in nics.items()) or "none"
                raise StepFailed(f"no network interface with MAC {mac or '(any)'}; seen: {seen}")
            self._sleep(0.2)

    def up(self, mac: str) -> str:
        """Bring the boot NIC up and configure it by DHCP; returns its name."""
        name = self.boot_interface(mac)
        self._run.run(["ip", "link", "set", "dev", name, "up"])
        last = None
        for _ in range(self._attempts):
            try:
                self._run.run(
                    ["udhcpc", "-i", name, "-f", "-q", "-n", "-t", "5", "-T", "2",
                     "-s", DHCP_SCRIPT],
                    timeout=60,
                )  # fmt: skip
                return name
            except CommandFailed as exc:
                last = exc
                self._sleep(2)
        raise StepFailed(f"DHCP on {name} failed: {last}")
