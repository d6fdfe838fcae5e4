"""Transport security settings: TLS files, mutual TLS, and where plaintext is allowed."""

from __future__ import annotations

import pytest

from bmi_server.api.tls import is_loopback, transport_security
from bmi_server.config import load_settings
from bmi_server.core.errors import InvalidArgument

CERT = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = b"-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"


@pytest.fixture
def files(tmp_path):
    (tmp_path / "cert.pem").write_bytes(CERT)
    (tmp_path / "key.pem").write_bytes(KEY)
    (tmp_path / "ca.pem").write_bytes(CERT)
    return {name: str(tmp_path / f"{name}.pem") for name in ("cert", "key", "ca")}


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1:50051", True), ("127.8.0.1:1", True), ("[::1]:50051", True),
    ("localhost:50051", True), ("0.0.0.0:50051", False), ("[::]:50051", False),
    ("192.0.2.10:50051", False), ("bmi.example.org:50051", False),
])  # fmt: skip
def test_loopback_addresses(address, loopback):
    assert is_loopback(address) is loopback


def test_plaintext_only_on_loopback_unless_allowed():
    assert not transport_security("127.0.0.1:50051").tls
    with pytest.raises(InvalidArgument, match="allow_plaintext"):
        transport_security("0.0.0.0:50051")
    assert not transport_security("0.0.0.0:50051", allow_plaintext=True).tls


def test_tls_and_mutual_tls(files):
    server_only = transport_security("0.0.0.0:1", files["cert"], files["key"])
    assert server_only.tls and not server_only.mutual
    assert server_only.description == f"TLS (certificate {files['cert']})"
    mutual = transport_security("0.0.0.0:1", files["cert"], files["key"], files["ca"])
    assert mutual.tls and mutual.mutual and mutual.description.startswith("mutual TLS")


@pytest.mark.parametrize(("cert", "key", "ca", "message"), [
    ("cert", "", "", "set both or neither"),
    ("", "key", "", "set both or neither"),
    ("", "", "ca", "tls_client_ca_file needs"),
    ("cert", "missing", "", "tls_key_file .*missing.pem: No such file"),
    ("cert", "cert", "", "no PEM PRIVATE KEY"),
    ("key", "key", "", "no PEM CERTIFICATE"),
])  # fmt: skip
def test_bad_tls_settings_are_clear_errors(files, tmp_path, cert, key, ca, message):
    def path(name: str) -> str:
        return files.get(name, str(tmp_path / f"{name}.pem")) if name else ""

    with pytest.raises(InvalidArgument, match=message):
        transport_security("127.0.0.1:1", path(cert), path(key), path(ca))


def test_boolean_settings_from_environment():
    assert load_settings(env={"BMI_ALLOW_PLAINTEXT": "true"}).allow_plaintext is True
    assert load_settings(env={"BMI_ALLOW_PLAINTEXT": "0"}).allow_plaintext is False
    with pytest.raises(InvalidArgument, match="allow_plaintext must be true or false"):
        load_settings(env={"BMI_ALLOW_PLAINTEXT": "maybe"})


def test_settings_repr_hides_passwords():
    settings = load_settings(env={"BMI_DATABASE_URL": "postgresql+psycopg://bmi:s3cret@db/bmi",
                                  "BMI_HIL_PASSWORD": "hil-s3cret"})
    assert "s3cret" not in repr(settings)


def test_a_number_setting_that_is_no_number_is_a_clear_error():
    with pytest.raises(InvalidArgument, match="setting workers must be a number"):
        load_settings(env={"BMI_WORKERS": "many"})
