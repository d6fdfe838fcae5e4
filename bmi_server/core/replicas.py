"""Several server replicas on one database: who is alive, whose in-flight work is orphaned.

Each replica holds a lease (renewed by a heartbeat) under an id that is new on every start.
Records in flight name the replica working on them (their ``owner``); reconcile repairs
only records whose owner's lease has expired (or that name no owner: written before
replicas existed, or by a replica that is gone). A replica's own work, and a live peer's,
is never touched. Reconcile and the target audit run under a cluster-wide exclusive lock,
so two replicas never repair the same thing at once.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from .models import Replica, utcnow
from .ports import ReplicaStore

log = logging.getLogger(__name__)

Orphaned = Callable[[str], bool]
"""Given a record's owner (a replica id, or ""), whether nobody alive works on it."""


def single_server(_owner: str) -> bool:
    """One server per database (SQLite, `bmi-server admin`): every in-flight record found
    at reconcile time is an orphan of a crash."""
    return True


def new_replica(name: str, address: str = "") -> Replica:
    return Replica(id=f"rep-{uuid.uuid4().hex[:16]}", name=name, address=address)


class ReplicaLease:
    """This replica's lease, and what other replicas' leases say about their work."""

    def __init__(
        self,
        store: ReplicaStore,
        replica: Replica,
        lease_seconds: float,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._store = store
        self.replica = replica
        self._lease = timedelta(seconds=lease_seconds)
        self._clock = clock

    def register(self) -> None:
        now = self._clock()
        self._store.register_replica(self.replica, now, now + self._lease)

    def renew(self) -> bool:
        """False if the lease was lost: another start under this name replaced it, or it
        expired and another replica took over this one's work. The replica must stop."""
        renewed = self._store.renew_lease(self.replica.id, self._clock() + self._lease)
        if not renewed:
            log.critical(
                "lease of replica %s (%s) is gone: a restart under its name replaced it, or "
                "it expired and another replica took over its work",
                self.replica.name,
                self.replica.id,
            )
        return renewed

    def retire(self) -> None:
        self._store.retire_replica(self.replica.id)

    def orphaned(self) -> Orphaned:
        """A predicate over owners for one reconcile round: an owner whose lease expired is
        claimed (its lease dropped) the first time it is asked about, so that replica, if it
        was merely stalled, learns at its next renewal that its work was taken over."""
        now = self._clock()
        live = set(self._store.live_replicas(now))
        live.add(self.replica.id)  # our own work is never an orphan
        decided: dict[str, bool] = {}

        def orphaned(owner: str) -> bool:
            if owner in live:
                return False
            if owner not in decided:
                decided[owner] = not owner or self._store.claim_expired(owner, now)
                if decided[owner] and owner:
                    log.warning("taking over the work of replica %s (lease expired)", owner)
            return decided[owner]

        return orphaned

    def live(self) -> list[Replica]:
        return sorted(self._store.live_replicas(self._clock()).values(), key=lambda r: r.name)
