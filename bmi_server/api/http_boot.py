"""HTTP boot endpoint: iPXE asks `GET /boot.ipxe?mac=...` and gets a script.

Malformed requests get 400 and a script that exits, before anything is recorded;
a backing system that is down gets 503 (the chain script retries with backoff).
Connections are bounded in time and number (``http_guard``).
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from ..core.boot import BootPlanner
from ..core.errors import BmiError, InvalidArgument, ResourceExhausted, Unavailable
from ..core.models import Smbios
from ..core.nodes import check_smbios_field, normalise_mac
from ..core.rate_limit import TokenBuckets
from ..cpio import Cpio
from . import ipxe_scripts
from .http_guard import (
    DeadlineReader,
    HttpLimits,
    framing_problem,
    is_disconnect,
    refuse_connection,
)

log = logging.getLogger(__name__)

SMBIOS_FIELDS = ("uuid", "serial", "manufacturer", "product")
MAX_QUERY = 2048
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9a-fA-F:.]+\](:[0-9]{1,5})?")


def parse_boot_query(query: str) -> tuple[str, dict[str, str]]:
    """(mac, smbios fields) from the chain script's query; InvalidArgument if malformed.

    Fields may come plain or hex-encoded (``serial_hex``): iPXE cannot URL-encode
    arbitrary bytes, so the chain script sends free text as hex.
    """
    if len(query) > MAX_QUERY:
        raise InvalidArgument("query too long")
    try:
        params = parse_qs(
            query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=20
        )
    except ValueError as exc:
        raise InvalidArgument(f"malformed query: {exc}") from None
    if any(len(values) > 1 for values in params.values()):
        raise InvalidArgument("a parameter is repeated")
    flat = {k: v[0] for k, v in params.items()}
    mac = flat.get("mac", "")
    if not mac:
        raise InvalidArgument("mac is required")
    fields = {}
    for name in SMBIOS_FIELDS:
        value = flat.get(name, "")
        if f"{name}_hex" in flat:
            try:
                value = bytes.fromhex(flat[f"{name}_hex"]).decode("utf-8")
            except ValueError:
                raise InvalidArgument(f"{name}_hex is not hex-encoded UTF-8") from None
        fields[name] = check_smbios_field(value.strip(), name)
    return mac, fields


# What the agent's kernel and initrd are served as, from AgentImageConfig.image_dir.
AGENT_FILES = {"/agent/vmlinuz": "vmlinuz", "/agent/initrd": "initrd"}
# With TLS, the CA agents verify the server with, as an extra initrd the kernel unpacks
# over the agent's own (nothing in a kernel command line can hold a certificate).
AGENT_CA_PATH = "/agent/ca.cpio"


def ca_initrd(ca_pem: bytes) -> bytes:
    """A cpio archive holding ``ca_pem`` as ipxe_scripts.AGENT_CA_FILE."""
    archive = Cpio()
    parts = ipxe_scripts.AGENT_CA_FILE.strip("/").split("/")
    for depth in range(1, len(parts)):
        archive.add_directory("/".join(parts[:depth]))
    archive.add_file("/".join(parts), ca_pem)
    return archive.finish()


@dataclass(frozen=True)
class AgentImageConfig:
    """The node agent's boot image and how nodes running it reach the gRPC API."""

    image_dir: Path
    grpc_port: int  # of the gRPC listen address, reached at the host nodes used for HTTP
    server: str = ""  # explicit host:port instead
    kernel_args: str = "console=ttyS0 quiet"
    tls: bool = False  # the gRPC API is served with TLS: agents need ca_pem
    ca_pem: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if not ipxe_scripts.KERNEL_ARGS.fullmatch(self.kernel_args):
            raise ValueError(f"agent kernel arguments hold characters iPXE would expand: "
                             f"{self.kernel_args!r}")  # fmt: skip
        if self.server and not _HOST.fullmatch(self.server):
            raise ValueError(f"agent server must be host:port, not {self.server!r}")

    def missing(self) -> list[str]:
        missing = [n for n in AGENT_FILES.values() if not (self.image_dir / n).is_file()]
        return missing + (["agent_ca_file"] if self.tls and not self.ca_pem else [])


