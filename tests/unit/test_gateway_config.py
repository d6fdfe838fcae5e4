"""bmi-gateway settings: file, environment, and refusals of bad values."""

from __future__ import annotations

import pytest

from bmi_gateway.config import load_gateway_settings
from bmi_server.core.errors import InvalidArgument


def test_environment_overrides_the_file(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text('[gateway]\nname = "gw-a"\ntgt_portal = "192.0.2.1:3260"\n')
    settings = load_gateway_settings(str(path), env={
        "BMI_GATEWAY_NAME": "gw-b", "BMI_GATEWAY_TGT_CONTROL": "7",
        "BMI_GATEWAY_ADVERTISED_PORTALS": "198.51.100.1:3260, 198.51.100.2:3260"})
    assert settings.name == "gw-b" and settings.tgt_control == 7
    assert settings.tgt_admin == "socket"  # tgtd's control socket unless told otherwise
    assert settings.portals == ("198.51.100.1:3260", "198.51.100.2:3260")


@pytest.mark.parametrize("env, error", [
    ({"BMI_GATEWAY_NAME": "Gateway_1"}, "gateway name"),
    ({"BMI_GATEWAY_TGT_PORTAL": "192.0.2.1"}, "not host:port"),
    ({"BMI_GATEWAY_AUDIT_SECONDS": "often"}, "must be a number"),
    ({"BMI_GATEWAY_TLS": "maybe"}, "must be true or false"),
    ({"BMI_GATEWAY_CERT_FILE": "/etc/bmi/cert.pem"}, "go together"),
    ({"BMI_GATEWAY_TGT_ADMIN": "ssh"}, "tgt_admin must be one of socket, tgtadm"),
])
def test_bad_settings_are_refused(env, error):
    with pytest.raises(InvalidArgument, match=error):
        load_gateway_settings(None, env={"BMI_GATEWAY_NAME": "gw", **env})


def test_unknown_settings_in_the_file_are_refused(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text('[gateway]\nname = "gw"\nportal = "192.0.2.1:3260"\n')
    with pytest.raises(InvalidArgument, match="unknown gateway setting 'portal'"):
        load_gateway_settings(str(path), env={})


def test_the_token_comes_from_its_file_or_the_environment(tmp_path):
    settings = load_gateway_settings(None, env={"BMI_GATEWAY_NAME": "gw",
                                                "BMI_GATEWAY_TOKEN_FILE": str(tmp_path / "t")})
    with pytest.raises(InvalidArgument, match="gateway token file"):
        settings.credential()
    (tmp_path / "t").write_text("s3cret\n")
    assert settings.credential() == "s3cret"
    settings.token = "from-env"
    assert settings.credential() == "from-env"
