"""contrib/: the example server.toml documents every setting and loads; the systemd unit
restarts on failure and gives the server's graceful stop enough time."""

from __future__ import annotations

import configparser
import dataclasses
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from bmi_server.config import Settings, load_settings
from bmi_server.main import GRACE_SECONDS

REPO = Path(__file__).resolve().parent.parent
SERVER_TOML = REPO / "contrib" / "server.toml"
UNIT = REPO / "contrib" / "bmi-server.service"


def documented_settings() -> set[str]:
    """Keys set in [server], plus those shown commented out (`# key = ...`, `# [server.key]`)."""
    text = SERVER_TOML.read_text()
    keys = set(tomllib.loads(text)["server"])
    keys |= set(re.findall(r"^#\s*([a-z_]+)\s*=", text, flags=re.M))
    keys |= set(re.findall(r"^#\s*\[server\.([a-z_]+)\]", text, flags=re.M))
    return keys


def test_example_config_documents_exactly_the_settings():
    settings = {f.name for f in dataclasses.fields(Settings)}
    documented = documented_settings()
    assert not settings - documented, (
        f"add to contrib/server.toml (with a comment): {sorted(settings - documented)}")
    assert not documented - settings, (
        f"contrib/server.toml names unknown settings: {sorted(documented - settings)}")


def test_example_config_loads():
    settings = load_settings(str(SERVER_TOML), env={})
    assert settings.ceph_conf == "/etc/ceph/ceph.conf"  # never the throwaway cluster
    assert settings.tgt_portal  # never the throwaway tgtd
    assert str(settings.state_dir) == "/var/lib/bmi"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)\s*(s|min)?", value.strip())
    assert match, value
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_unit_stops_gracefully_and_restarts_on_failure():
    service = unit()["Service"]
    assert service["ExecStart"].split()[1:] == ["--config", "/etc/bmi/server.toml"]
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    # In-flight RPCs get GRACE_SECONDS, the background loop as long again.
    assert seconds(service["TimeoutStopSec"]) > 2 * GRACE_SECONDS
    assert service["StateDirectory"] == "bmi"
    assert "/run/tgtd" in service["ReadWritePaths"]  # tgtadm's control socket


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")
def test_unit_is_valid_for_systemd(tmp_path):
    # verify wants ExecStart to exist: point it at a binary that does.
    text = UNIT.read_text().replace("/opt/bmi/bin/bmi-server", shutil.which("true") or "/bin/true")
    path = tmp_path / UNIT.name
    path.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


# -- bmi-gateway ---------------------------------------------------------------------------

GATEWAY_TOML = REPO / "contrib" / "gateway.toml"
GATEWAY_UNIT = REPO / "contrib" / "bmi-gateway.service"


def test_example_gateway_config_documents_exactly_the_settings_and_loads():
    from bmi_gateway.config import GatewaySettings, load_gateway_settings

    text = GATEWAY_TOML.read_text()
    documented = set(tomllib.loads(text)["gateway"])
    documented |= set(re.findall(r"^#\s*([a-z_]+)\s*=", text, flags=re.M))
    settings = {f.name for f in dataclasses.fields(GatewaySettings)}
    assert documented == settings
    loaded = load_gateway_settings(str(GATEWAY_TOML), env={})
    assert loaded.name == "gw-a" and loaded.portals == ("192.0.2.21:3260",)


def test_gateway_unit_restarts_and_may_reach_tgtd():
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(GATEWAY_UNIT.read_text())
    service = parser["Service"]
    assert service["ExecStart"].split()[1:] == ["--config", "/etc/bmi/gateway.toml"]
    assert service["Restart"] == "always"
    assert "/run/tgtd" in service["ReadWritePaths"]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")
def test_gateway_unit_is_valid_for_systemd(tmp_path):
    text = GATEWAY_UNIT.read_text().replace("/opt/bmi/bin/bmi-gateway",
                                            shutil.which("true") or "/bin/true")
    path = tmp_path / GATEWAY_UNIT.name
    path.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def test_tgt_client_profile_is_the_one_throwaway_tgtds_use():
    """contrib/ceph-tgt.conf ships the [client] section BMI's own tgtds run with, and the
    tgtd drop-in the I/O thread count, so what docs/capacity.md measured is what hosts get."""
    from bmi_server.adapters.tgt.ceph_profile import TGT_CLIENT_PROFILE, TGT_IO_THREADS

    shipped = (REPO / "contrib" / "ceph-tgt.conf").read_text()
    assert shipped.endswith(TGT_CLIENT_PROFILE)
    profile = configparser.ConfigParser(interpolation=None)
    profile.read_string(TGT_CLIENT_PROFILE)
    assert profile["client"]["admin socket"] == ""
    assert profile["client"]["ms async op threads"] == "1"
    drop_in = configparser.ConfigParser(strict=False, interpolation=None)
    drop_in.read_string((REPO / "contrib" / "tgt.service.d" / "bmi.conf").read_text())
    exec_start = drop_in["Service"]["ExecStart"].split("\n")[-1].split()
    assert exec_start[exec_start.index("-t") + 1] == str(TGT_IO_THREADS)
    sysctl = dict(line.split(" = ") for line in
                  (REPO / "contrib" / "sysctl.d" / "90-bmi-tgt.conf").read_text().splitlines()
                  if line and not line.startswith("#"))
    assert int(sysctl["kernel.pid_max"]) > 32768


# -- several tgtd processes ----------------------------------------------------------------

TGTD_UNIT = REPO / "contrib" / "systemd" / "tgtd@.service"


def test_tgtd_template_unit_is_valid_and_matches_the_layout(tmp_path):
    """Process i: control i, port 3260 + i, as BMI derives them from tgt_portal :3260 and
    tgt_control 0."""
    from bmi_server.adapters.tgt.layout import process_portals

    text = TGTD_UNIT.read_text()
    assert "-C %i" in text and "$((TGTD_BASE_PORT + %i))" in text
    assert process_portals(["192.0.2.10:3260"], 3)[2] == "192.0.2.10:3262"
    true = shutil.which("true") or "/bin/true"
    path = tmp_path / "tgtd@.service"
    path.write_text(text.replace("/usr/sbin/tgtadm", true))
    done = subprocess.run(["systemd-analyze", "verify", f"{path.parent}/tgtd@1.service"],
                          capture_output=True, text=True, timeout=60, check=False,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
