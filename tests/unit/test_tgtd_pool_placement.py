"""TgtdPool's placement, per-process failure handling and K changes, on fake tgtds; the
layout of K processes; the placement stores (SQL, the gateway's file). Real tgtds:
tests/integration/test_tgtd_pool.py."""

from __future__ import annotations

import pytest

from bmi_gateway.processes import FilePlacements, GatewayTgtds
from bmi_server.adapters.sql.store import SqlStateStore
from bmi_server.adapters.tgt.layout import (
    advertised_groups,
    default_processes,
    process_portals,
)
from bmi_server.adapters.tgt.pool import TgtdPool, processes_needed
from bmi_server.adapters.tgt.tgtadm import LiveTarget
from bmi_server.core.errors import FailedPrecondition, InvalidArgument, Unavailable
from bmi_server.core.models import TargetSpec

PREFIX = "iqn.2026-11.org.moc.bmi:"


class FakeTgtd:
    """One tgtd process as TgtdPool uses it."""

    def __init__(self) -> None:
        self.targets: dict[str, TargetSpec] = {}
        self.sessions_of: set[str] = set()
        self.down = False

    def _up(self) -> None:
        if self.down:
            raise Unavailable("tgtd not reachable")

    def create_export(self, spec: TargetSpec) -> None:
        self._up()
        self.targets[spec.iqn] = spec

    def remove_export(self, iqn: str) -> None:
        self._up()
        self.targets.pop(iqn, None)

    def ensure_exports(self, specs, still_wanted=None) -> list[str]:
        self._up()
        specs = list(specs)
        for spec in specs:
            if spec.iqn not in self.targets and (still_wanted is None or still_wanted(spec.iqn)):
                self.targets[spec.iqn] = spec
        return sorted(set(self.targets) - {s.iqn for s in specs})

    def list_exports(self) -> list[str]:
        self._up()
        return sorted(self.targets)

    def has_session(self, iqn: str) -> bool:
        self._up()
        return iqn in self.sessions_of

    def sessions(self) -> set[str]:
        self._up()
        return set(self.sessions_of)

    def live_targets(self) -> dict[str, LiveTarget]:
        self._up()
        return {iqn: LiveTarget(i + 1, iqn) for i, iqn in enumerate(sorted(self.targets))}


def spec(n: int) -> TargetSpec:
    return TargetSpec(f"{PREFIX}dsk-{n:04d}", f"bmi-dsk-{n:04d}", f"iqn.x:{n}", f"u{n}", "s")


@pytest.fixture(params=["sql", "file"])
def store(request, tmp_path):
    if request.param == "file":
        yield FilePlacements(tmp_path / "placements.json")
        return
    made = SqlStateStore(f"sqlite:///{tmp_path / 'bmi.sqlite3'}")
    yield made
    made.close()


def pool_of(tgtds, store, active=None, cls=TgtdPool):
    return cls(tgtds, [[f"10.0.0.1:{3260 + i}"] for i in range(len(tgtds))], store, active)


def test_targets_go_to_the_least_loaded_process_and_stay(store):
    tgtds = [FakeTgtd(), FakeTgtd(), FakeTgtd()]
    pool = pool_of(tgtds, store)
    for n in range(7):
        pool.create_export(spec(n))
    assert [len(t.targets) for t in tgtds] == [3, 2, 2]
    pool.remove_export(spec(1).iqn)  # process 1 now the least loaded
    pool.create_export(spec(0))  # again: stays on process 0
    assert store.placement(spec(0).iqn) == 0
    pool.create_export(spec(9))
    assert store.placement(spec(9).iqn) == 1
    assert pool.portals_for(spec(9).iqn) == ["10.0.0.1:3261"]
    assert store.placement(spec(1).iqn) is None and spec(1).iqn not in tgtds[1].targets


