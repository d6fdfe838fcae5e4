"""Server settings: defaults, overridden by a TOML file, overridden by BMI_* variables."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path


def _default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/bmi")
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state")) / "bmi"


@dataclass
class Settings:
    listen: str = "127.0.0.1:50051"
    state_dir: Path = field(default_factory=_default_state_dir)
    # Empty: SQLite in state_dir.
    database_url: str = ""
    # Empty: start a throwaway one-node Ceph cluster (development and demos only).
    ceph_conf: str = ""
    ceph_pool: str = "rbd"
    ceph_client: str = "client.admin"
    # Empty: state_dir/tokens (created with one admin token on first start).
    token_file: str = ""
    workers: int = 16
    # iPXE fetches boot scripts here (HTTP).
    http_listen: str = "127.0.0.1:8080"
    # tgtd to export disks through: its portal (host:port) and tgtadm control number.
    # Empty portal: start a throwaway tgtd (development and demos only).
    tgt_portal: str = ""
    tgt_control: int = 0
    # Portals nodes are told to log in through (comma-separated); default: tgt_portal.
    advertised_portals: str = ""
    # How long a node that is not ready to boot waits before asking again.
    discovery_retry_seconds: int = 30
    # How often booting nodes are checked for an iSCSI login.
    session_poll_seconds: float = 2.0
    # How often the targets tgtd should have are checked (re-created after a tgtd restart).
    target_audit_seconds: float = 30.0

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'bmi.sqlite3'}"

    @property
    def tokens_path(self) -> Path:
        return Path(self.token_file) if self.token_file else self.state_dir / "tokens"

    @property
    def portals(self) -> list[str]:
        return [p.strip() for p in self.advertised_portals.split(",") if p.strip()]

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"


def load_settings(config_file: str | None = None, env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ) if env is None else env
    settings = Settings()
    path = config_file or env.get("BMI_CONFIG")
    values: dict[str, object] = {}
    if path:
        with open(path, "rb") as f:
            values.update(tomllib.load(f).get("server", {}))
    for option in fields(Settings):
        key = "BMI_" + option.name.upper()
        if key in env:
            values[option.name] = env[key]
    for option in fields(Settings):
        if option.name in values:
            raw = values[option.name]
            if option.name == "state_dir":
                raw = Path(str(raw))
            elif option.type in ("int", int):
                raw = int(str(raw))
            elif option.type in ("float", float):
                raw = float(str(raw))
            setattr(settings, option.name, raw)
    return settings
