"""Which URLs the server may fetch: the operator's hosts and schemes, checked addresses.

Rules (no server-side request forgery):

- The scheme must be one of ``schemes`` and the host one of ``allowed_hosts``: a name
  (exact, case-insensitive), ``*.example.org`` (any name below it, not the apex), or an
  IP address or network (``10.1.2.3``, ``10.1.0.0/16``, ``[fd00::1]``), which allows URLs
  whose host is written as such an address.
- The host is resolved here, and the fetch connects to the very address checked (no
  second lookup a DNS rebinding could answer differently). Loopback, link-local,
  unspecified, multicast and reserved addresses, and the server's own addresses, are
  refused unless an IP entry lists them; a name resolving to any refused address is
  refused.
- Credentials in a URL are split off for the caller to use; every message shows the
  URL through ``urls.redact`` only.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from bmi_server.core.errors import InvalidArgument, PermissionDenied, Unavailable
from bmi_server.core.urls import SCHEMES, redact

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect, what to ask for."""

    url: str  # without credentials (sent as the request line and Host header)
    shown: str  # for messages (urls.redact)
    scheme: str
    host: str
    port: int
    address: str  # the checked address to connect to
    auth: tuple[str, str] | None = field(default=None, repr=False)

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


def parse_hosts(text: str | Iterable[str]) -> tuple[list[str], list[IpNetwork]]:
    """Setting value (comma-separated, or a list) → (host name patterns, networks)."""
    entries = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    networks: list[IpNetwork] = []
    for raw in entries:
        entry = raw.strip().lower().rstrip(".")
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            continue
        except ValueError:
            pass
        pattern = entry.removeprefix("*.")
        if not pattern or any(c in pattern for c in "/:@*?#[] "):
            raise InvalidArgument(f"url_import_allowed_hosts: {raw.strip()!r} is no host name, "
                                  "*.domain, address or network")
        names.append(entry)
    return names, networks


def default_resolver(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise Unavailable(f"cannot resolve {host}: {e.strerror}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class UrlPolicy:
    def __init__(
        self,
        allowed_hosts: str | Iterable[str],
        schemes: str | Iterable[str] = ("https",),
        *,
        resolver: Resolver = default_resolver,
        own_addresses: Callable[[], set[IpAddress]] | None = None,
    ) -> None:
        self.names, self.networks = parse_hosts(allowed_hosts)
        listed = schemes.split(",") if isinstance(schemes, str) else list(schemes)
        self.schemes = tuple(s.strip().lower() for s in listed if s.strip())
        for scheme in self.schemes:
            if scheme not in SCHEMES:
                raise InvalidArgument(f"url_import_schemes: {scheme!r} is not http or https")
        self._resolve = resolver
        self._own_addresses = own_addresses or local_addresses

    @property
    def enabled(self) -> bool:
        return bool(self.names or self.networks) and bool(self.schemes)

    def check(self, url: str, auth: tuple[str, str] | None = None) -> Target:
        """The URL's target if every rule allows it; PermissionDenied (or InvalidArgument
        for a malformed URL) otherwise. ``auth``: credentials carried over (a redirect
        within one origin); the URL's own user:password@ take precedence."""
        shown = redact(url)
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        host = (parts.hostname or "").rstrip(".")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise InvalidArgument("source_url has an invalid port") from None
        if scheme not in self.schemes:
            raise PermissionDenied(
                f"{shown}: scheme {scheme} is not allowed for URL imports here "
                f"(allowed: {', '.join(self.schemes) or 'none'})"
            )
        literal = _address(host)
        if not self._host_allowed(host, literal):
            raise PermissionDenied(
                f"{shown}: host {host} is not allowed for URL imports "
                "(setting url_import_allowed_hosts)"
            )
        addresses = [literal] if literal is not None else self._resolved(host, port, shown)
        own = self._own_addresses()
        for address in addresses:
            if why := self._refused(address, own):
                raise PermissionDenied(
                    f"{shown}: host {host} resolves to {why} address {address}, which URL "
                    "imports may not reach unless an operator lists it"
                )
        if parts.username is not None:
            auth = (unquote(parts.username), unquote(parts.password or ""))
        netloc = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            netloc += f":{parts.port}"
        bare = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
        return Target(bare, shown, scheme, host, port, str(addresses[0]), auth)

    def _host_allowed(self, host: str, literal: IpAddress | None) -> bool:
        if literal is not None:
            return any(literal in net for net in self.networks)
        name = host.lower()
        for pattern in self.names:
            if pattern.startswith("*."):
                if name.endswith(pattern[1:]) and len(name) > len(pattern) - 1:
                    return True
            elif name == pattern:
                return True
        return False

    def _resolved(self, host: str, port: int, shown: str) -> list[IpAddress]:
        found = []
        for text in self._resolve(host, port):
            address = _address(text.split("%")[0])  # an IPv6 zone is no part of the check
            if address is not None:
                found.append(address)
        if not found:
            raise Unavailable(f"{shown}: {host} has no address")
        return found

    def _refused(self, address: IpAddress, own: set[IpAddress]) -> str:
        """Why ``address`` may not be fetched from ("" if it may)."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if any(address in net for net in self.networks):
            return ""  # listed explicitly by the operator
        for label, bad in (
            ("a loopback", address.is_loopback),
            ("a link-local", address.is_link_local),
            ("an unspecified", address.is_unspecified),
            ("a multicast", address.is_multicast),
            ("a reserved", address.is_reserved),
            ("this server's own", address in own),
        ):
            if bad:
                return label
        return ""


def _address(text: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


_SIOCGIFADDR = 0x8915


def local_addresses() -> set[IpAddress]:
    """Every address of this host's interfaces (IPv4 by ioctl, IPv6 from /proc) and what
    its host name resolves to."""
    found: set[IpAddress] = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _index, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR,
                                     struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on it
            found.add(ipaddress.IPv4Address(packed[20:24]))
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            raw = line.split()[0]
            found.add(ipaddress.IPv6Address(int(raw, 16)))
    except (OSError, ValueError, IndexError):
        pass
    try:
        for text in default_resolver(socket.gethostname(), 0):
            if (address := _address(text.split("%")[0])) is not None:
                found.add(address)
    except Unavailable:
        pass
    return found

