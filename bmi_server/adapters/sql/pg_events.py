"""Node transitions made by other replicas, relayed onto this replica's event bus.

Each replica's store NOTIFYs every transition it records, inside the recording transaction
(PostgreSQL delivers it on commit, never for a rollback). One thread per replica LISTENs
on its own connection and publishes the transitions of the *other* replicas (its own were
published in process already) on the local bus that WatchNodes streams read.

A dropped connection is a gap: notifications sent meanwhile are lost. After reconnecting
the relay reads back every foreign transition it has not delivered (transitions are
numbered) and publishes them; if too many were missed, it ends every watch instead
(UNAVAILABLE: the client lists the nodes again and watches anew).
"""

from __future__ import annotations

import collections
import logging
import threading

import psycopg
from sqlalchemy.engine import make_url

from ...core.ports import NodeEventBus
from .node_store import NODE_EVENTS_CHANNEL

log = logging.getLogger(__name__)

# Transactions commit in an order that is not quite their numbering: look back this far.
RESYNC_LOOKBACK = 200
# More missed transitions than this after a gap: watchers start over instead.
MAX_RESYNC = 5000
REMEMBERED = 20000


class PgNodeEventRelay:
    def __init__(self, store, bus: NodeEventBus, *, reconnect_seconds: float = 1.0) -> None:
        """``store``: the replica's SqlStateStore on PostgreSQL."""
        self._store = store
        self._bus = bus
        self._dsn = (
            make_url(store.url).set(drivername="postgresql").render_as_string(hide_password=False)
        )
        self._reconnect = reconnect_seconds
        self._stop = threading.Event()
        self.connected = threading.Event()  # listening now (tests wait on it)
        self._thread = threading.Thread(target=self._run, name="node-event-relay", daemon=True)
        self._seen: collections.deque[int] = collections.deque(maxlen=REMEMBERED)
        self._seen_set: set[int] = set()
        self._high = 0  # highest seq delivered or known before the relay started
        self._pid = 0  # backend pid of the listening connection

    def start(self) -> None:
        self._high = self._store.last_transition_seq()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def backend_pid(self) -> int:
        return self._pid

    def _run(self) -> None:
        first = True
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {NODE_EVENTS_CHANNEL}")
                    self._pid = conn.info.backend_pid
                    # Listening before reading back: nothing committed from now on is missed.
                    if not first:
                        self._resync()
                    first = False
                    self.connected.set()
                    self._listen(conn)
            except Exception as exc:  # the database went away (or restarted): reconnect
                if self._stop.is_set():
                    break
                log.warning("node event relay lost its connection, reconnecting: %s", exc)
            finally:
                self.connected.clear()
            self._stop.wait(self._reconnect)

    def _listen(self, conn: psycopg.Connection) -> None:
        while not self._stop.is_set():
            seqs = []
            for note in conn.notifies(timeout=0.5, stop_after=1):
                origin, _, seq = note.payload.partition(" ")
                if origin != self._store.replica_id and seq.isdigit():
                    seqs.append(int(seq))
            if seqs:
                self._deliver(self._store.foreign_transitions(seqs=seqs))

    def _resync(self) -> None:
        missed = self._store.foreign_transitions(
            after=max(0, self._high - RESYNC_LOOKBACK), limit=MAX_RESYNC + RESYNC_LOOKBACK
        )
        missed = [m for m in missed if m[0] not in self._seen_set]
        if len(missed) > MAX_RESYNC:
            log.warning("node event relay missed %d transitions: restarting watches", len(missed))
            self._bus.cut_off_all("node events were lost while the database was unreachable")
            self._high = self._store.last_transition_seq()
            return
        if missed:
            log.info("node event relay replaying %d transitions missed in a gap", len(missed))
        self._deliver(missed)

    def _deliver(self, transitions) -> None:
        nodes: dict[str, object] = {}
        for seq, node_id, transition in transitions:
            if seq in self._seen_set:
                continue
            if node_id not in nodes:
                nodes[node_id] = self._store.get_node(node_id)
            node = nodes[node_id]
            self._remember(seq)
            if node is None:
                continue  # deleted since
            # The node as of now, in the state this transition left it in.
            node.state = transition.to_state
            self._bus.publish(node, transition)

    def _remember(self, seq: int) -> None:
        if len(self._seen) == self._seen.maxlen:
            self._seen_set.discard(self._seen[0])
        self._seen.append(seq)
        self._seen_set.add(seq)
        self._high = max(self._high, seq)
