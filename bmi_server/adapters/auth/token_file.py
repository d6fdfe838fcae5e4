"""Bearer tokens from a file, one per line: ``<token> admin|project:<name> [label]``.

The file is re-read when it changes, so tokens can be added or revoked without a restart.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from pathlib import Path

from ...core.errors import PermissionDenied, Unauthenticated
from ...core.models import Principal
from ...core.naming import check_project
from .bearer import bearer_token, match_token

log = logging.getLogger(__name__)


class TokenFileAuthenticator:
    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._tokens: list[tuple[bytes, Principal]] = []
        self._load()

    def authenticate(self, credentials: str | None, project: str = "") -> Principal:
        principal = self._principal(credentials)
        # A token names its project; naming another one is a mistake worth reporting.
        if project and not principal.is_admin and project != principal.project:
            raise PermissionDenied(
                f"this token acts for project {principal.project!r}, not {project!r}"
            )
        return principal

    def _principal(self, credentials: str | None) -> Principal:
        presented = bearer_token(
            credentials, "credentials required: send 'authorization: Bearer <token>'"
        )
        self._reload_if_changed()
        found = match_token(self._tokens, presented)
        if found is None:
            raise Unauthenticated("invalid token")
        return found

    def _reload_if_changed(self) -> None:
        try:
            mtime = self._path.stat().st_mtime
        except OSError:
            return
        if mtime != self._mtime:
            with self._lock:
                self._load()

    def _load(self) -> None:
        try:
            text = self._path.read_text()
            self._mtime = self._path.stat().st_mtime
        except OSError as exc:
            raise Unauthenticated(f"token file {self._path} unreadable: {exc}") from exc
        self._tokens = parse_tokens(text, str(self._path))


def parse_tokens(text: str, source: str) -> list[tuple[bytes, Principal]]:
    tokens = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) < 2:
            log.error("%s:%d: expected '<token> admin|project:<name> [label]'", source, number)
            continue
        token, role, *label = fields
        if role == "admin":
            principal = Principal(name=label[0] if label else "admin", is_admin=True)
        elif role.startswith("project:"):
            project = role.removeprefix("project:")
            try:
                check_project(project)
            except Exception:
                log.error("%s:%d: invalid project name", source, number)
                continue
            principal = Principal(name=label[0] if label else role, project=project)
        else:
            log.error("%s:%d: role must be 'admin' or 'project:<name>'", source, number)
            continue
        tokens.append((token.encode(), principal))
    return tokens


def ensure_token_file(path: Path) -> str | None:
    """Create a token file with one random admin token if none exists (zero-config start).

    Returns the new token, or None if the file already existed.
    """
    if path.exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# <token> admin|project:<name> [label]\n")
        f.write(f"{token} admin bootstrap-admin\n")
    return token
