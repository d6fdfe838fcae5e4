"""iPXE scripts for the boot decisions. Only validated, normalised values reach them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlencode

from ..core.boot import BootAction, BootKind

_UNSAFE = re.compile(r"[^A-Za-z0-9 .,:;/()_=+-]")


def _say(text: str) -> str:
    # iPXE expands ${...} anywhere in a line: nothing from outside may carry '$' or '{'.
    return _UNSAFE.sub("?", text)[:200]


def iscsi_uri(portal: str, iqn: str, lun: int = 1) -> str:
    host, _, port = portal.rpartition(":")
    return f"iscsi:{host}::{port}:{lun}:{iqn}"


# Operator-set kernel arguments go into a script: nothing iPXE would expand or split.
KERNEL_ARGS = re.compile(r"[A-Za-z0-9 ,.:=/_+@-]*")


# Where the agent finds the CA it verifies the server with, when the API uses TLS.
AGENT_CA_FILE = "/etc/bmi/ca.pem"


@dataclass(frozen=True)
class AgentBoot:
    """Where a node fetches the agent's kernel and initrd, and what its command line says."""

    base_url: str  # http://host[:port] of this endpoint, as the node reached it
    server: str  # host:port of the gRPC API, as the node reaches it
    kernel_args: str = "console=ttyS0 quiet"
    tls: bool = False  # the agent gets the CA as a second initrd and speaks TLS


def render_agent(action: BootAction, retry_url: str, agent: AgentBoot) -> str:
    name = action.node.name if action.node else "unknown node"
    node_id = action.node.id if action.node else ""
    bootif = "01-" + action.mac.replace(":", "-") if action.mac else ""
    args = " ".join(
        filter(
            None,
            [
                "initrd=initrd",
                "initrd=ca.cpio" if agent.tls else "",
                agent.kernel_args,
                f"bmi.server={agent.server}",
                f"bmi.node={node_id}",
                f"bmi.token={action.token}",
                f"BOOTIF={bootif}" if bootif else "",
                f"bmi.ca={AGENT_CA_FILE}" if agent.tls else "",
            ],
        )
    )
    ca_initrd = (
        f"initrd --name ca.cpio {agent.base_url}/agent/ca.cpio || goto failed\n"
        if agent.tls
        else ""
    )
    return (
        "#!ipxe\n"
        f"echo BMI: {_say(name)}: {_say(action.reason)}\n"
        f"kernel {agent.base_url}/agent/vmlinuz {args} || goto failed\n"
        f"initrd --name initrd {agent.base_url}/agent/initrd || goto failed\n"
        f"{ca_initrd}"
        "boot || goto failed\n"
        ":failed\n"
        f"echo BMI: could not boot the agent; asking again in {action.retry_seconds}s\n"
        f"sleep {action.retry_seconds}\n"
        f"chain --replace --autofree {retry_url}\n"
    )


def render(action: BootAction, retry_url: str, agent: AgentBoot | None = None) -> str:
    name = action.node.name if action.node else "unknown node"
    if action.kind is BootKind.AGENT:
        if agent is None:  # no agent image configured: the node cannot be helped now
            return refusal(f"{name}: the agent image is not available on this server")
        return render_agent(action, retry_url, agent)
    if action.kind is BootKind.RETRY:
        return (
            "#!ipxe\n"
            f"echo BMI: {_say(name)}: {_say(action.reason)}; asking again in "
            f"{action.retry_seconds}s\n"
            ":again\n"
            f"sleep {action.retry_seconds}\n"
            f"chain --replace --autofree {retry_url} || goto again\n"
        )
    if action.kind is BootKind.SANBOOT and action.target is not None:
        target = action.target
        uris = " ".join(iscsi_uri(p, target.iqn) for p in action.portals)
        return (
            "#!ipxe\n"
            f"echo BMI: {_say(name)}: booting its disk {target.iqn}\n"
            f"set initiator-iqn {target.initiator_iqn}\n"
            f"set username {target.chap_user}\n"
            f"set password {target.chap_secret}\n"
            f"sanboot {uris} || goto failed\n"
            ":failed\n"
            "echo BMI: sanboot failed\n"
            "exit 1\n"
        )
    return f"#!ipxe\necho BMI: {_say(name)}: {_say(action.reason)}; booting the next device\nexit\n"


def refusal(reason: str) -> str:
    return f"#!ipxe\necho BMI: {_say(reason)}\nexit\n"


def retry_query(mac: str, fields: dict[str, str]) -> str:
    """The query a node asks again with, rebuilt from validated values only."""
    params = {"mac": mac}
    params.update({f"{k}_hex": v.encode().hex() for k, v in fields.items() if v})
    return urlencode(params)
