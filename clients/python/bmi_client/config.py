"""Client settings: flags > environment > config file > defaults, per setting."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_CONFIG_PATH = Path("~/.config/bmi/client.toml")


class ConfigError(Exception):
    """The client configuration is unusable (bad file, unreadable token file...)."""


@dataclass(frozen=True)
class ClientConfig:
    server: str
    token: str | None
    # Where the file settings came from, for error messages; None if no file was read.
    source: Path | None = None
    # A HIL user name and password instead of a token (servers backed by HIL), and the
    # project the caller acts in.
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    project: str | None = None


def config_path(env: Mapping[str, str]) -> tuple[Path, bool]:
    """Return the config file path and whether the user named it explicitly."""
    explicit = env.get("BMI_CONFIG")
    if explicit:
        return Path(explicit).expanduser(), True
    return DEFAULT_CONFIG_PATH.expanduser(), False


def _read_file(path: Path, explicit: bool) -> dict[str, object]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        # A missing default file is normal; a missing $BMI_CONFIG is almost surely a typo.
        if explicit:
            raise ConfigError(f"config file {path} (from BMI_CONFIG) does not exist") from None
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    for key in ("server", "token", "token_file", "user", "password", "project"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"config file {path}: {key!r} must be a string")
    return data


def _read_token_file(value: str, base: Path) -> str:
    # Relative token_file paths are relative to the config file, not the cwd.
    path = (base.parent / Path(value).expanduser()).resolve()
    try:
        return path.read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read token_file {path}: {e.strerror or e}") from None


def load_config(
    server: str | None = None,
    token: str | None = None,
    env: Mapping[str, str] | None = None,
    *,
    user: str | None = None,
    project: str | None = None,
) -> ClientConfig:
    """Resolve the server address and credentials. Empty strings count as unset.

    The password comes only from BMI_PASSWORD or the file, never from a flag (flags show
    in process lists).
    """
    env = os.environ if env is None else env
    path, explicit = config_path(env)
    file_data: dict[str, object] = {}
    # Only touch the file when a flag or env var does not already decide both settings.
    if not ((server or env.get("BMI_SERVER")) and (token or env.get("BMI_TOKEN"))):
        file_data = _read_file(path, explicit)

    resolved_server = server or env.get("BMI_SERVER") or file_data.get("server") or DEFAULT_SERVER
    resolved_token = token or env.get("BMI_TOKEN") or file_data.get("token") or None
    if not resolved_token and file_data.get("token_file"):
        resolved_token = _read_token_file(str(file_data["token_file"]), path) or None
    def pick(flag: str | None, name: str) -> str | None:
        value = flag or env.get("BMI_" + name.upper()) or file_data.get(name) or None
        return str(value) if value else None

    return ClientConfig(
        server=str(resolved_server),
        token=str(resolved_token) if resolved_token else None,
        source=path if file_data else None,
        user=pick(user, "user"),
        password=pick(None, "password"),
        project=pick(project, "project"),
    )
