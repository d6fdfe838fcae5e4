"""bmi-gateway settings: defaults, overridden by the [gateway] table of a TOML file,
overridden by BMI_GATEWAY_<NAME> environment variables."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path

from bmi_server.adapters.tgt.layout import advertised_groups, process_portals, split_list
from bmi_server.config import TGT_ADMINS
from bmi_server.core.errors import InvalidArgument
from bmi_server.core.gateways import check_gateway_name, check_portals
from bmi_server.settings_source import coerced, layered_values


def _default_name() -> str:
    return re.sub(r"[^a-z0-9.-]", "-", socket.gethostname().split(".")[0].lower()) or "gateway"


@dataclass
class GatewaySettings:
    # This gateway's name, as its credential in the server's gateway token file names it.
    name: str = field(default_factory=_default_name)
    # The BMI server's gRPC address (any replica).
    server: str = "127.0.0.1:50051"
    # TLS to the server (implied by any of the files): the CA its certificate is signed by
    # (empty: the system's CAs), and this gateway's certificate and key when the server
    # requires client certificates (tls_client_ca_file there).
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    # File holding this gateway's token (one line); BMI_GATEWAY_TOKEN may give it instead.
    token_file: str = "/etc/bmi/gateway-token"
    token: str = field(default="", repr=False)
    # The local tgtd: its portal (host:port) and tgtadm control number (Debian's: 0).
    # Several tgtd processes (tgtd_processes): one portal per process, comma-separated, or
    # one (process i on its port + i); process i's control number is tgt_control + i
    # (contrib/systemd/tgtd@.service).
    tgt_portal: str = "0.0.0.0:3260"
    tgt_control: int = 0
    # How many tgtd processes export this gateway's targets (0: one per portal listed in
    # tgt_portal). Each target is placed on the least loaded and stays there; where, is
    # kept in placement_file.
    tgtd_processes: int = 0
    placement_file: str = "/var/lib/bmi-gateway/placements.json"
    # How the gateway drives tgtd: "socket" (tgtd's control socket, as tgtadm speaks it,
    # no process per call: a target converges in ~0.04 s instead of ~0.15 s) or "tgtadm".
    tgt_admin: str = "socket"
    # Portals nodes reach this gateway at, comma-separated. Empty: tgt_portal. Several
    # tgtd processes: one group per process separated by ';', or one group (process i:
    # each port + i).
    advertised_portals: str = ""
    # Ceph as tgtd's rbd backing store sees it, and the pool BMI's volumes are in.
    ceph_conf: str = "/etc/ceph/ceph.conf"
    ceph_pool: str = "rbd"
    rbd_user: str = ""
    # Targets under this prefix are BMI's (created and removed by the gateway); others
    # are never touched. Must match the server's.
    iqn_prefix: str = "iqn.2026-11.org.moc.bmi:"
    # How often the local tgtd is compared with the desired targets (and re-converged,
    # e.g. after a tgtd restart), besides on every change.
    audit_seconds: float = 10.0
    # Longest wait between reconnection attempts to the server (backoff doubles up to it).
    reconnect_max_seconds: float = 30.0

    @property
    def processes(self) -> int:
        return self.tgtd_processes or len(split_list(self.tgt_portal))

    def process_endpoints(self, count: int | None = None) -> list[tuple[str, int]]:
        """(portal, control number) of each of ``count`` (default: ``processes``) tgtds."""
        portals = process_portals(split_list(self.tgt_portal), count or self.processes)
        return [(p, self.tgt_control + i) for i, p in enumerate(portals)]

    def advertised(self, count: int | None = None) -> list[list[str]]:
        """What nodes are told for each tgtd process."""
        return advertised_groups(self.advertised_portals,
                                 [p for p, _ in self.process_endpoints(count)])

    @property
    def portals(self) -> tuple[str, ...]:
        """Every portal of the gateway (its heartbeat's)."""
        return check_portals(p for group in self.advertised() for p in group)

    def credential(self) -> str:
        """The token, from BMI_GATEWAY_TOKEN or token_file; InvalidArgument if neither."""
        if self.token:
            return self.token
        try:
            token = Path(self.token_file).read_text().strip()
        except OSError as exc:
            raise InvalidArgument(
                f"gateway token file {self.token_file}: {exc.strerror or exc}") from None
        if not token:
            raise InvalidArgument(f"gateway token file {self.token_file} is empty")
        return token


def load_gateway_settings(config_file: str | None = None,
                          env: dict[str, str] | None = None) -> GatewaySettings:
    env = dict(os.environ) if env is None else env
    settings = GatewaySettings()
    names = [option.name for option in fields(GatewaySettings)]
    path = config_file or env.get("BMI_GATEWAY_CONFIG")
    values = layered_values("gateway", "BMI_GATEWAY_", names, path, env)
    known = {f.name: f for f in fields(GatewaySettings)}
    for name, raw in values.items():
        if name not in known:
            raise InvalidArgument(f"unknown gateway setting {name!r}")
        setattr(settings, name, coerced(name, known[name].type, raw, "gateway setting"))
    check_gateway_name(settings.name)
    if settings.tgt_admin not in TGT_ADMINS:
        raise InvalidArgument(f"tgt_admin must be one of {', '.join(TGT_ADMINS)}")
    if bool(settings.cert_file) != bool(settings.key_file):
        raise InvalidArgument("cert_file and key_file go together")
    if not 0 <= settings.tgtd_processes <= 64:
        raise InvalidArgument("tgtd_processes must be 0 (one per tgt_portal) to 64")
    settings.portals  # noqa: B018 - validates them now rather than at the first heartbeat
    return settings
