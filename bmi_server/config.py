"""Server settings: defaults, overridden by a TOML file, overridden by BMI_* variables."""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path

from .core.errors import InvalidArgument
from .core.models import Credentials, QuotaAmounts
from .core.quotas import DEFAULT_LIMITS, MAX_LIMIT
from .settings_source import coerced, layered_values

ISOLATORS = ("standalone", "hil")
TGT_ADMINS = ("socket", "tgtadm")
DISCOVERY_MODES = ("wait", "inventory")
TARGET_MODES = ("local", "gateways")


def _default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/bmi")
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state")) / "bmi"


@dataclass
class Settings:
    listen: str = "127.0.0.1:50051"
    state_dir: Path = field(default_factory=_default_state_dir)
    # Empty: SQLite in state_dir.
    database_url: str = field(default="", repr=False)  # may hold a password
    # Longest wait for the database: SQLite's write lock (held by another process), a
    # PostgreSQL connection. Then the call fails with UNAVAILABLE, nothing changed.
    database_timeout_seconds: float = 5.0
    # Bring the database's schema to this release's at start (the first replica to start
    # does it, under a lock; the others wait). False: the server refuses a database that
    # is not there, and `bmi-server admin db upgrade` does it.
    database_auto_upgrade: bool = True
    # Empty: BMI runs its own one-node Ceph cluster, kept in state_dir/ceph (data, keys and
    # monitor port survive restarts); its OSD is a sparse file of at most
    # embedded_ceph_bytes (bytes or a size such as "100G"; fixed when the cluster is made).
    ceph_conf: str = ""
    embedded_ceph_bytes: int = 100 << 30
    ceph_pool: str = "rbd"
    ceph_client: str = "client.admin"
    # The ceph.conf tgtd's rbd backing store opens disks with (bsopts conf=). Empty:
    # ceph_conf. A copy with contrib/ceph-tgt.conf's [client] section halves what each
    # exported disk costs tgtd in threads (docs/capacity.md).
    tgt_ceph_conf: str = ""
    # The Ceph user tgtd's rbd backing store opens disks as (bsopts id=; "client." may be
    # left out): one with `profile rbd` on ceph_pool only is enough (docs/operator-guide.md).
    # Empty: tgt's default, client.admin. The server's own cluster (no ceph_conf) uses
    # client.bmi-tgt.
    tgt_rbd_user: str = ""
    # Longest wait for one Ceph operation (librados osd/mon op and mount timeouts): an
    # unreachable cluster fails the call with UNAVAILABLE instead of hanging it. Keep it
    # well under clients' deadlines (30 s for the bmi CLI); a failed step and its
    # rollback take up to twice this.
    ceph_timeout_seconds: int = 10
    # Empty: state_dir/tokens (created with one admin token on first start).
    token_file: str = ""
    # TLS for the gRPC API: the server's certificate chain and key (PEM files). With a
    # client CA too, callers must present a certificate it signed (mutual TLS). Without a
    # certificate the API is plaintext, which only a loopback `listen` address allows
    # unless allow_plaintext is set (development stacks listen on loopback).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    allow_plaintext: bool = False
    # CA certificate(s) the node agent verifies the server with when TLS is on; served to
    # nodes as an extra initrd. Empty: agents cannot reach a TLS server.
    agent_ca_file: str = ""
    # gRPC admission control (docs/operator-guide.md, "Serving capacity"): unary calls
    # running at once, more waiting for one of those (past that: RESOURCE_EXHAUSTED with a
    # retry-after-ms hint), and long-lived streams open at once (WatchNodes, WatchTargets,
    # uploads, health Watch, reflection), in all and per caller. Streams never take the
    # unary calls' capacity.
    workers: int = 16
    max_queued_rpcs: int = 64
    max_streams: int = 256
    max_streams_per_caller: int = 32
    # Uploaded images: the largest virtual size accepted (raw size or qcow2 virtual size;
    # 2 TiB), the longest a qcow2 conversion may run, and the free space the upload spool
    # (state_dir/spool) always leaves on its file system.
    max_image_virtual_bytes: int = 2 << 40
    image_convert_timeout_seconds: float = 1800.0
    spool_reserve_bytes: int = 1 << 30
    # Images imported from a URL (ImportImage source_url): the hosts the server may fetch
    # from, comma-separated: names, *.domain, IP addresses or networks. Empty: URL import
    # is off. Loopback, link-local and this server's own addresses are refused unless an
    # address or network entry lists them. Then the schemes allowed (http, https), the
    # largest file fetched (bytes or a size such as "50G"), the connect and read
    # timeouts (per socket operation), the longest one import may take, and how many
    # redirects (each to an allowed host) are followed.
    url_import_allowed_hosts: str = ""
    url_import_schemes: str = "https"
    url_import_max_bytes: int = 2 << 40
    url_import_connect_timeout_seconds: float = 10.0
    url_import_read_timeout_seconds: float = 60.0
    url_import_timeout_seconds: float = 21600.0
    url_import_max_redirects: int = 5
    # "text" or "json" (one object per line, with the request id of the RPC).
    log_format: str = "text"
    # Prometheus /metrics (host:port); empty: not served.
    metrics_listen: str = ""
    # iPXE fetches boot scripts here (HTTP).
    http_listen: str = "127.0.0.1:8080"
    # How long an HTTP connection may wait for (the first byte of) a request, how long a
    # request's head may then take to arrive (and each response write), and how many
    # connections may be open at once (each holds a thread; more are answered 503 at once,
    # and iPXE's chain script retries).
    http_idle_timeout_seconds: float = 5.0
    http_read_timeout_seconds: float = 10.0
    http_max_connections: int = 128
    # A tgtd you run to export disks through: its portal (host:port) and tgtadm control
    # number. Empty portal: BMI runs its own tgtd (state_dir/tgtd), listening on tgt_listen
    # (host:port; empty: where it listened before, or a free port on 127.0.0.1 the first
    # time). Set one or the other, not both.
    tgt_portal: str = ""
    tgt_control: int = 0
    tgt_listen: str = ""
    # How targets are managed: "socket" (speak tgtd's control socket, as tgtadm does, with
    # no process per call) or "tgtadm" (run the tgtadm command; the fallback).
    tgt_admin: str = "socket"
    # Portals nodes are told to log in through (comma-separated); default: tgt_portal.
    # With several tgtd processes: one group per process, separated by ';', or one group
    # (process i: each port + i).
    advertised_portals: str = ""
    # How many tgtd processes export this host's targets (each its own portal, control
    # socket, management thread). 0: BMI's own tgtds (no tgt_portal) two per core, 2..8;
    # tgtds you run, one per portal listed in tgt_portal. tgtds you run: list one portal
    # per process in tgt_portal, or one (process i on its port + i); process i's control
    # number is tgt_control + i (contrib/systemd/tgtd@.service). Targets never move:
    # lowering it leaves the processes beyond it running until their targets are gone.
    tgtd_processes: int = 0
    # Who runs the iSCSI targets: "local" (this server drives tgtd through tgtadm: one host)
    # or "gateways" (bmi-gateway daemons on gateway hosts follow the targets the server
    # keeps in the database; tgt_* and advertised_portals are then unused).
    target_mode: str = "local"
    # Gateway mode: how many gateways export each disk (multipath), how often gateways
    # heartbeat and after how long without one a gateway counts as down, and how long a
    # provisioning waits for a gateway to report its target applied (or removed).
    gateway_replicas: int = 2
    gateway_heartbeat_seconds: float = 5.0
    gateway_expiry_seconds: float = 15.0
    gateway_apply_timeout_seconds: float = 30.0
    # Gateway credentials, "<token> <gateway name>" a line. Empty: state_dir/gateway-tokens.
    gateway_token_file: str = ""
    # How long a node that is not ready to boot waits before asking again.
    discovery_retry_seconds: int = 30
    # Rate limits of /boot.ipxe (token buckets; rate 0: no limit): per node (MAC), and per
    # source address for MACs no node has (each would record a new discovered node). The
    # discovery burst lets a whole room power on at once, even behind one relay address.
    boot_rate_per_second: float = 1.0
    boot_burst: int = 10
    discovery_rate_per_second: float = 50.0
    discovery_burst: int = 2000
    # How often booting nodes are checked for an iSCSI login.
    session_poll_seconds: float = 2.0
    # How often the sessions on every node's target are listed (one listing of all targets)
    # and the sessions seen and ended recorded on the nodes (by one replica at a time).
    session_sweep_seconds: float = 10.0
    # How often the targets tgtd should have are checked (re-created after a tgtd restart).
    target_audit_seconds: float = 30.0
    # Several replicas on one PostgreSQL database: this server's name among them (stable
    # across restarts; empty: <hostname>:<port of listen>), how long its lease lasts without
    # a heartbeat (others repair its in-flight work after that), and how often each replica
    # tries to reconcile (repair work whose owner's lease expired; one replica at a time).
    replica_name: str = ""
    replica_lease_seconds: float = 30.0
    reconcile_seconds: float = 60.0
    # Unknown nodes at PXE boot: "wait" (ask again until enrolled and provisioned) or
    # "inventory" (boot the node agent, which reports their hardware and waits for a plan).
    discovery_mode: str = "wait"
    # The node agent's vmlinuz + initrd (`make agent-image`), served at /agent/vmlinuz and
    # /agent/initrd. Empty: build/agent-image in the source tree.
    agent_image_dir: str = ""
    # host:port agents reach the gRPC API at. Empty: the host nodes fetched their boot
    # script from (HTTP Host header), with the port of `listen`.
    agent_server: str = ""
    # Kernel arguments for the agent besides the bmi.* ones (console, verbosity).
    agent_kernel_args: str = "console=ttyS0 quiet"
    # Kernel arguments the agent adds for the OS kernel it starts (kexec), after the
    # image's own and the agent's console=: e.g. no_timer_check for virtual machines,
    # whose IO-APIC timer check can fail in a kexec'd kernel on a busy host.
    os_kernel_args: str = ""
    # How long an agent's one-boot token is valid; how often a waiting agent heartbeats;
    # how often it tries to attach and pivot, and how long it waits between tries.
    agent_token_ttl_seconds: int = 1800
    agent_heartbeat_seconds: int = 10
    agent_attach_attempts: int = 3
    agent_retry_delay_seconds: int = 5
    # What every project may hold unless an admin set its own limits (SetQuota, `bmi quota
    # set`): the sum of the virtual sizes of its images and disks (bytes, or a size such as
    # "100T" or "500G": powers of 1024), and how many images and disks. 0: no limit.
    quota_bytes: int = DEFAULT_LIMITS.size_bytes
    quota_images: int = DEFAULT_LIMITS.images
    quota_disks: int = DEFAULT_LIMITS.disks
    # Who owns which node, and the provisioning network: "standalone" (nodes enrolled in
    # BMI's own database, tokens from token_file, no network changes) or "hil".
    isolator: str = "standalone"
    # Standalone: power-cycle command per node name ("*" for any other node); "{node}" is
    # replaced by the node's name. A TOML table, or a JSON object in BMI_POWER_COMMANDS.
    power_commands: dict[str, str] = field(default_factory=dict)
    # HIL: its URL (e.g. http://hil:5000), BMI's own HIL account (used for work no caller
    # asked for, such as reconcile), the network boot NICs are on while provisioned, and
    # the label of the NIC nodes boot from (empty: the NIC BMI saw PXE-boot, else the
    # one whose label sorts first).
    hil_url: str = ""
    hil_user: str = ""
    hil_password: str = field(default="", repr=False)
    hil_password_file: str = ""  # read instead of hil_password when set
    hil_provisioning_network: str = ""
    hil_boot_nic: str = ""
    # How long a caller's HIL credentials stay trusted after HIL accepted them.
    hil_auth_cache_seconds: float = 60.0
    # How long HIL's list of a project's nodes is reused for tenants' listings (BMI's own
    # take and give back show at once; changes made in HIL directly within this time).
    hil_membership_cache_seconds: float = 5.0
    # Per HTTP request to HIL, and for a network change to finish (HIL takes ~1-3 s).
    hil_timeout_seconds: float = 10.0
    hil_action_timeout_seconds: float = 60.0

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'bmi.sqlite3'}"

    @property
    def sqlite_files(self) -> list[Path]:
        """The SQLite database's file and the ones SQLite keeps beside it; none for
        PostgreSQL or an in-memory database."""
        from sqlalchemy.engine import make_url

        url = make_url(self.database)
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            return []
        db = Path(url.database)
        return [db, *(db.with_name(db.name + side) for side in ("-wal", "-shm", "-journal"))]

    @property
    def replica(self) -> str:
        if self.replica_name:
            return self.replica_name
        return f"{socket.gethostname()}:{self.listen.rpartition(':')[2]}"

    @property
    def tokens_path(self) -> Path:
        return Path(self.token_file) if self.token_file else self.state_dir / "tokens"

    @property
    def gateway_tokens_path(self) -> Path:
        return (Path(self.gateway_token_file) if self.gateway_token_file
                else self.state_dir / "gateway-tokens")

    @property
    def portals(self) -> list[str]:
        return [p.strip() for p in self.advertised_portals.replace(";", ",").split(",")
                if p.strip()]

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"

    @property
    def quota_defaults(self) -> QuotaAmounts:
        return QuotaAmounts(
            size_bytes=self.quota_bytes, images=self.quota_images, disks=self.quota_disks
        )

    @property
    def ceph_client_record(self) -> Path:
        """The address of this server's Ceph client, kept to fence it after a crash."""
        return self.state_dir / "ceph-client"

    def hil_account(self) -> Credentials:
        """BMI's own HIL credentials; InvalidArgument if HIL mode lacks a setting."""
        missing = [
            name
            for name in ("hil_url", "hil_user", "hil_provisioning_network")
            if not getattr(self, name)
        ]
        if not (self.hil_password or self.hil_password_file):
            missing.append("hil_password (or hil_password_file)")
        if missing:
            raise InvalidArgument(f"isolator = \"hil\" needs {', '.join(missing)}")
        password = self.hil_password
        if self.hil_password_file:
            try:
                password = Path(self.hil_password_file).read_text().strip()
            except OSError as exc:
                raise InvalidArgument(
                    f"hil_password_file {self.hil_password_file}: {exc.strerror or exc}"
                ) from None
        return Credentials(self.hil_user, password)


