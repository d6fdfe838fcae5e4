"""Which nodes HIL puts in a project (``GET /v0/project/<p>/nodes``), cached per project.

Tenants' node listings and lookups follow HIL's membership, so every ListNodes would
ask HIL (one request, but ~0.17 s of password hashing in HIL each). An answer is kept
for ``ttl`` seconds per project: callers reach it only after the authenticator has
checked them for that very project, so a list fetched with one member's credentials may
serve another member, never anyone else. The authenticator checks tenants with the same
request and offers its answer here; BMI's own take and give back forget the project's
entry, so they show at once; changes made in HIL directly show within ``ttl``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

MAX_PROJECTS = 4096


class ProjectMembers:
    def __init__(self, ttl: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}

    def get(self, project: str, fetch: Callable[[], Iterable[str]]) -> frozenset[str]:
        """The project's node names: cached if fresh, else ``fetch()`` (and kept)."""
        now = self._clock()
        with self._lock:
            hit = self._cache.get(project)
        if hit is not None and hit[0] > now:
            return hit[1]
        names = frozenset(fetch())
        self.offer(project, names, now)
        return names

    def offer(self, project: str, names: Iterable[str], at: float | None = None) -> None:
        """An answer to ``GET /v0/project/<project>/nodes`` got elsewhere, at ``at``."""
        if self.ttl <= 0:
            return
        expiry = (self._clock() if at is None else at) + self.ttl
        with self._lock:
            if len(self._cache) >= MAX_PROJECTS and project not in self._cache:
                now = self._clock()
                for key in [k for k, (e, _) in self._cache.items() if e <= now]:
                    del self._cache[key]
                while len(self._cache) >= MAX_PROJECTS:
                    del self._cache[next(iter(self._cache))]
            self._cache[project] = (expiry, frozenset(names))

    def forget(self, *projects: str | None) -> None:
        with self._lock:
            for project in projects:
                if project is not None:
                    self._cache.pop(project, None)
