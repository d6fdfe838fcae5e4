"""Replica leases, owners of in-flight records, exclusive jobs and the node event relay,
on SQLite and on a real PostgreSQL (two stores = two replicas on one database)."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, text

from bmi_server.adapters.sql import pg_events
from bmi_server.adapters.sql.pg_events import PgNodeEventRelay
from bmi_server.adapters.sql.store import SqlStateStore
from bmi_server.core.errors import FailedPrecondition, Unavailable
from bmi_server.core.events import NodeEvents
from bmi_server.core.models import Node, NodeState, Replica, Transition, utcnow


@pytest.fixture(params=["sqlite", "postgres"])
def database(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db.sqlite3'}"
    return request.getfixturevalue("fresh_postgres")()


@pytest.fixture
def pair(database):
    """Two replicas' stores on one database."""
    a = SqlStateStore(database, replica_id="rep-a")
    b = SqlStateStore(database, replica_id="rep-b")
    yield a, b
    a.close()
    b.close()


def _node(name="n1", state=NodeState.AVAILABLE) -> Node:
    return Node(id="node-" + uuid.uuid4().hex[:16], name=name, project="alice",
                macs=[f"52:54:00:00:00:{uuid.uuid4().hex[:2]}"], state=state)


def _move(store: SqlStateStore, node: Node, to: NodeState) -> Transition:
    transition = Transition(node.state, to, f"to {to.value}", utcnow())
    expected, node.state = node.state, to
    store.save_node(node, transition, expected=expected)
    return transition


def test_nodes_in_flight_name_the_replica_working_on_them(pair):
    a, b = pair
    node = _node()
    a.add_node(node)
    _move(a, node, NodeState.PROVISIONING)
    assert b.get_node(node.id).owner == "rep-a"
    _move(b, node, NodeState.PROVISIONED)
    assert a.get_node(node.id).owner == ""


def test_leases_expire_and_a_new_incarnation_replaces_the_old(pair):
    a, b = pair
    now = utcnow()
    a.register_replica(Replica("rep-a", "a"), now, now + timedelta(seconds=30))
    b.register_replica(Replica("rep-b", "b"), now, now + timedelta(seconds=30))
    assert set(a.live_replicas(now)) == {"rep-a", "rep-b"}
    later = now + timedelta(seconds=31)
    assert b.renew_lease("rep-b", later + timedelta(seconds=30))
    assert set(a.live_replicas(later)) == {"rep-b"}
    b.register_replica(Replica("rep-a2", "a"), later, later + timedelta(seconds=30))
    assert set(a.live_replicas(now)) == {"rep-a2", "rep-b"}
    assert not a.renew_lease("rep-a", later)  # the old incarnation learns it was replaced
    b.retire_replica("rep-b")
    assert set(a.live_replicas(later)) == {"rep-a2"}


def test_an_expired_lease_is_claimed_once_and_its_holder_learns_it(pair):
    a, b = pair
    now = utcnow()
    a.register_replica(Replica("rep-a", "a"), now, now + timedelta(seconds=30))
    assert not b.claim_expired("rep-a", now)  # alive: not claimed
    later = now + timedelta(seconds=31)
    assert b.claim_expired("rep-a", later)
    assert not a.renew_lease("rep-a", later + timedelta(seconds=30))  # a must stop
    assert b.claim_expired("rep-a", later)  # gone already: still an orphan's work
    assert b.claim_expired("rep-never-seen", later)


def test_a_replica_whose_work_was_taken_over_cannot_write_over_it(pair):
    a, b = pair
    node = _node()
    a.add_node(node)
    _move(a, node, NodeState.PROVISIONING)
    assert node.owner == "rep-a"
    taken = b.get_node(node.id)
    b.save_node(taken, None, expected=NodeState.PROVISIONING)  # b repairs it now
    assert taken.owner == "rep-b"
    node.failure_reason = "a, waking up late"
    with pytest.raises(FailedPrecondition, match="changed meanwhile"):
        a.save_node(node, None, expected=NodeState.PROVISIONING)
    assert b.get_node(node.id).failure_reason == ""


