"""Fixed portal lists as a PortalSource (single-host mode: every target on the same ones)."""

from __future__ import annotations

from collections.abc import Sequence

from .ports import PortalSource


def static_portals(source: PortalSource | Sequence[str]) -> PortalSource:
    """A fixed portal list (single-host mode) as a PortalSource; a source as it is."""
    if hasattr(source, "portals_for"):
        return source  # type: ignore[return-value]
    return _StaticPortals(tuple(source))  # type: ignore[arg-type]


class _StaticPortals:
    def __init__(self, portals: tuple[str, ...]) -> None:
        self._portals = portals

    def portals_for(self, iqn: str) -> list[str]:
        return list(self._portals)
