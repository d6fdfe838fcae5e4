"""Client settings: flags > environment > config file > defaults, per setting."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_CONFIG_PATH = Path("~/.config/bmi/client.toml")
TLS_FILES = ("ca_file", "cert_file", "key_file")


class ConfigError(Exception):
    """The client configuration is unusable (bad file, unreadable token file...)."""


@dataclass(frozen=True)
class ClientConfig:
    server: str
    token: str | None = field(repr=False)
    # Where the file settings came from, for error messages; None if no file was read.
    source: Path | None = None
    # A HIL user name and password instead of a token (servers backed by HIL), and the
    # project the caller acts in.
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    project: str | None = None
    # TLS: on when asked for or when any file below is set. ca_file: the CA the server's
    # certificate must chain to (default: the system's); cert_file + key_file: this
    # client's certificate, for servers that require one (mutual TLS).
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


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
    for key in ("server", "token", "token_file", "user", "password", "project", *TLS_FILES):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"config file {path}: {key!r} must be a string")
    if "tls" in data and not isinstance(data["tls"], bool):
        raise ConfigError(f"config file {path}: 'tls' must be true or false")
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
    tls: bool = False,
    tls_files: Mapping[str, str | None] | None = None,
) -> ClientConfig:
    """Resolve the server address and credentials. Empty strings count as unset.

    The password comes only from BMI_PASSWORD or the file, never from a flag (flags show
    in process lists). ``tls_files``: ca_file, cert_file, key_file given as flags; relative
    paths in the file are relative to the file.
    """
    env = os.environ if env is None else env
    path, explicit = config_path(env)
    file_data = _read_file(path, explicit)

    resolved_server = server or env.get("BMI_SERVER") or file_data.get("server") or DEFAULT_SERVER
    resolved_token = token or env.get("BMI_TOKEN") or file_data.get("token") or None
    if not resolved_token and file_data.get("token_file"):
        resolved_token = _read_token_file(str(file_data["token_file"]), path) or None
    def pick(flag: str | None, name: str) -> str | None:
        value = flag or env.get("BMI_" + name.upper()) or file_data.get(name) or None
        return str(value) if value else None

    files: dict[str, Path | None] = {}
    for name in TLS_FILES:
        given = (tls_files or {}).get(name) or env.get("BMI_" + name.upper())
        in_file = file_data.get(name)
        if given:
            files[name] = Path(given).expanduser()
        elif in_file:
            files[name] = (path.parent / Path(str(in_file)).expanduser()).resolve()
        else:
            files[name] = None
    if bool(files["cert_file"]) != bool(files["key_file"]):
        raise ConfigError("cert_file and key_file go together: give both or neither")
    env_tls = env.get("BMI_TLS", "").strip().lower() in ("1", "true", "yes", "on")
    return ClientConfig(
        server=str(resolved_server),
        token=str(resolved_token) if resolved_token else None,
        source=path if file_data else None,
        user=pick(user, "user"),
        password=pick(None, "password"),
        project=pick(project, "project"),
        tls=bool(tls or env_tls or file_data.get("tls") or any(files.values())),
        **files,
    )