def test_a_dead_process_fails_only_its_own_targets(store):
    tgtds = [FakeTgtd(), FakeTgtd()]
    pool = pool_of(tgtds, store)
    for n in range(4):
        pool.create_export(spec(n))  # 0, 2 on process 0; 1, 3 on process 1
    pool.remove_export(spec(1).iqn)  # process 1 is now the least loaded
    tgtds[0].sessions_of.add(spec(0).iqn)
    tgtds[1].sessions_of.add(spec(3).iqn)
    tgtds[1].down = True
    # A new target goes to a process that answers, not to the dead least loaded one.
    pool.create_export(spec(5))
    assert store.placement(spec(5).iqn) == 0 and spec(5).iqn in tgtds[0].targets
    assert pool.sessions() == {spec(0).iqn}  # the dead one's sessions are over
    assert not pool.has_session(spec(3).iqn) and pool.has_session(spec(0).iqn)
    assert pool.process_targets() == [3, None]
    wanted = [spec(n) for n in (0, 2, 3, 5)]
    tgtds[0].targets.pop(spec(2).iqn)  # lost meanwhile: put back although 1 is down
    with pytest.raises(Unavailable, match="tgtd process 1"):
        pool.ensure_exports(wanted)
    assert spec(2).iqn in tgtds[0].targets
    tgtds[1].targets.clear()  # it restarted: its targets are gone
    tgtds[1].down = False
    assert pool.ensure_exports(wanted) == []
    assert sorted(tgtds[1].targets) == [spec(3).iqn]
    assert sorted(tgtds[0].targets) == sorted(spec(n).iqn for n in (0, 2, 5))


def test_targets_made_before_placements_are_recorded_on_process_0(store):
    tgtds = [FakeTgtd(), FakeTgtd()]
    tgtds[0].create_export(spec(0))  # by a server that drove one tgtd
    tgtds[0].create_export(spec(1))
    pool = pool_of(tgtds, store)
    assert pool.portals_for(spec(0).iqn) == ["10.0.0.1:3260"]
    assert pool.ensure_exports([spec(0), spec(1)]) == []
    assert store.placements() == {spec(0).iqn: 0, spec(1).iqn: 0}
    pool.create_export(spec(2))
    assert store.placement(spec(2).iqn) == 1


def test_lowering_the_process_count_moves_nothing(store):
    tgtds = [FakeTgtd(), FakeTgtd()]
    pool_of(tgtds, store).create_export(spec(0))
    pool_of(tgtds, store).create_export(spec(1))
    assert processes_needed(1, store.placement_counts()) == 2
    lowered = pool_of(tgtds, store, active=1)
    lowered.create_export(spec(2))
    assert store.placement(spec(2).iqn) == 0 and store.placement(spec(1).iqn) == 1
    lowered.remove_export(spec(1).iqn)
    assert processes_needed(1, store.placement_counts()) == 1
    with pytest.raises(FailedPrecondition, match="raise tgtd_processes"):
        store.place(spec(3).iqn, 4)
        pool_of(tgtds, store).create_export(spec(3))


def test_the_gateway_pool_turns_a_dead_process_into_its_targets_failures(tmp_path):
    tgtds = [FakeTgtd(), FakeTgtd()]
    placements = FilePlacements(tmp_path / "p.json")
    pool = pool_of(tgtds, placements, cls=GatewayTgtds)
    for n in range(2):
        pool.create_export(spec(n))
    tgtds[1].down = True
    assert set(pool.live_targets()) == {spec(0).iqn}
    with pytest.raises(FailedPrecondition, match="tgtd process is down"):
        pool.remove_export(spec(1).iqn)
    tgtds[0].down = True
    with pytest.raises(Unavailable):
        pool.live_targets()
    # A target found on process 1 with no record (placements file lost) is kept there.
    tgtds[0].down = tgtds[1].down = False
    again = pool_of(tgtds, FilePlacements(tmp_path / "new.json"), cls=GatewayTgtds)
    assert set(again.live_targets()) == {spec(0).iqn, spec(1).iqn}
    assert again.placement(spec(1).iqn) == 1
    # The file survives the daemon.
    assert FilePlacements(tmp_path / "p.json").placements() == {spec(0).iqn: 0, spec(1).iqn: 1}


@pytest.mark.parametrize("contents, why", [
    ("{not json", "Expecting property name"),
    ('["iqn.x"]', "not a JSON object"),
    ('{"iqn.x": -1}', "placed on -1"),
    ('{"iqn.x": true}', "placed on True"),
    ('{"iqn.x": "1"}', "placed on '1'"),
    ('{"iqn.x": 1.5}', "placed on 1.5"),
    ('{"iqn.x": null}', "placed on None"),
])
def test_a_placements_file_that_is_not_one_is_refused_clearly(tmp_path, contents, why):
    path = tmp_path / "placements.json"
    path.write_text(contents)
    with pytest.raises(FailedPrecondition, match=f"{path}.*{why}.*move it away") as refused:
        FilePlacements(path)
    assert refused.value.message.startswith("placement_file ")
    assert path.read_text() == contents  # left as it was, for the operator to look at


