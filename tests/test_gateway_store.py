"""The gateway tables on SQLite and PostgreSQL: revisions are unique and commit in order, so
a watcher following changes by revision never misses one, even with concurrent writers."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime

from test_sql_store import sql  # noqa: F401 - fixture (postgres_url: conftest.py)

from bmi_server.core.models import ExportStatus, Gateway, TargetReport, TargetSpec


def spec(n: int, secret: str = "s3cret") -> TargetSpec:
    return TargetSpec(f"iqn.2026-11.org.moc.bmi:dsk-{uuid.uuid4().hex[:8]}-{n}", f"bmi-{n}",
                      f"iqn.2026-11.org.moc.bmi.node:{n}", f"bmi-{n}", secret)


def test_concurrent_writers_never_hide_a_change_from_a_watcher(sql):  # noqa: F811
    gw = "gw-" + uuid.uuid4().hex[:8]
    start, _ = sql.snapshot(gw)
    made: list[str] = []
    seen: dict[str, int] = {}
    done = threading.Event()

    def writer(k: int) -> None:
        for n in range(10):
            s = spec(k * 100 + n)
            sql.assign(s, [gw])
            made.append(s.iqn)

    def watcher() -> None:
        after = start
        while True:
            finished = done.is_set()
            after, changes = sql.changes(gw, after)
            for change in changes:
                assert change.iqn not in seen, "a change was delivered twice"
                seen[change.iqn] = change.revision
            if finished:
                return

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    follower = threading.Thread(target=watcher)
    follower.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    follower.join()
    assert sorted(seen) == sorted(made)
    assert len(set(seen.values())) == len(made)  # one revision per change


def test_assignment_life_cycle(sql):  # noqa: F811
    gw1, gw2 = ("gw-" + uuid.uuid4().hex[:8] for _ in range(2))
    s = spec(1)
    sql.assign(s, [gw1, gw2])
    rows = sql.assignments(s.iqn)
    assert {a.gateway for a in rows} == {gw1, gw2}
    assert all(a.status is ExportStatus.PENDING and not a.removed for a in rows)
    revision = rows[0].revision
    sql.assign(s, [gw1, gw2])  # the same spec again: no change for the gateways
    assert [a.revision for a in sql.assignments(s.iqn)] == [revision, revision]
    sql.record(gw1, [TargetReport(s.iqn, revision, ExportStatus.APPLIED)])
    sql.record_sessions(gw1, [s.iqn])
    applied = next(a for a in sql.assignments(s.iqn) if a.gateway == gw1)
    assert applied.status is ExportStatus.APPLIED and applied.logged_in
    sql.save_gateway(Gateway(gw1, ("192.0.2.1:3260",), datetime.now(UTC), "run-1"))
    assert sql.save_gateway(Gateway(gw1, ("192.0.2.1:3260",), datetime.now(UTC), "run-2"))
    restarted = next(a for a in sql.assignments(s.iqn) if a.gateway == gw1)
    assert restarted.status is ExportStatus.PENDING and not restarted.logged_in
    sql.unassign(s.iqn)
    removal = sql.assignments(s.iqn)[0].revision
    assert removal > revision and all(a.removed for a in sql.assignments(s.iqn))
    sql.record(gw1, [TargetReport(s.iqn, removal, None)])
    assert [a.gateway for a in sql.assignments(s.iqn)] == [gw2]


def test_a_config_drive_travels_with_the_target_spec(sql):  # noqa: F811
    """LUN 2's volume is part of the desired spec: it reaches the gateway's watch, and the
    same spec assigned again (with or without a drive) is no change."""
    from dataclasses import replace

    gw = "gw-" + uuid.uuid4().hex[:8]
    start, _ = sql.snapshot(gw)
    plain, drive = spec(1), replace(spec(2), config_volume="bmi-cfg-00000000000000c3")
    for s in (plain, drive):
        sql.assign(s, [gw])
    _, changes = sql.changes(gw, start)
    assert {c.iqn: c.spec for c in changes} == {plain.iqn: plain, drive.iqn: drive}
    revisions = {s.iqn: sql.assignments(s.iqn)[0].revision for s in (plain, drive)}
    for s in (plain, drive):
        sql.assign(s, [gw])
        assert sql.assignments(s.iqn)[0].revision == revisions[s.iqn]
    moved = replace(drive, config_volume="bmi-cfg-00000000000000c4")
    sql.assign(moved, [gw])
    assert sql.assignments(drive.iqn)[0].revision > revisions[drive.iqn]
    assert {c.iqn: c.spec for c in sql.snapshot(gw)[1]}[moved.iqn] == moved