@dataclass
class BootRateLimits:
    """Token buckets for /boot.ipxe: one per node (by MAC), and, for MACs no node has
    (each such request would record a new node), one per source address."""

    nodes: TokenBuckets
    sources: TokenBuckets
    # Called with "node" or "source" for every refused request (a metrics counter).
    on_refused: Callable[[str], None] = lambda kind: None

    def for_node(self, mac: str) -> float:
        """Takes a token of this MAC's bucket: 0.0 if served, else the seconds to wait."""
        return self._taken(self.nodes, mac, "node")

    def for_new_node(self, source: str) -> float:
        """Takes a token of this address's bucket, for a MAC no node has yet."""
        return self._taken(self.sources, source, "source")

    def _taken(self, buckets: TokenBuckets, key: str, kind: str) -> float:
        wait = buckets.take(key)
        if wait:
            self.on_refused(kind)
        return wait


class _Handler(BaseHTTPRequestHandler):
    server: BootHttpServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self._reader = DeadlineReader(self.connection, self.server.http_limits)
        self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self) -> None:
        self._reader.expect_request()
        super().handle_one_request()

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        problem = framing_problem(self.headers)
        if problem is None:
            return True
        self.close_connection = True  # what follows on this connection cannot be trusted
        self._reply(HTTPStatus.BAD_REQUEST, ipxe_scripts.refusal(f"bad request: {problem}"),
                    {"Connection": "close"})
        return False

    def end_headers(self) -> None:
        # Writes get a fresh limit of their own (the reads may have used up theirs).
        self.connection.settimeout(self.server.http_limits.read_seconds)
        super().end_headers()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path in AGENT_FILES:
            self._send_file(url.path)
            return
        if url.path == AGENT_CA_PATH and self.server.agent_ca_initrd:
            self._send_bytes(self.server.agent_ca_initrd)
            return
        if url.path == "/chain.ipxe" and self.server.has_chain_script:
            self._reply(HTTPStatus.OK, self.server.chain_script(self._host()))
            return
        if url.path != "/boot.ipxe":
            self._reply(HTTPStatus.NOT_FOUND, ipxe_scripts.refusal("no such script"))
            return
        limits = self.server.limits
        try:
            mac, fields = parse_boot_query(url.query)
            if limits is not None and (wait := limits.for_node(normalise_mac(mac))):
                self._too_many(wait)
                return
            # Checked only for a MAC no node has, as it is about to be recorded.
            admit = None if limits is None else partial(limits.for_new_node, self.client_address[0])
            action = self.server.planner.action_for(mac, Smbios(**fields), admit)
        except ResourceExhausted as exc:
            self._too_many(exc.retry_after)
            return
        except InvalidArgument as exc:
            self._reply(HTTPStatus.BAD_REQUEST, ipxe_scripts.refusal(f"bad request: {exc.message}"))
            return
        except Unavailable as exc:
            log.warning("boot script for %s unavailable: %s", url.query[:100], exc.message)
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, ipxe_scripts.refusal("try again later"))
            return
        except BmiError as exc:
            self._reply(HTTPStatus.CONFLICT, ipxe_scripts.refusal(exc.message))
            return
        except Exception:
            log.exception("boot script for %s failed", url.query[:100])
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, ipxe_scripts.refusal("try again later"))
            return
        query = ipxe_scripts.retry_query(normalise_mac(mac), fields)
        retry_url = f"http://{self._host()}/boot.ipxe?{query}"
        self._reply(HTTPStatus.OK, ipxe_scripts.render(action, retry_url, self._agent_boot()))

    def _too_many(self, wait: float) -> None:
        """429 for a node or source asking too often (nothing was recorded)."""
        self._reply(
            HTTPStatus.TOO_MANY_REQUESTS,
            ipxe_scripts.refusal("too many requests; try again later"),
            {"Retry-After": str(max(1, math.ceil(wait)))},
        )

    def _agent_boot(self) -> ipxe_scripts.AgentBoot | None:
        config = self.server.agent
        if config is None or config.missing():
            return None
        host = self._host()
        hostname = host.rpartition("]")[0] + "]" if host.startswith("[") else host.partition(":")[0]
        return ipxe_scripts.AgentBoot(
            base_url=f"http://{host}",
            server=config.server or f"{hostname}:{config.grpc_port}",
            kernel_args=config.kernel_args,
            tls=config.tls,
        )

    def _send_file(self, path: str) -> None:
        config = self.server.agent
        try:
            if config is None:
                raise FileNotFoundError(path)
            handle = open(config.image_dir / AGENT_FILES[path], "rb")  # noqa: SIM115
        except OSError:
            self._reply(HTTPStatus.NOT_FOUND, "no agent image on this server (make agent-image)\n")
            return
        with handle:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(os.fstat(handle.fileno()).st_size))
            self.end_headers()
            shutil.copyfileobj(handle, self.wfile, 1 << 20)

    def _send_bytes(self, data: bytes) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _host(self) -> str:
        # Echoed into a script: only a plain host[:port] is taken from the request.
        host = self.headers.get("Host", "")
        return host if _HOST.fullmatch(host) else self.server.advertised

    def _reply(
        self, status: HTTPStatus, body: str, headers: dict[str, str] | None = None
    ) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        # Never the query in full at info level: it is harmless, but keep logs small.
        log.debug("%s " + format, self.client_address[0], *args)


class BootHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    # A rack powering on at once must not overflow the listen backlog (default 5): a
    # dropped SYN costs the node a 1 s retransmit, then 3 s, ...
    request_queue_size = 1024
    # How often, at most, a full connection table is logged (a storm would flood the log).
    FULL_LOG_SECONDS = 60.0

    def __init__(
        self,
        address: tuple[str, int],
        planner: BootPlanner,
        chain_template: str | None,
        agent: AgentImageConfig | None = None,
        limits: BootRateLimits | None = None,
        http_limits: HttpLimits | None = None,
    ) -> None:
        """``limits`` None: /boot.ipxe is not rate limited. ``http_limits`` None: the
        defaults of HttpLimits."""
        super().__init__(address, _Handler)
        self.planner = planner
        self.limits = limits
        self.http_limits = http_limits or HttpLimits()
        self._connections = 0
        self._connections_lock = threading.Lock()
        self._full_logged = -math.inf
        # Called for every connection answered 503 at the cap (a metrics counter).
        self.on_connection_refused: Callable[[], None] = lambda: None
        self._chain_template = chain_template
        self.agent = agent
        tls_ca = agent is not None and agent.tls and agent.ca_pem
        self.agent_ca_initrd = ca_initrd(agent.ca_pem) if tls_ca else b""
        self.advertised = f"{address[0]}:{self.server_address[1]}"
        self._thread: threading.Thread | None = None

    @property
    def has_chain_script(self) -> bool:
        return self._chain_template is not None

    def chain_script(self, host: str) -> str:
        return (self._chain_template or "").replace("{{server}}", host)

    @property
    def open_connections(self) -> int:
        return self._connections

    def process_request(self, request, client_address) -> None:
        # Runs in the accepting thread: a connection over the cap costs no thread.
        with self._connections_lock:
            full = self._connections >= self.http_limits.max_connections
            if not full:
                self._connections += 1
        if full:
            self._refused()
            refuse_connection(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started (out of threads): it will not count down
            self._release()
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._connections_lock:
            self._connections -= 1

    def _refused(self) -> None:
        self.on_connection_refused()
        now = time.monotonic()
        if now - self._full_logged >= self.FULL_LOG_SECONDS:
            self._full_logged = now
            log.warning("HTTP boot endpoint has %d connections open (http_max_connections): "
                        "answering more with 503", self.http_limits.max_connections)

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if is_disconnect(exc):
            # A node that reset or dropped its connection: one short line, no traceback.
            log.debug("boot client %s went away: %s", client_address[0], type(exc).__name__)
            return
        log.error("boot request from %s failed", client_address[0], exc_info=exc)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="http-boot", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