def test_an_exclusive_job_runs_on_one_replica_at_a_time(pair):
    a, b = pair
    with a.exclusive("reconcile") as mine:
        assert mine
        with b.exclusive("reconcile") as theirs:
            assert not theirs
        with b.exclusive("other-job") as other:
            assert other
    with b.exclusive("reconcile") as theirs:
        assert theirs


def test_foreign_transitions_are_those_of_other_replicas(pair):
    a, b = pair
    node = _node()
    a.add_node(node)
    _move(a, node, NodeState.PROVISIONING)
    _move(b, node, NodeState.PROVISIONED)
    seen_by_a = a.foreign_transitions(after=0)
    assert [t.to_state for _, _, t in seen_by_a] == [NodeState.PROVISIONED]
    assert [t.to_state for _, _, t in b.foreign_transitions(after=0)] == [NodeState.PROVISIONING]
    assert a.last_transition_seq() == seen_by_a[0][0]


# -- the PostgreSQL relay ----------------------------------------------------------------


@pytest.fixture
def relayed(fresh_postgres):
    """(store of replica a, store of replica b, a's bus fed by a relay, the relay)."""
    url = fresh_postgres()
    a = SqlStateStore(url, replica_id="rep-a")
    b = SqlStateStore(url, replica_id="rep-b")
    bus = NodeEvents()
    relay = PgNodeEventRelay(a, bus, reconnect_seconds=0.5)
    relay.start()
    assert relay.connected.wait(10)
    yield a, b, bus, relay, url
    relay.stop()
    a.close()
    b.close()


def _next(subscription, timeout=10):
    event = subscription.next(timeout)
    assert event is not None, "no event arrived"
    return event


def test_relay_publishes_other_replicas_transitions_on_commit(relayed):
    a, b, bus, _, _ = relayed
    watch = bus.subscribe(lambda node: True)
    node = _node()
    b.add_node(node, Transition(NodeState.AVAILABLE, NodeState.AVAILABLE, "enrolled", utcnow()))
    _move(a, node, NodeState.PROVISIONING)  # a's own: published in process, not relayed
    _move(b, node, NodeState.FAILED)
    first, second = _next(watch), _next(watch)
    assert (first.transition.reason, first.node.state) == ("enrolled", NodeState.AVAILABLE)
    assert (second.transition.to_state, second.node.state) == (NodeState.FAILED,) * 2
    assert watch.next(0.2) is None


def test_relay_replays_what_it_missed_while_disconnected(relayed):
    _, b, bus, relay, url = relayed
    watch = bus.subscribe(lambda node: True)
    node = _node()
    b.add_node(node)
    gone = threading.Event()
    relay._reconnect = 2.0  # time to write while it is away
    _terminate(url, relay.backend_pid)
    while relay.connected.is_set():
        gone.wait(0.01)
    _move(b, node, NodeState.PROVISIONING)  # NOTIFY sent to nobody
    assert relay.connected.wait(10)
    event = _next(watch)
    assert event.transition.to_state is NodeState.PROVISIONING
    _move(b, node, NodeState.PROVISIONED)  # and live again afterwards
    assert _next(watch).transition.to_state is NodeState.PROVISIONED


def test_relay_cuts_watches_off_when_it_missed_too_much(relayed, monkeypatch):
    _, b, bus, relay, url = relayed
    monkeypatch.setattr(pg_events, "MAX_RESYNC", 2)
    watch = bus.subscribe(lambda node: True)
    node = _node()
    b.add_node(node)
    relay._reconnect = 2.0
    _terminate(url, relay.backend_pid)
    while relay.connected.is_set():
        threading.Event().wait(0.01)
    for to in (NodeState.PROVISIONING, NodeState.PROVISIONED, NodeState.DEPROVISIONING):
        _move(b, node, to)
    assert relay.connected.wait(10)
    with pytest.raises(Unavailable, match="watch anew"):
        for _ in range(30):  # bounded: a relay that never cuts off fails the test
            watch.next(1)


def _terminate(url: str, pid: int) -> None:
    engine = create_engine(url)
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    engine.dispose()
