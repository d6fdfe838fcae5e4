"""The agent's settings, from the kernel command line the node's iPXE script wrote."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

# `BOOTIF=01-52-54-00-ab-cd-ef` (the pxelinux convention: 01 = Ethernet).
_BOOTIF = re.compile(r"01-((?:[0-9a-fA-F]{2}-){5}[0-9a-fA-F]{2})")


class CmdlineError(ValueError):
    """A required bmi.* parameter is missing or malformed."""


@dataclass(frozen=True)
class AgentConfig:
    server: str  # host:port of the BMI gRPC endpoint
    node_id: str
    token: str = field(repr=False)  # the one-boot token: never logged
    boot_mac: str = ""  # MAC of the NIC the node PXE-booted from, if given
    debug: bool = False
    # TLS: the CA file (in the initramfs) the server's certificate must chain to. Empty:
    # plaintext gRPC.
    ca_file: str = ""


def parse_cmdline(text: str) -> AgentConfig:
    """``bmi.server=H:P bmi.node=ID bmi.token=T [BOOTIF=01-..] [bmi.ca=PATH] [bmi.debug]``."""
    params: dict[str, str] = {}
    for word in shlex.split(text):
        key, sep, value = word.partition("=")
        params[key] = value if sep else "1"
    missing = [k for k in ("bmi.server", "bmi.node", "bmi.token") if not params.get(k)]
    if missing:
        raise CmdlineError(f"kernel command line lacks {', '.join(missing)}")
    server = params["bmi.server"]
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise CmdlineError(f"bmi.server must be host:port, not {server!r}")
    boot_mac = ""
    if bootif := params.get("BOOTIF"):
        match = _BOOTIF.fullmatch(bootif)
        if not match:
            raise CmdlineError(f"BOOTIF must look like 01-aa-bb-cc-dd-ee-ff, not {bootif!r}")
        boot_mac = match.group(1).lower().replace("-", ":")
    return AgentConfig(
        server=server,
        node_id=params["bmi.node"],
        token=params["bmi.token"],
        boot_mac=boot_mac,
        debug=params.get("bmi.debug", "0") not in ("0", ""),
        ca_file=params.get("bmi.ca", ""),
    )
