"""TgtdPool against real tgtds and a real Ceph cluster: targets spread over K processes,
stay where they were placed, survive an upgrade from one tgtd, and one process's restart
touches only its own targets."""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Iterator

import pytest

from bmi_server.adapters.sql.store import SqlStateStore
from bmi_server.adapters.tgt.control_socket import TgtdSocketRunner
from bmi_server.adapters.tgt.pool import TgtdPool
from bmi_server.adapters.tgt.tgtadm import TgtTargetDriver
from bmi_server.core.errors import BmiError, Unavailable
from bmi_server.core.models import TargetSpec
from bmi_server.devenv.tgtd import Tgtd, TgtdGroup

pytestmark = pytest.mark.ceph

MiB = 1 << 20
PREFIX = "iqn.2026-11.org.moc.bmi:"


@pytest.fixture
def tgtds() -> Iterator[TgtdGroup]:
    with TgtdGroup(2) as group:
        yield group


@pytest.fixture
def placements(tmp_path) -> Iterator[SqlStateStore]:
    store = SqlStateStore(f"sqlite:///{tmp_path / 'bmi.sqlite3'}")
    yield store
    store.close()


def driver_for(tgtd: Tgtd, cluster) -> TgtTargetDriver:
    return TgtTargetDriver(str(cluster.tgt_conf_path), cluster.pool, tgtd.portal,
                           control=tgtd.control, runner=TgtdSocketRunner(),
                           rbd_user=cluster.tgt_user)


def pool_of(tgtds: TgtdGroup, cluster, store, active: int | None = None) -> TgtdPool:
    return TgtdPool([driver_for(d, cluster) for d in tgtds.daemons],
                    [[f"10.0.2.2:{d.port}"] for d in tgtds.daemons], store, active)


@pytest.fixture
def specs(rbd_store) -> Iterator:
    """Makes volumes and the spec of a target for each."""
    made: list[str] = []

    def make() -> TargetSpec:
        volume = f"dsk-{uuid.uuid4().hex[:10]}"
        rbd_store.create(volume, 16 * MiB, {"bmi.kind": "disk"})
        made.append(volume)
        name = uuid.uuid4().hex[:8]
        return TargetSpec(iqn=f"{PREFIX}{volume}", volume=volume, chap_user=f"bmi-{name}",
                          chap_secret=uuid.uuid4().hex[:16],
                          initiator_iqn=f"iqn.2026-11.org.moc.bmi.node:{name}")

    make.leave = set()
    yield make
    for volume in made:
        if volume not in make.leave:
            with contextlib.suppress(BmiError):
                rbd_store.remove(volume)


def live(tgtd: Tgtd) -> dict[str, int]:
    out = tgtd.tgtadm("--op", "show", "--mode", "target").stdout
    return {iqn: int(tid) for tid, iqn in re.findall(r"^Target (\d+): (\S+)", out, re.MULTILINE)}


def test_targets_spread_over_the_processes_and_stay_there(
        tgtds, ceph_cluster, placements, specs):
    pool = pool_of(tgtds, ceph_cluster, placements)
    made = [specs() for _ in range(3)]
    for spec in made:
        pool.create_export(spec)
    assert [placements.placement(s.iqn) for s in made] == [0, 1, 0]
    for spec in made:
        process = pool.placement(spec.iqn)
        assert spec.iqn in live(tgtds[process])
        assert spec.iqn not in live(tgtds[1 - process])
        assert pool.portals_for(spec.iqn) == [f"10.0.2.2:{tgtds[process].port}"]
    # Again (a retried provisioning): the same process, nothing new.
    pool.create_export(made[1])
    assert placements.placement(made[1].iqn) == 1 and len(live(tgtds[1])) == 1
    assert sorted(pool.list_exports()) == sorted(s.iqn for s in made)
    # A second pool on the same database (another replica, a restart) finds them.
    again = pool_of(tgtds, ceph_cluster, placements)
    assert [again.placement(s.iqn) for s in made] == [0, 1, 0]
    for spec in made:
        pool.remove_export(spec.iqn)
    assert placements.placements() == {}
    assert live(tgtds[0]) == {} and live(tgtds[1]) == {}


def test_a_single_tgtd_site_upgrades_without_moving_its_targets(
        tgtds, ceph_cluster, placements, specs):
    old = [specs() for _ in range(2)]
    single = driver_for(tgtds[0], ceph_cluster)  # what the server drove before
    for spec in old:
        single.create_export(spec)
    tids = live(tgtds[0])
    pool = pool_of(tgtds, ceph_cluster, placements)
    assert pool.portals_for(old[0].iqn) == [f"10.0.2.2:{tgtds[0].port}"]  # before any audit
    assert pool.ensure_exports(old) == []  # the start-up audit
    assert placements.placements() == {s.iqn: 0 for s in old}
    assert live(tgtds[0]) == tids  # untouched: same targets, same tids
    new = [specs() for _ in range(3)]
    for spec in new:
        pool.create_export(spec)
    # Process 0 holds 2 already: the new ones fill process 1 first.
    assert [placements.placement(s.iqn) for s in new] == [1, 1, 0]
    for spec in old + new:
        pool.remove_export(spec.iqn)


def test_one_process_restarted_loses_only_its_targets_and_the_audit_puts_them_back(
        tgtds, ceph_cluster, placements, specs):
    pool = pool_of(tgtds, ceph_cluster, placements)
    made = [specs() for _ in range(4)]
    for spec in made:
        pool.create_export(spec)
    on = {p: [s.iqn for s in made if placements.placement(s.iqn) == p] for p in (0, 1)}
    before = live(tgtds[0])
    specs.leave.update(s.volume for s in made)  # a killed tgtd may still hold them open

    tgtds[1].kill()
    # With process 1 down: sessions and polls go on for process 0, the audit too.
    assert pool.sessions() == set()
    assert not pool.has_session(on[1][0])
    with pytest.raises(Unavailable, match="tgtd process 1"):
        pool.ensure_exports(made)
    assert live(tgtds[0]) == before
    assert pool.process_targets() == [2, None]

    tgtds[1].restart()
    assert live(tgtds[1]) == {}
    assert pool.ensure_exports(made) == []
    assert sorted(live(tgtds[1])) == sorted(on[1])
    assert live(tgtds[0]) == before  # never touched
    for spec in made:
        pool.remove_export(spec.iqn)


def test_fewer_processes_keep_their_targets_and_get_no_new_ones(
        tgtds, ceph_cluster, placements, specs):
    first, second = specs(), specs()
    pool_of(tgtds, ceph_cluster, placements).create_export(first)
    pool_of(tgtds, ceph_cluster, placements).create_export(second)
    assert placements.placement(second.iqn) == 1
    lowered = pool_of(tgtds, ceph_cluster, placements, active=1)
    third = specs()
    lowered.create_export(third)
    assert placements.placement(third.iqn) == 0
    assert lowered.ensure_exports([first, second, third]) == []
    assert second.iqn in live(tgtds[1])
    for spec in (first, second, third):
        lowered.remove_export(spec.iqn)