def load_settings(config_file: str | None = None, env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ) if env is None else env
    settings = Settings()
    names = [option.name for option in fields(Settings)]
    values = layered_values("server", "BMI_", names, config_file or env.get("BMI_CONFIG"), env)
    for option in fields(Settings):
        if option.name in values:
            raw = values[option.name]
            if option.name == "state_dir":
                raw = Path(str(raw))
            elif option.name in ("quota_bytes", "embedded_ceph_bytes", "url_import_max_bytes"):
                raw = parse_size(option.name, raw)
            elif option.name == "power_commands" and isinstance(raw, str):
                try:
                    raw = json.loads(raw) if raw.strip() else {}
                except ValueError:
                    raise InvalidArgument("BMI_POWER_COMMANDS must be a JSON object") from None
            else:
                raw = coerced(option.name, option.type, raw)
            setattr(settings, option.name, raw)
    if settings.discovery_mode not in DISCOVERY_MODES:
        raise InvalidArgument(f"discovery_mode must be one of {', '.join(DISCOVERY_MODES)}")
    if settings.tgt_admin not in TGT_ADMINS:
        raise InvalidArgument(f"tgt_admin must be one of {', '.join(TGT_ADMINS)}")
    if settings.target_mode not in TARGET_MODES:
        raise InvalidArgument(f"target_mode must be one of {', '.join(TARGET_MODES)}")
    if settings.isolator not in ISOLATORS:
        raise InvalidArgument(f"isolator must be one of {', '.join(ISOLATORS)}")
    if settings.session_poll_seconds <= 0 or settings.session_sweep_seconds <= 0:
        raise InvalidArgument("session_poll_seconds and session_sweep_seconds must be positive")
    if settings.replica_lease_seconds <= 0 or settings.reconcile_seconds <= 0:
        raise InvalidArgument("replica_lease_seconds and reconcile_seconds must be positive")
    if not isinstance(settings.power_commands, dict):
        raise InvalidArgument("power_commands must be a table of node name = command")
    if settings.tgt_portal and settings.tgt_listen:
        raise InvalidArgument(
            "tgt_portal names a tgtd you run, tgt_listen where BMI's own tgtd listens: "
            "set one of them, not both")
    if not 0 <= settings.tgtd_processes <= 64:
        raise InvalidArgument("tgtd_processes must be 0 (chosen from the cores) to 64")
    for name in ("tgt_portal", "tgt_listen"):
        values = getattr(settings, name).split(",") if name == "tgt_portal" else \
            [settings.tgt_listen]
        for value in (v.strip() for v in values):
            host, sep, port = value.rpartition(":")
            if value and (not sep or not host or not port.isdigit()):
                raise InvalidArgument(f"{name} must be host:port, not {value!r}")
            if (value and settings.target_mode == "local"
                    and host in ("0.0.0.0", "[::]", "::") and not settings.portals):
                raise InvalidArgument(
                    f"{name} {value} listens on every address: set advertised_portals to "
                    "the address(es) nodes reach it at")
    if min(settings.workers, settings.max_streams, settings.max_streams_per_caller) < 1 \
            or settings.max_queued_rpcs < 0:
        raise InvalidArgument("workers, max_streams and max_streams_per_caller must be at "
                              "least 1, max_queued_rpcs at least 0")
    if (settings.http_idle_timeout_seconds <= 0 or settings.http_read_timeout_seconds <= 0
            or settings.http_max_connections < 1):
        raise InvalidArgument("http_*_timeout_seconds must be positive and "
                              "http_max_connections at least 1")
    if settings.embedded_ceph_bytes < 1 << 30:
        raise InvalidArgument("embedded_ceph_bytes must be at least 1G")
    for name in ("quota_bytes", "quota_images", "quota_disks"):
        if not 0 <= getattr(settings, name) <= MAX_LIMIT:
            raise InvalidArgument(f"{name} must be 0 (no limit) or positive")
    _check_url_import(settings)
    return settings


def _check_url_import(settings: Settings) -> None:
    """Refuse bad URL import settings at start, not at the first import."""
    from .adapters.url_guard import UrlPolicy  # pure parsing; no network at start

    UrlPolicy(settings.url_import_allowed_hosts, settings.url_import_schemes)
    for name in ("url_import_max_bytes", "url_import_connect_timeout_seconds",
                 "url_import_read_timeout_seconds", "url_import_timeout_seconds"):
        if getattr(settings, name) <= 0:
            raise InvalidArgument(f"{name} must be positive")
    if settings.url_import_max_redirects < 0:
        raise InvalidArgument("url_import_max_redirects must be 0 or more")


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGTPE]?)(?:i?B)?", re.IGNORECASE)


def parse_size(name: str, raw: object) -> int:
    """Bytes from an integer or a size such as "100T", "500GiB", "1.5T" (powers of 1024)."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    match = _SIZE.fullmatch(str(raw).strip())
    if match is None:
        raise InvalidArgument(f"{name} must be a number of bytes or a size like 500G, not {raw!r}")
    number, unit = match.groups()
    return int(float(number) * 1024 ** " KMGTPE".index(unit.upper() or " "))
