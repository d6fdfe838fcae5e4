"""The agent's side of bmi.v1.BootService: the one-boot token travels as metadata."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

import grpc
from bmi.v1 import boot_pb2, boot_pb2_grpc, inventory_pb2

from . import __version__
from .cmdline import AgentConfig, CmdlineError
from .inventory import Inventory

log = logging.getLogger(__name__)

TOKEN_METADATA = "bmi-boot-token"
RETRY_AFTER_METADATA = "retry-after-ms"
TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
    }
)
_FIRMWARE = {"bios": inventory_pb2.FIRMWARE_KIND_BIOS, "uefi": inventory_pb2.FIRMWARE_KIND_UEFI}


def retry_after(error: grpc.RpcError) -> float | None:
    """Seconds the server asked us to wait (RESOURCE_EXHAUSTED with ``retry-after-ms``,
    from its admission control), or None."""
    code = getattr(error, "code", None)
    if not callable(code) or code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    trailing = getattr(error, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == RETRY_AFTER_METADATA:
            try:
                return min(max(int(value), 0), 60_000) / 1000
            except ValueError:
                return None
    return None


class TokenRejected(Exception):
    """The server no longer accepts this boot's token (expired, replaced or revoked)."""


class ServerRefused(Exception):
    """The server answered with an error that retrying does not fix."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


def inventory_message(inv: Inventory) -> inventory_pb2.Inventory:
    return inventory_pb2.Inventory(
        cpu=inventory_pb2.Cpu(
            model=inv.cpu.model,
            count=inv.cpu.count,
            architecture=inv.cpu.architecture,
            sockets=inv.cpu.sockets,
        ),
        memory=inventory_pb2.Memory(
            physical_bytes=inv.memory.physical_bytes, usable_bytes=inv.memory.usable_bytes
        ),
        block_devices=[
            inventory_pb2.BlockDevice(
                name=d.name,
                size_bytes=d.size_bytes,
                model=d.model,
                serial=d.serial,
                rotational=d.rotational,
                vendor=d.vendor,
            )
            for d in inv.block_devices
        ],
        interfaces=[
            inventory_pb2.NetworkInterface(
                name=n.name, mac=n.mac, driver=n.driver, speed_mbps=n.speed_mbps, carrier=n.carrier
            )
            for n in inv.interfaces
        ],
        system=inventory_pb2.SystemInfo(
            manufacturer=inv.system.manufacturer,
            product=inv.system.product,
            serial=inv.system.serial,
            uuid=inv.system.uuid,
        ),
        firmware=inventory_pb2.Firmware(
            kind=_FIRMWARE.get(inv.firmware.kind, inventory_pb2.FIRMWARE_KIND_UNSPECIFIED),
            vendor=inv.firmware.vendor,
            version=inv.firmware.version,
        ),
        collectors=inv.collectors,
    )


def open_channel(config: AgentConfig) -> grpc.Channel:
    """TLS when the command line names a CA file (the server sends it as an extra initrd),
    plaintext otherwise; CmdlineError if the CA file is unreadable."""
    if not config.ca_file:
        return grpc.insecure_channel(config.server)
    try:
        with open(config.ca_file, "rb") as f:
            ca = f.read()
    except OSError as exc:
        raise CmdlineError(f"bmi.ca {config.ca_file}: {exc.strerror or exc}") from None
    return grpc.secure_channel(config.server, grpc.ssl_channel_credentials(root_certificates=ca))


class BootClient:
    """Calls BootService for one node, retrying transient failures with jittered backoff."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        channel: grpc.Channel | None = None,
        sleep: Callable[[float], None] = time.sleep,
        timeout: float = 20.0,
    ) -> None:
        self._config = config
        self._channel = channel or open_channel(config)
        self._stub = boot_pb2_grpc.BootServiceStub(self._channel)
        self._metadata = ((TOKEN_METADATA, config.token),)
        self._sleep = sleep
        self._timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., Any], request: Any, attempts: int) -> Any:
        """``attempts`` 0: retry transient failures for ever (the server may be down)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return method(request, metadata=self._metadata, timeout=self._timeout)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
                details = exc.details() if hasattr(exc, "details") else str(exc)
                if code is grpc.StatusCode.UNAUTHENTICATED:
                    raise TokenRejected(details) from None
                if code not in TRANSIENT or (attempts and attempt >= attempts):
                    raise ServerRefused(code, details) from None
                hint = retry_after(exc)
                if hint is not None:  # the server is busy and said when to come back
                    delay = hint * random.uniform(1.0, 1.5)  # jitter: a rack asks at once
                else:
                    delay = min(30.0, 2.0 ** min(attempt, 5)) * random.uniform(0.5, 1.0)
                log.warning("server: %s (%s); again in %.0fs", code.name, details, delay)
                self._sleep(delay)

    def register(self, inventory: Inventory, attempts: int = 0) -> boot_pb2.RegisterResponse:
        request = boot_pb2.RegisterRequest(
            node_id=self._config.node_id,
            inventory=inventory_message(inventory),
            agent_version=__version__,
        )
        return self._call(self._stub.Register, request, attempts)

    def boot_plan(self, attempts: int = 0) -> boot_pb2.BootPlan:
        request = boot_pb2.GetBootPlanRequest(node_id=self._config.node_id)
        return self._call(self._stub.GetBootPlan, request, attempts)

    def report(
        self,
        phase: int,
        detail: str = "",
        *,
        attempt: int = 0,
        will_retry: bool = False,
        attempts: int = 5,
    ) -> None:
        request = boot_pb2.ReportStatusRequest(
            node_id=self._config.node_id,
            phase=phase,
            detail=detail[:1000],
            attempt=attempt,
            will_retry=will_retry,
        )
        self._call(self._stub.ReportStatus, request, attempts)

    def heartbeat(self, attempts: int = 3) -> boot_pb2.HeartbeatResponse:
        request = boot_pb2.HeartbeatRequest(node_id=self._config.node_id)
        return self._call(self._stub.Heartbeat, request, attempts)
