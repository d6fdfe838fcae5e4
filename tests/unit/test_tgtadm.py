"""TgtTargetDriver against a recorded, in-memory imitation of tgtadm (no tgtd needed)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from bmi_server.adapters.tgt.tgtadm import TgtTargetDriver, parse_targets
from bmi_server.core.errors import FailedPrecondition, InvalidArgument, Unavailable
from bmi_server.core.models import TargetSpec

PREFIX = "iqn.2026-11.org.moc.bmi:"
CONF = "/etc/ceph/test.conf"
SECRET = "s3cret-Very-Private"


@dataclass
class FakeTarget:
    iqn: str
    luns: dict[int, str] = field(default_factory=dict)  # lun -> backing store
    accounts: set[str] = field(default_factory=set)
    acl: set[str] = field(default_factory=set)


class FakeTgtadm:
    """Answers tgtadm argv like tgt 1.0.85 does (messages and exit codes seen on a real tgtd)."""

    def __init__(self) -> None:
        self.targets: dict[int, FakeTarget] = {}
        self.accounts: dict[str, str] = {}  # user -> password
        self.missing_volumes: set[str] = set()
        self.fail_acl = False
        self.down = False
        self.calls: list[list[str]] = []
        self._lock = threading.Lock()

    def __call__(self, argv: Sequence[str]) -> tuple[int, str, str]:
        argv = list(argv)
        with self._lock:
            self.calls.append(argv)
            if self.down:
                return 107, "", ("tgtadm: failed to send request hdr to tgt daemon, "
                                 "Transport endpoint is not connected\n")
            try:
                return 0, self._do(argv), ""
            except KeyError as e:
                return 22, "", f"tgtadm: {e.args[0]}\n"

    def restart(self) -> None:
        with self._lock:
            self.targets.clear()
            self.accounts.clear()

    def add_target(self, tid: int, iqn: str, user: str | None = None) -> None:
        with self._lock:
            t = self.targets[tid] = FakeTarget(iqn, {1: f"rbd/v{tid}"}, acl={"iqn.x:i"})
            if user:
                self.accounts[user] = "pw"
                t.accounts.add(user)

    def _do(self, argv: list[str]) -> str:
        assert argv[:3] == ["tgtadm", "--lld", "iscsi"]
        opt = {argv[i]: argv[i + 1] for i in range(3, len(argv) - 1) if argv[i].startswith("-")}
        op, mode = opt["--op"], opt["--mode"]
        tid = int(opt.get("--tid", 0))
        if (op, mode) == ("show", "target"):
            return self._show()
        if mode == "account" and op in ("new", "delete"):
            user = opt["--user"]
            if op == "new":
                if user in self.accounts:
                    raise KeyError("this account already exists")
                self.accounts[user] = opt["--password"]
            else:
                if user not in self.accounts:
                    raise KeyError("can't find the account")
                del self.accounts[user]
                for t in self.targets.values():
                    t.accounts.discard(user)
            return ""
        if (op, mode) == ("new", "target"):
            if tid in self.targets or any(t.iqn == opt["--targetname"]
                                          for t in self.targets.values()):
                raise KeyError("this target already exists")
            self.targets[tid] = FakeTarget(opt["--targetname"])
            return ""
        if tid not in self.targets:
            raise KeyError("can't find the target")
        target = self.targets[tid]
        if (op, mode) == ("delete", "target"):
            del self.targets[tid]
        elif (op, mode) == ("new", "logicalunit"):
            lun = int(opt["--lun"])
            if lun in target.luns:
                raise KeyError("this logical unit number already exists")
            if opt["--backing-store"].split("/")[1] in self.missing_volumes:
                raise KeyError("invalid request")
            target.luns[lun] = opt["--backing-store"]
        elif (op, mode) == ("bind", "account"):
            if opt["--user"] not in self.accounts:
                raise KeyError("can't find the account")
            if opt["--user"] in target.accounts:
                raise KeyError("this account already exists")
            target.accounts.add(opt["--user"])
        elif (op, mode) == ("bind", "target"):
            if self.fail_acl:
                raise KeyError("out of memory")
            name = opt["--initiator-name"]
            if name in target.acl:
                raise KeyError("this access control rule already exists")
            target.acl.add(name)
        else:
            raise AssertionError(f"unexpected tgtadm call {argv}")
        return ""

    def _show(self) -> str:
        out = []
        for tid, t in sorted(self.targets.items()):
            out += [f"Target {tid}: {t.iqn}", "    System information:", "        Driver: iscsi",
                    "        State: ready", "    I_T nexus information:",
                    "        I_T nexus: 3", "            Initiator: iqn.x:i alias: none",
                    "    LUN information:", "        LUN: 0", "            Type: controller"]
            for lun, path in sorted(t.luns.items()):
                out += [f"        LUN: {lun}", "            Type: disk",
                        f"            Backing store path: {path}"]
            out += ["    Account information:", *(f"        {u}" for u in sorted(t.accounts)),
                    "    ACL information:", *(f"        {a}" for a in sorted(t.acl))]
        return "\n".join(out) + "\n"

    # Inspection helpers.
    def by_iqn(self, iqn: str) -> tuple[int, FakeTarget] | None:
        return next(((tid, t) for tid, t in self.targets.items() if t.iqn == iqn), None)

    def ops(self) -> list[tuple[str, str]]:
        return [(c[c.index("--op") + 1], c[c.index("--mode") + 1]) for c in self.calls]


def spec(n: int | str, secret: str = SECRET) -> TargetSpec:
    return TargetSpec(iqn=f"{PREFIX}dsk-{n}", volume=f"vol-{n}",
                      initiator_iqn=f"iqn.2026-11.org.moc.node:{n}", chap_user=f"u-{n}",
                      chap_secret=secret)


@pytest.fixture
def tgt() -> FakeTgtadm:
    return FakeTgtadm()


def make_driver(tgt: FakeTgtadm) -> TgtTargetDriver:
    return TgtTargetDriver(CONF, "rbd", "127.0.0.1:3260", control=7, runner=tgt)


def test_create_export_makes_target_lun_chap_and_initiator_acl(tgt):
    driver = make_driver(tgt)
    driver.create_export(spec(1))

    _, target = tgt.by_iqn(f"{PREFIX}dsk-1")
    assert target.luns == {1: "rbd/vol-1"}
    assert target.accounts == {"u-1"} and tgt.accounts == {"u-1": SECRET}
    assert target.acl == {"iqn.2026-11.org.moc.node:1"}
    lun_call = next(c for c in tgt.calls if "logicalunit" in c)
    assert lun_call[lun_call.index("--bstype") + 1] == "rbd"
    assert lun_call[lun_call.index("--bsopts") + 1] == f"conf={CONF}"
    assert all(c[3:5] == ["-C", "7"] for c in tgt.calls)
    # Never an address ACL (let alone ALL): behind NAT every node has the same address.
    assert not any("--initiator-address" in c or "-I" in c for c in tgt.calls)
    # CHAP is bound before the ACL opens the target to its initiator.
    assert tgt.ops().index(("bind", "account")) < tgt.ops().index(("bind", "target"))
    assert driver.list_exports() == [f"{PREFIX}dsk-1"]
    assert driver.portals() == ["127.0.0.1:3260"]


@pytest.mark.parametrize("user", ["bmi", "client.bmi"])
def test_rbd_user_goes_into_bsopts(tgt, user):
    TgtTargetDriver(CONF, "rbd", "p:1", runner=tgt, rbd_user=user).create_export(spec(1))
    lun_call = next(c for c in tgt.calls if "logicalunit" in c)
    # tgt-rbd's id= is librados' id: client.bmi as "bmi" (not "client.client.bmi").
    assert lun_call[lun_call.index("--bsopts") + 1] == f"conf={CONF};id=bmi"


def test_create_export_twice_gives_one_target(tgt):
    driver = make_driver(tgt)
    driver.create_export(spec(1))
    driver.create_export(spec(1))
    assert [t.iqn for t in tgt.targets.values()] == [f"{PREFIX}dsk-1"]
    assert tgt.ops().count(("new", "target")) == 1


def test_create_export_completes_a_half_made_target(tgt):
    tgt.add_target(5, f"{PREFIX}dsk-1")  # LUN present, no CHAP, wrong ACL
    driver = make_driver(tgt)
    driver.create_export(spec(1))
    target = tgt.targets[5]
    assert target.accounts == {"u-1"}
    assert "iqn.2026-11.org.moc.node:1" in target.acl
    assert len(tgt.targets) == 1


def test_changed_secret_replaces_the_account(tgt):
    driver = make_driver(tgt)
    driver.create_export(spec(1, secret="old-secret-123"))
    driver.create_export(spec(1, secret="new-secret-456"))
    assert tgt.accounts == {"u-1": "new-secret-456"}
    assert tgt.by_iqn(f"{PREFIX}dsk-1")[1].accounts == {"u-1"}


def test_new_tids_follow_the_existing_ones(tgt):
    tgt.add_target(41, f"{PREFIX}old")
    driver = make_driver(tgt)
    driver.create_export(spec(1))
    assert tgt.by_iqn(f"{PREFIX}dsk-1")[0] == 42


@pytest.mark.parametrize("existing", [10, 2000])
def test_create_and_remove_cost_does_not_grow_with_targets(tgt, existing):
    for n in range(existing):
        tgt.add_target(n + 1, f"{PREFIX}old-{n}", user=f"old-{n}")
    driver = make_driver(tgt)
    tgt.calls.clear()
    driver.create_export(spec("new"))
    create_calls = list(tgt.ops())
    tgt.calls.clear()
    driver.remove_export(spec("new").iqn)
    assert ("show", "target") not in create_calls + tgt.ops()
    assert create_calls == [("new", "target"), ("new", "logicalunit"), ("new", "account"),
                            ("bind", "account"), ("bind", "target")]
    assert tgt.ops() == [("delete", "target"), ("delete", "account")]


def test_concurrent_creates_get_distinct_tids(tgt):
    driver = make_driver(tgt)
    specs = [spec(n) for n in range(60)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(driver.create_export, specs + specs))  # each spec twice, concurrently
    assert sorted(t.iqn for t in tgt.targets.values()) == sorted(s.iqn for s in specs)
    assert len(tgt.targets) == 60  # distinct tids: a shared tid would have failed a create
    for s in specs:
        assert tgt.by_iqn(s.iqn)[1].acl == {s.initiator_iqn}


def test_tid_taken_by_another_process_is_skipped(tgt):
    driver = make_driver(tgt)
    driver.create_export(spec(1))  # tid 1
    tgt.add_target(2, f"{PREFIX}other-process")  # behind our back
    tgt.add_target(3, f"{PREFIX}other-process-2")
    driver.create_export(spec(2))
    assert tgt.by_iqn(f"{PREFIX}dsk-2")[0] == 4
    assert tgt.targets[2].iqn == f"{PREFIX}other-process"


def test_target_made_by_another_process_is_completed_not_duplicated(tgt):
    driver = make_driver(tgt)
    tgt.add_target(1, f"{PREFIX}dsk-1")
    driver.create_export(spec(1))
    assert len(tgt.targets) == 1 and tgt.targets[1].accounts == {"u-1"}


def test_lun_failure_rolls_back_and_hides_the_secret(tgt, caplog):
    caplog.set_level(logging.DEBUG)
    tgt.missing_volumes.add("vol-1")
    driver = make_driver(tgt)
    with pytest.raises(FailedPrecondition) as err:
        driver.create_export(spec(1))
    assert "invalid request" in err.value.message and "vol-1" in err.value.message
    assert SECRET not in str(err.value)
    assert tgt.targets == {} and tgt.accounts == {}
    assert driver.list_exports() == []
    assert caplog.records  # commands were logged, redacted
    assert SECRET not in caplog.text


def test_acl_failure_rolls_back_target_and_account(tgt, caplog):
    caplog.set_level(logging.DEBUG)
    tgt.fail_acl = True
    driver = make_driver(tgt)
    with pytest.raises(FailedPrecondition) as err:
        driver.create_export(spec(1))
    assert "out of memory" in err.value.message
    assert tgt.targets == {} and tgt.accounts == {}
    assert "--password ***" in caplog.text
    assert SECRET not in caplog.text and SECRET not in str(err.value)
    tgt.fail_acl = False
    driver.create_export(spec(1))  # the rolled-back tid left nothing behind
    assert len(tgt.targets) == 1


def test_secret_echoed_by_tgtadm_is_redacted(tgt):
    def runner(argv):
        if "--password" in argv:  # a tgtadm that quotes its arguments in its error
            return 22, "", f"tgtadm: cannot add {' '.join(argv)}"
        return tgt(argv)

    driver = TgtTargetDriver(CONF, "rbd", "p:1", runner=runner)
    with pytest.raises(FailedPrecondition) as err:
        driver.create_export(spec(1))
    assert "cannot add" in err.value.message
    assert SECRET not in str(err.value) and SECRET not in repr(err.value)
    assert tgt.targets == {}


def test_remove_export_deletes_target_and_account_and_is_idempotent(tgt):
    driver = make_driver(tgt)
    driver.create_export(spec(1))
    driver.create_export(spec(2))
    driver.remove_export(spec(1).iqn)
    assert [t.iqn for t in tgt.targets.values()] == [spec(2).iqn]
    assert set(tgt.accounts) == {"u-2"}
    driver.remove_export(spec(1).iqn)
    driver.remove_export(f"{PREFIX}never-made")
    assert driver.list_exports() == [spec(2).iqn]


def test_remove_export_by_a_new_driver_finds_the_account_in_tgtd(tgt):
    make_driver(tgt).create_export(spec(1))
    make_driver(tgt).remove_export(spec(1).iqn)  # a restarted server: map read from tgtd
    assert tgt.targets == {} and tgt.accounts == {}


def test_target_made_by_another_replica_after_our_listing_is_removed(tgt):
    ours, theirs = make_driver(tgt), make_driver(tgt)
    ours.create_export(spec(1))  # our map is read now, before theirs makes dsk-2
    theirs.create_export(spec(2))
    ours.remove_export(spec(2).iqn)
    assert [t.iqn for t in tgt.targets.values()] == [spec(1).iqn]
    assert set(tgt.accounts) == {"u-1"}


def test_tgtd_down_is_unavailable(tgt):
    tgt.down = True
    driver = make_driver(tgt)  # the server may start before tgtd
    with pytest.raises(Unavailable) as err:
        driver.create_export(spec(1))
    assert "tgt daemon" in err.value.message and SECRET not in str(err.value)
    tgt.down = False
    driver.create_export(spec(1))
    assert driver.list_exports() == [spec(1).iqn]


def test_missing_tgtadm_is_unavailable():
    driver = TgtTargetDriver(CONF, "rbd", "p:1", runner=lambda argv: (-1, "", "tgtadm not found"))
    with pytest.raises(Unavailable):
        driver.list_exports()


def test_rejects_names_outside_the_prefix(tgt):
    driver = make_driver(tgt)
    bad = TargetSpec("iqn.2000-01.com.other:x", "v", "iqn.i", "u", "p")
    with pytest.raises(InvalidArgument):
        driver.create_export(bad)
    with pytest.raises(InvalidArgument):
        driver.create_export(TargetSpec(f"{PREFIX}x", "pool/v", "iqn.i", "u", "p"))
    assert tgt.targets == {}


def test_ensure_exports_recreates_after_restart_and_reports_strays(tgt):
    driver = make_driver(tgt)
    for n in (1, 2, 3):
        driver.create_export(spec(n))
    tgt.restart()  # tgtd lost everything
    tgt.add_target(9, f"{PREFIX}stray")
    tgt.add_target(10, "iqn.2000-01.com.other:not-ours")
    strays = driver.ensure_exports([spec(1), spec(2), spec(3)])
    assert strays == [f"{PREFIX}stray"]
    assert sorted(t.iqn for t in tgt.targets.values()) == sorted(
        [spec(1).iqn, spec(2).iqn, spec(3).iqn, f"{PREFIX}stray", "iqn.2000-01.com.other:not-ours"])
    for n in (1, 2, 3):
        _, target = tgt.by_iqn(spec(n).iqn)
        assert target.luns == {1: f"rbd/vol-{n}"} and target.accounts == {f"u-{n}"}
        assert tgt.accounts[f"u-{n}"] == SECRET
    # Nothing to do the second time: one listing, no changes.
    tgt.calls.clear()
    assert driver.ensure_exports([spec(1), spec(2), spec(3)]) == [f"{PREFIX}stray"]
    assert tgt.ops() == [("show", "target")]


def test_ensure_exports_asks_again_before_re_creating(tgt):
    """A target removed since the caller read its specs (a deprovisioning) stays away."""
    driver = make_driver(tgt)
    for n in (1, 2):
        driver.create_export(spec(n))
    tgt.restart()
    asked = []
    driver.ensure_exports([spec(1), spec(2)],
                          still_wanted=lambda iqn: asked.append(iqn) or iqn == spec(2).iqn)
    assert asked == [spec(1).iqn, spec(2).iqn]
    assert [t.iqn for t in tgt.targets.values()] == [spec(2).iqn]


def test_ensure_exports_completes_incomplete_targets(tgt):
    driver = make_driver(tgt)
    driver.create_export(spec(1))
    _, target = tgt.by_iqn(spec(1).iqn)
    target.acl.clear()
    assert driver.ensure_exports([spec(1)]) == []
    assert target.acl == {spec(1).initiator_iqn}


def test_ensure_exports_reports_failures_after_trying_all(tgt):
    driver = make_driver(tgt)
    tgt.missing_volumes.add("vol-1")
    with pytest.raises(FailedPrecondition) as err:
        driver.ensure_exports([spec(1), spec(2)])
    assert "1 of 2" in err.value.message and SECRET not in err.value.message
    assert [t.iqn for t in tgt.targets.values()] == [spec(2).iqn]


def test_stale_map_after_unnoticed_restart_is_recovered(tgt):
    driver = make_driver(tgt)
    driver.create_export(spec(1))
    tgt.restart()  # without ensure_exports: the map still names tid 1
    driver.create_export(spec(1))
    assert [t.iqn for t in tgt.targets.values()] == [spec(1).iqn]
    assert tgt.by_iqn(spec(1).iqn)[1].luns == {1: "rbd/vol-1"}


def test_parse_targets_of_real_output():
    show = """\
