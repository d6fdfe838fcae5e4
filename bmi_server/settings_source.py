"""Settings in layers, shared by bmi-server and bmi-gateway: a dataclass's defaults, then a
table of a TOML file, then environment variables named <PREFIX><OPTION>."""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping

from .core.errors import InvalidArgument


def layered_values(
    table: str, prefix: str, names: Iterable[str], path: str | None, env: Mapping[str, str]
) -> dict[str, object]:
    """Raw values by option name: the file's ``[table]``, overridden by the environment."""
    values: dict[str, object] = {}
    if path:
        with open(path, "rb") as f:
            values.update(tomllib.load(f).get(table, {}))
    for name in names:
        if (key := prefix + name.upper()) in env:
            values[name] = env[key]
    return values


def coerced(name: str, kind: object, raw: object, what: str = "setting") -> object:
    """``raw`` (text from the environment, or a TOML value) as the option's type."""
    if kind in ("bool", bool):
        return raw if isinstance(raw, bool) else boolean(name, str(raw))
    try:
        if kind in ("int", int):
            return int(str(raw))
        if kind in ("float", float):
            return float(str(raw))
    except ValueError:
        raise InvalidArgument(f"{what} {name} must be a number, not {raw!r}") from None
    return raw


def boolean(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise InvalidArgument(f"{name} must be true or false, not {text!r}")
