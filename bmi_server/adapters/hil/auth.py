"""Callers authenticated by HIL: ``authorization: Basic base64(user:password)`` with their
HIL user name and password, and the project they act in named by the ``bmi-project``
metadata (none: the caller acts as an admin, which HIL must confirm).

A tenant is checked by reading its project (``GET /v0/project/<p>/nodes``), an admin by
an admin-only read (``GET /v0/projects``). HIL spends ~0.17 s hashing the password on
every request, so a success is cached for a short, configurable time; failures are
never cached. HIL answers a bad password, an unknown user (404), a foreign project and
an admin-only call alike, so on refusal a call any valid user may make
(``GET /v0/nodes/free``) tells bad credentials (UNAUTHENTICATED) from missing access
(PERMISSION_DENIED). A tenant's check is the list of its project's nodes, which is
offered to ``members`` (the isolator's cache) so the listing that follows needs no
second request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable

from ...core.errors import NotFound, PermissionDenied, Unauthenticated
from ...core.models import Credentials, Principal
from ...core.naming import check_project
from .client import HilClient, api_path
from .membership import ProjectMembers

log = logging.getLogger(__name__)

MAX_CACHED = 4096


def parse_basic(credentials: str | None) -> Credentials:
    if not credentials:
        raise Unauthenticated(
            "credentials required: send 'authorization: Basic base64(user:password)' with "
            "your HIL user name and password"
        )
    scheme, _, value = credentials.strip().partition(" ")
    if scheme.lower() != "basic":
        raise Unauthenticated("unsupported credentials: expected 'Basic base64(user:password)'")
    try:
        pair = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthenticated("malformed Basic credentials") from None
    user, sep, password = pair.partition(":")
    if not sep or not user or not password:
        raise Unauthenticated("malformed Basic credentials: expected user:password")
    return Credentials(user, password)


class HilAuthenticator:
    def __init__(
        self,
        client: HilClient,
        *,
        cache_seconds: float = 60.0,
        members: ProjectMembers | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.members = members
        self._ttl = cache_seconds
        self._clock = clock
        self._lock = threading.Lock()
        # Keyed by a keyed hash, so the table itself holds no password in clear.
        self._key = secrets.token_bytes(32)
        self._cache: dict[bytes, tuple[float, Principal]] = {}

    def authenticate(self, credentials: str | None, project: str = "") -> Principal:
        who = parse_basic(credentials)
        if project:
            check_project(project)
        key = hmac.digest(self._key, "\0".join((who.user, who.password, project)).encode(),
                          hashlib.sha256)
        now = self._clock()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        principal = self._verify(who, project)
        if self._ttl > 0:
            with self._lock:
                if len(self._cache) >= MAX_CACHED:
                    self._evict(now)
                self._cache[key] = (now + self._ttl, principal)
        return principal

    def _verify(self, who: Credentials, project: str) -> Principal:
        try:
            if project:
                names = self._client.get(api_path("project", project, "nodes"), as_=who)
                if self.members is not None and isinstance(names, list):
                    self.members.offer(project, [str(n) for n in names])
            else:
                self._client.get(api_path("projects"), as_=who)
        except (PermissionDenied, NotFound) as refused:
            self._explain(who, project, refused)
        log.info("HIL accepted user %r%s", who.user, f" for project {project!r}" if project
                 else " as an admin")
        if project:
            return Principal(name=who.user, project=project, credentials=who)
        return Principal(name=who.user, is_admin=True, credentials=who)

    def _explain(self, who: Credentials, project: str, refused: Exception) -> None:
        """Raise Unauthenticated or PermissionDenied for a refusal by HIL."""
        try:
            self._client.get(api_path("nodes", "free"), as_=who)
        except (PermissionDenied, NotFound) as exc:
            log.info("HIL rejected the credentials of user %r", who.user)
            raise Unauthenticated(f"HIL rejected user {who.user!r}: {exc.message}") from None
        if project:
            raise PermissionDenied(
                f"user {who.user!r} may not act in project {project!r} ({refused})"
            ) from None
        raise PermissionDenied(
            f"user {who.user!r} is not a HIL admin; tenants name their project with "
            "'bmi-project' metadata"
        ) from None

    def _evict(self, now: float) -> None:
        for key in [k for k, (expiry, _) in self._cache.items() if expiry <= now]:
            del self._cache[key]
        while len(self._cache) >= MAX_CACHED:
            del self._cache[next(iter(self._cache))]  # the oldest entry
