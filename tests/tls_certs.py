"""Throwaway certificate authorities and certificates for TLS tests, made with the
openssl CLI at test time (no key is ever committed)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


class CertificateAuthority:
    """A self-signed CA in ``folder`` (``<name>-ca.pem``) that issues certificates."""

    def __init__(self, folder: Path, name: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.name = name
        self.cert = folder / f"{name}-ca.pem"
        self.key = folder / f"{name}-ca.key"
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", str(self.key), "-out", str(self.cert), "-days", "2",
                 "-subj", f"/CN={name} test CA", cwd=folder)  # fmt: skip

    def issue(
        self, common_name: str, *, server: bool, addresses: tuple[str, ...] = ("127.0.0.1",)
    ) -> Pair:
        """A certificate for a server (SAN: ``addresses`` and localhost) or a client."""
        base = self.folder / f"{self.name}-{common_name}"
        key, csr, cert = (base.with_suffix(s) for s in (".key", ".csr", ".pem"))
        ext = base.with_suffix(".ext")
        ext.write_text(
            f"subjectAltName = {', '.join(f'IP:{a}' for a in addresses)}, DNS:localhost\n"
            "extendedKeyUsage = serverAuth\n"
            if server
            else "extendedKeyUsage = clientAuth\n"
        )
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={common_name}",
                 cwd=self.folder)  # fmt: skip
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey",
                 str(self.key), "-CAcreateserial", "-out", str(cert), "-days", "2",
                 "-extfile", str(ext), cwd=self.folder)  # fmt: skip
        return Pair(cert, key)
