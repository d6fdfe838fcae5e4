"""Gateway credentials from a file, one per line: ``<token> <gateway name>``.

Kept apart from the tenant token file on purpose: a gateway token opens only
GatewayService, and a tenant or admin token never opens it. Re-read when it changes.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from ...core.errors import InvalidArgument, Unauthenticated
from ...core.gateways import check_gateway_name
from .bearer import bearer_token, match_token

log = logging.getLogger(__name__)


class GatewayTokenFile:
    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._tokens: list[tuple[bytes, str]] = []

    def authenticate(self, credentials: str | None) -> str:
        presented = bearer_token(
            credentials, "gateway credentials required: 'authorization: Bearer <token>'"
        )
        self._reload_if_changed()
        found = match_token(self._tokens, presented)
        if found is None:
            raise Unauthenticated("invalid gateway token")
        return found

    def _reload_if_changed(self) -> None:
        try:
            mtime = self._path.stat().st_mtime
        except OSError:
            with self._lock:
                self._tokens, self._mtime = [], None  # no file: no gateway may connect
            return
        if mtime != self._mtime:
            with self._lock:
                self._tokens = parse_gateway_tokens(self._path.read_text(), str(self._path))
                self._mtime = mtime


def parse_gateway_tokens(text: str, source: str) -> list[tuple[bytes, str]]:
    tokens = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            log.error("%s:%d: expected '<token> <gateway name>'", source, number)
            continue
        try:
            name = check_gateway_name(fields[1])
        except InvalidArgument as exc:
            log.error("%s:%d: %s", source, number, exc.message)
            continue
        tokens.append((fields[0].encode(), name))
    return tokens
