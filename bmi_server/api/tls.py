"""Transport security of the gRPC API: TLS with a server certificate, optionally mutual
TLS (client certificates signed by a given CA), or plaintext where that is allowed."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc

from ..core.errors import InvalidArgument


@dataclass(frozen=True)
class TransportSecurity:
    """What the gRPC listener uses; built from settings by :func:`transport_security`."""

    cert_chain: bytes = b""
    private_key: bytes = b""
    client_ca: bytes = b""
    description: str = "plaintext"

    @property
    def tls(self) -> bool:
        return bool(self.cert_chain)

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca or None,
            require_client_auth=self.mutual,
        )

    def add_port(self, server: grpc.Server, address: str) -> int:
        """Listens on ``address``; the bound port, 0 if it could not be bound."""
        if self.tls:
            return server.add_secure_port(address, self.credentials())
        return server.add_insecure_port(address)


def _read_pem(setting: str, path: str, marker: bytes) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"{setting} {path}: {exc.strerror or exc}") from None
    if marker not in data:
        raise InvalidArgument(f"{setting} {path}: no PEM {marker.decode()} block in it")
    return data


def is_loopback(address: str) -> bool:
    """True for host:port addresses only this machine can reach."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def transport_security(
    listen: str,
    cert_file: str = "",
    key_file: str = "",
    client_ca_file: str = "",
    *,
    allow_plaintext: bool = False,
) -> TransportSecurity:
    """TLS from the PEM files named; plaintext only on loopback or when allowed.

    Raises InvalidArgument (before anything listens) for a half-given pair, an unreadable
    file, or plaintext on an address other machines reach without ``allow_plaintext``.
    """
    if bool(cert_file) != bool(key_file):
        raise InvalidArgument("tls_cert_file and tls_key_file go together: set both or neither")
    if not cert_file:
        if client_ca_file:
            raise InvalidArgument("tls_client_ca_file needs tls_cert_file and tls_key_file")
        if not (allow_plaintext or is_loopback(listen)):
            raise InvalidArgument(
                f"listen = {listen!r} reaches other machines: set tls_cert_file and "
                "tls_key_file, or allow_plaintext = true to serve without TLS"
            )
        return TransportSecurity()
    cert = _read_pem("tls_cert_file", cert_file, b"CERTIFICATE")
    key = _read_pem("tls_key_file", key_file, b"PRIVATE KEY")
    if not client_ca_file:
        return TransportSecurity(cert, key, description=f"TLS (certificate {cert_file})")
    client_ca = _read_pem("tls_client_ca_file", client_ca_file, b"CERTIFICATE")
    return TransportSecurity(
        cert,
        key,
        client_ca,
        description=f"mutual TLS (certificate {cert_file}; client certificates signed by "
        f"{client_ca_file} required)",
    )