Target 1: iqn.2026-11.org.moc.bmi:t1
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
        I_T nexus: 2
            Initiator: iqn.2026-11.org.moc.bmi:init1 alias: none
            Connection: 0
                IP Address: 127.0.0.1
    LUN information:
        LUN: 0
            Type: controller
            Backing store path: None
        LUN: 1
            Type: disk
            Size: 67 MB, Block size: 512
            Backing store type: rbd
            Backing store path: rbd/vol1
    Account information:
        u1
        out1 (outgoing)
    ACL information:
        iqn.2026-11.org.moc.bmi:init1
Target 12: iqn.2026-11.org.moc.bmi:t2
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
    Account information:
    ACL information:
"""
    targets = parse_targets(show)
    assert set(targets) == {"iqn.2026-11.org.moc.bmi:t1", "iqn.2026-11.org.moc.bmi:t2"}
    t1 = targets["iqn.2026-11.org.moc.bmi:t1"]
    assert (t1.tid, t1.luns, t1.accounts) == (1, {0, 1}, {"u1"})
    assert t1.acl == {"iqn.2026-11.org.moc.bmi:init1"}
    t2 = targets["iqn.2026-11.org.moc.bmi:t2"]
    assert (t2.tid, t2.luns, t2.accounts, t2.acl) == (12, {0}, set(), set())


def with_drive(n: int) -> TargetSpec:
    return TargetSpec(f"{PREFIX}dsk-{n}", f"vol-{n}", f"iqn.2026-11.org.moc.node:{n}",
                      f"u-{n}", SECRET, config_volume=f"bmi-cfg-{n}")  # fmt: skip


def test_a_config_drive_is_lun_2_behind_the_same_chap_and_acl(tgt):
    driver = make_driver(tgt)
    driver.create_export(with_drive(1))
    _, target = tgt.by_iqn(f"{PREFIX}dsk-1")
    assert target.luns == {1: "rbd/vol-1", 2: "rbd/bmi-cfg-1"}
    assert target.accounts == {"u-1"} and target.acl == {"iqn.2026-11.org.moc.node:1"}
    luns = [c for c in tgt.calls if "logicalunit" in c]
    assert [c[c.index("--lun") + 1] for c in luns] == ["1", "2"]
    assert all(c[c.index("--bstype") + 1] == "rbd" and c[c.index("--bsopts") + 1] == f"conf={CONF}"
               for c in luns)  # fmt: skip
    # The drive's LUN is there before CHAP and ACL open the target.
    ops = tgt.ops()
    assert ops.index(("new", "logicalunit"), ops.index(("new", "logicalunit")) + 1) < ops.index(
        ("bind", "target"))
    assert driver.config_backing_store(with_drive(1)) == "rbd/bmi-cfg-1"
    assert driver.config_backing_store(spec(1)) is None


def test_a_missing_config_drive_lun_is_added_by_ensure_exports(tgt):
    driver = make_driver(tgt)
    driver.create_export(spec(1))  # as made before config drives: LUN 1 only
    tgt.calls.clear()
    assert driver.ensure_exports([with_drive(1)]) == []
    assert tgt.by_iqn(f"{PREFIX}dsk-1")[1].luns == {1: "rbd/vol-1", 2: "rbd/bmi-cfg-1"}
    assert ("new", "target") not in tgt.ops()  # completed in place: sessions stay
    tgt.calls.clear()
    assert driver.ensure_exports([with_drive(1)]) == []
    assert tgt.ops() == [("show", "target")]  # complete: nothing to do


def test_a_config_drive_that_cannot_be_opened_rolls_the_target_back(tgt, caplog):
    tgt.missing_volumes.add("bmi-cfg-1")
    driver = make_driver(tgt)
    with caplog.at_level(logging.DEBUG), pytest.raises(FailedPrecondition, match="LUN 2") as e:
        driver.create_export(with_drive(1))
    assert "does the volume exist?" in e.value.message
    assert tgt.targets == {} and tgt.accounts == {}
    assert SECRET not in e.value.message and SECRET not in caplog.text


@pytest.mark.parametrize("volume", ["pool/x", "x@snap", "a b", "a;id=admin", "a,b"])
def test_config_volume_names_that_would_change_the_command_are_refused(tgt, volume):
    driver = make_driver(tgt)
    bad = TargetSpec(f"{PREFIX}dsk-1", "vol-1", "iqn.i", "u", "p", config_volume=volume)
    with pytest.raises(InvalidArgument, match="bad volume name"):
        driver.create_export(bad)
    assert tgt.calls == [["tgtadm", "--lld", "iscsi", "-C", "7", "--op", "show", "--mode",
                          "target"]]  # fmt: skip
