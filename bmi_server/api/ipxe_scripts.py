"""iPXE scripts for the boot decisions. Only validated, normalised values reach them."""

from __future__ import annotations

import re
from urllib.parse import urlencode

from ..core.boot import BootAction, BootKind

_UNSAFE = re.compile(r"[^A-Za-z0-9 .,:;/()_=+-]")


def _say(text: str) -> str:
    # iPXE expands ${...} anywhere in a line: nothing from outside may carry '$' or '{'.
    return _UNSAFE.sub("?", text)[:200]


def iscsi_uri(portal: str, iqn: str, lun: int = 1) -> str:
    host, _, port = portal.rpartition(":")
    return f"iscsi:{host}::{port}:{lun}:{iqn}"


def render(action: BootAction, retry_url: str) -> str:
    name = action.node.name if action.node else "unknown node"
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