def test_an_unreadable_placements_file_is_refused_clearly(tmp_path):
    (tmp_path / "placements.json").mkdir()  # read_text: IsADirectoryError
    with pytest.raises(FailedPrecondition, match=r"placements\.json is unusable"):
        FilePlacements(tmp_path / "placements.json")


def test_process_layout():
    assert process_portals(["a:3260"], 3) == ["a:3260", "a:3261", "a:3262"]
    assert process_portals(["a:1", "b:7"], 2) == ["a:1", "b:7"]
    with pytest.raises(InvalidArgument):
        process_portals(["a:1", "b:7"], 3)
    assert advertised_groups("", ["a:1", "a:2"]) == [["a:1"], ["a:2"]]
    assert advertised_groups("x:10,y:10", ["a:1", "a:2"]) == [["x:10", "y:10"],
                                                               ["x:11", "y:11"]]
    assert advertised_groups("x:1;x:5", ["a:1", "a:2"]) == [["x:1"], ["x:5"]]
    assert default_processes(1) == 2 and default_processes(2) == 4
    assert default_processes(64) == 8


def test_boot_scripts_name_the_portal_of_each_targets_process(state, inspector, tmp_path):
    from fakes import FakeImageStore, FakeTargetDriver
    from principals import ADMIN, ALICE
    from test_catalogue import upload

    from bmi_server.api.ipxe_scripts import render
    from bmi_server.core.boot import BootKind
    from bmi_server.core.models import Smbios, Visibility
    from bmi_server.server import Core

    store = FakeImageStore()
    tgtds = [FakeTargetDriver(), FakeTargetDriver()]
    pool = TgtdPool(tgtds, [["10.0.2.2:3260"], ["10.0.2.2:3261"]], state)
    core = Core.build(state, store, pool, advertised_portals=pool.portals(),
                      retry_seconds=5, portal_source=pool)
    upload(core, store, inspector, tmp_path, ADMIN, "golden", project="ops",
           visibility=Visibility.PUBLIC)
    macs = ["52:54:00:12:34:50", "52:54:00:12:34:51"]
    for i, mac in enumerate(macs):
        core.registry.enrol(ADMIN, name=f"n{i}", project="alice", macs=[mac])
    iqns = [core.provisioner.provision(ALICE, f"n{i}", image="golden").target.iqn
            for i in range(2)]
    for i, (mac, iqn) in enumerate(zip(macs, iqns, strict=True)):
        action = core.planner.action_for(mac, Smbios())
        assert action.kind is BootKind.SANBOOT
        assert list(action.portals) == [f"10.0.2.2:{3260 + i}"]
        assert f"iscsi:10.0.2.2::{3260 + i}:1:{iqn}" in render(action, "http://bmi/boot.ipxe")
        assert state.placement(iqn) == i


def test_settings_of_several_tgtd_processes():
    from bmi_gateway.config import load_gateway_settings
    from bmi_server.config import load_settings

    settings = load_settings(None, env={"BMI_TGT_PORTAL": "192.0.2.1:3260,192.0.2.1:4000",
                                        "BMI_TGTD_PROCESSES": "2"})
    assert settings.tgtd_processes == 2
    for bad in ({"BMI_TGTD_PROCESSES": "65"}, {"BMI_TGT_PORTAL": "192.0.2.1:3260,nope"}):
        with pytest.raises(InvalidArgument):
            load_settings(None, env=bad)
    gateway = load_gateway_settings(None, env={
        "BMI_GATEWAY_TGT_PORTAL": "192.0.2.9:3260", "BMI_GATEWAY_TGTD_PROCESSES": "3",
        "BMI_GATEWAY_ADVERTISED_PORTALS": "198.51.100.9:3260", "BMI_GATEWAY_TOKEN": "t"})
    assert gateway.process_endpoints() == [("192.0.2.9:3260", 0), ("192.0.2.9:3261", 1),
                                           ("192.0.2.9:3262", 2)]
    assert gateway.portals == ("198.51.100.9:3260", "198.51.100.9:3261", "198.51.100.9:3262")
