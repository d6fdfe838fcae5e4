"""The iSCSI sessions of provisioned nodes: seen at a boot's login, seen and ended by the
sweep, written only on a change, read from one listing per sweep (never per node), and
leaving the lifecycle state alone."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from principals import ADMIN, ALICE
from test_catalogue import upload

from bmi_server.core.boot import SessionWatcher
from bmi_server.core.models import NodeState, SessionState, Smbios, Visibility

MACS = ["52:54:00:5e:00:01", "52:54:00:5e:00:02"]
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


class CountingStore:
    """The state store, with its session writes counted."""

    def __init__(self, state) -> None:
        self._state = state
        self.writes = 0

    def record_session(self, *args):
        self.writes += 1
        return self._state.record_session(*args)

    def __getattr__(self, name):
        return getattr(self._state, name)


@pytest.fixture
def watched(core, state, store, inspector, targets, tmp_path):
    upload(core, store, inspector, tmp_path, ADMIN, "golden", project="ops",
           visibility=Visibility.PUBLIC)
    for n, mac in enumerate(MACS):
        core.registry.enrol(ADMIN, name=f"s{n}", project="alice", macs=[mac])
        core.provisioner.provision(ALICE, f"s{n}", image="golden")
    clock, counted = Clock(), CountingStore(state)
    return SessionWatcher(core.registry, counted, targets, clock), clock, counted


def node(core, name):
    return core.state.find_node_by_name(name)


def test_a_session_is_seen_at_login_then_ended_and_seen_again_by_the_sweep(
    core, targets, watched
):
    watcher, clock, counted = watched
    iqn = node(core, "s0").target.iqn
    assert node(core, "s0").current_session is None  # none seen on its target yet
    core.planner.action_for(MACS[0], Smbios())  # it fetched its script: BOOTING
    targets.logged_in.add(iqn)
    assert watcher.poll_once() == 1
    s0 = node(core, "s0")
    assert s0.state is NodeState.ACTIVE
    assert (s0.current_session.state, s0.current_session.time) == (SessionState.LOGGED_IN, T0)

    clock.advance(10)
    assert watcher.sweep() == (0, 0)  # still logged in: nothing written
    assert counted.writes == 1
    targets.logged_in.discard(iqn)  # powered off
    ended_at = clock.advance(10)
    assert watcher.sweep() == (0, 1)
    s0 = node(core, "s0")
    assert s0.state is NodeState.ACTIVE  # the lifecycle says what BMI made, not power
    assert (s0.current_session.state, s0.current_session.time) == (SessionState.ENDED,
                                                                   ended_at)
    clock.advance(10)
    assert watcher.sweep() == (0, 0) and counted.writes == 2  # only on a change
    assert node(core, "s0").current_session.time == ended_at

    targets.logged_in.add(iqn)  # its initiator logged in again (no new PXE boot)
    back_at = clock.advance(10)
    assert watcher.sweep() == (1, 0)
    assert node(core, "s0").current_session.state is SessionState.LOGGED_IN
    assert node(core, "s0").current_session.time == back_at
    # The other node never logged in: no record for it, no write.
    assert node(core, "s1").current_session is None and counted.writes == 3
    assert core.state.count_node_sessions() == {SessionState.LOGGED_IN: 1, None: 1}


def test_a_sweep_lists_sessions_once_and_a_poll_never(core, targets, watched):
    watcher, _, _ = watched
    calls = []
    listing = targets.sessions
    targets.sessions = lambda: calls.append(1) or listing()
    watcher.sweep()
    assert calls == [1]  # one listing for every node
    targets.sessions = lambda: pytest.fail("a poll listed every target")
    core.planner.action_for(MACS[1], Smbios())
    targets.logged_in.add(node(core, "s1").target.iqn)
    assert watcher.poll_once() == 1  # a poll asks only about the booting node's target


def test_a_new_target_starts_with_no_session_and_node_saves_keep_the_record(core, targets,
                                                                           watched):
    watcher, clock, _ = watched
    old = node(core, "s0").target.iqn
    targets.logged_in.add(old)
    watcher.sweep()
    assert node(core, "s0").current_session.state is SessionState.LOGGED_IN
    # A node save (a transition) does not write over the session record...
    core.planner.action_for(MACS[0], Smbios())
    assert node(core, "s0").current_session.state is SessionState.LOGGED_IN
    # ...and a new target (reprovisioned: a new disk) has none seen yet.
    targets.logged_in.clear()
    fresh = core.provisioner.reprovision(ALICE, "s0")
    assert fresh.target.iqn != old
    assert node(core, "s0").session is not None and node(core, "s0").current_session is None
    clock.advance(5)
    assert watcher.sweep() == (0, 0)  # the old target's session is no node's business now
