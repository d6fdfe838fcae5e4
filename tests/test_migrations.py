"""Versioned migrations on SQLite and PostgreSQL: the head makes exactly schema.py; a
database of the previous release (made by its create_all, no version table) with data
is recognised, upgraded, and everything reads back and still boots; several processes
upgrading one empty database at once; `bmi-server admin db current|upgrade`."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from bmi_server.adapters.sql import legacy, migrate
from bmi_server.adapters.sql.migrations import baseline_schema as old
from bmi_server.adapters.sql.schema import metadata
from bmi_server.adapters.sql.store import SqlStateStore
from bmi_server.core.errors import FailedPrecondition

HEAD = "0006_tgtd_processes"
LAST_UNVERSIONED = "0004_node_sessions"  # the newest shape the create_all path made
T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
MAC = "52:54:00:12:34:56"


@pytest.fixture(params=["sqlite", "postgres"])
def new_url(request, tmp_path):
    """new() -> the URL of a new, empty database of the backend."""
    if request.param == "postgres":
        return request.getfixturevalue("fresh_postgres")
    count = iter(range(1000))
    return lambda: f"sqlite:///{tmp_path / f'db{next(count)}.sqlite3'}"


def schema_diff(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn), metadata)
    finally:
        engine.dispose()


def execute(url: str, *statements: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))
    engine.dispose()


def previous_release(url: str, with_data: bool = True) -> None:
    """The database the release before versioned migrations made (its create_all), with
    a golden image, a disk cloned from it, a node provisioned on it (sanboot, target
    exported), its history, a free node, a boot token and a gateway's target row."""
    engine = create_engine(url)
    old.metadata.create_all(engine)
    if with_data:
        with engine.begin() as conn:
            _old_rows(conn)
    engine.dispose()


def _old_rows(conn) -> None:
    conn.execute(old.images.insert(), [dict(
        id="img-00000000000000a1", name="debian", project="alice", kind="golden",
        visibility="private", state="ready", size_bytes=1 << 30,
        volume="bmi-img-00000000000000a1", source="upload", request_id="alice/r1",
        create_time=T0, owner=None)])
    conn.execute(old.disks.insert(), [dict(
        id="dsk-00000000000000b1", name="web1-root", project="alice",
        image_id="img-00000000000000a1", image_name="debian", state="ready",
        size_bytes=1 << 30, volume="bmi-dsk-00000000000000b1", request_id=None,
        create_time=T0, owner=None)])
    common = dict(failure_reason="", smbios_uuid="", smbios_serial="SN1",
                  smbios_manufacturer="QEMU", smbios_product="Standard PC",
                  create_time=T0, last_seen_time=T0, request_id=None, owner=None)
    conn.execute(old.nodes.insert(), [
        dict(id="node-00000000000000c1", name="web1", project="alice", state="provisioned",
             disk_id="dsk-00000000000000b1", image_id="img-00000000000000a1", owns_disk=True,
             target_iqn="iqn.2026-11.org.moc.bmi:dsk-00000000000000b1",
             target_volume="bmi-dsk-00000000000000b1",
             initiator_iqn="iqn.2026-11.org.moc.bmi.node:node-00000000000000c1",
             chap_user="bmi-dsk-00000000000000b1", chap_secret="s3cret-chap",
             boot_mode=None, **common),
        dict(id="node-00000000000000c2", name="spare", project=None, state="available",
             disk_id=None, image_id=None, owns_disk=False, target_iqn=None,
             target_volume=None, initiator_iqn=None, chap_user=None, chap_secret=None,
             boot_mode="agent", **common),
    ])
    conn.execute(old.node_macs.insert(), [
        dict(mac=MAC, node_id="node-00000000000000c1"),
        dict(mac="52:54:00:12:34:57", node_id="node-00000000000000c2"),
    ])
    conn.execute(old.node_transitions.insert(), [
        dict(node_id="node-00000000000000c1", from_state=a, to_state=b, reason=why,
             time=T0, origin=None)
        for a, b, why in [("discovered", "available", "enrolled"),
                          ("available", "provisioning", "provision"),
                          ("provisioning", "provisioned", "target exported")]])
    conn.execute(old.boot_tokens.insert(), [dict(
        node_id="node-00000000000000c2", token_hash="ab" * 32, expire_time=T0)])
    conn.execute(old.gateway_targets.insert(), [dict(
        gateway="gw1", iqn="iqn.2026-11.org.moc.bmi:dsk-00000000000000b1",
        volume="bmi-dsk-00000000000000b1", initiator_iqn="iqn.i", chap_user="u",
        chap_secret="s", revision=7, removed=False, status="applied", detail="",
        logged_in=True)])


def test_the_head_makes_exactly_schema_py(new_url):
    """Guards every later change: a schema.py change without its revision (or a revision
    that makes something else) fails here, with the difference."""
    url = new_url()
    engine = create_engine(url)
    assert migrate.version(engine).origin == "nothing"
    SqlStateStore(url).close()
    assert schema_diff(url) == []
    assert migrate.head() == HEAD
    assert migrate.version(engine).at_head
    engine.dispose()


def test_a_previous_release_database_with_data_upgrades_and_still_boots(new_url):
    from fakes import FakeImageStore, FakeTargetDriver

    from bmi_server.core.boot import BootKind
    from bmi_server.core.models import BootMode, NodeState, ResourceState, Smbios
    from bmi_server.server import Core

    url = new_url()
    previous_release(url)
    engine = create_engine(url)
    found = migrate.version(engine)
    assert (found.current, found.unversioned, found.shape) == (None, True, "0001_baseline")
    assert "unversioned" in found.describe()
    engine.dispose()

    store = SqlStateStore(url)
    try:
        image = store.get_image("img-00000000000000a1")
        assert (image.name, image.state, image.request_id) == ("debian", ResourceState.READY,
                                                              "alice/r1")
        disk = store.get_disk("dsk-00000000000000b1")
        assert (disk.image_id, disk.volume) == (image.id, "bmi-dsk-00000000000000b1")
        node = store.find_node_by_mac(MAC)
        assert (node.name, node.state, node.disk_id) == ("web1", NodeState.PROVISIONED, disk.id)
        assert node.target.iqn == "iqn.2026-11.org.moc.bmi:dsk-00000000000000b1"
        assert (node.target.chap_user, node.target.chap_secret) == (
            "bmi-dsk-00000000000000b1", "s3cret-chap")
        assert node.target.config_volume == "" and node.instance_id == ""
        assert node.boot_mode is BootMode.SANBOOT and store.get_node_config(node.id) is None
        assert [(t.to_state, t.reason) for t in store.node_history(node.id, 10)] == [
            (NodeState.AVAILABLE, "enrolled"), (NodeState.PROVISIONING, "provision"),
            (NodeState.PROVISIONED, "target exported")]
        assert store.get_node("node-00000000000000c2").boot_mode is BootMode.AGENT
        assert store.target_sessions() == {node.target.iqn: None}

        # What the node needs to boot: its boot script names its target and credentials.
        core = Core.build(store, FakeImageStore(), FakeTargetDriver(),
                          advertised_portals=["10.0.2.2:3260"], retry_seconds=5)
        action = core.planner.action_for(MAC, Smbios())
        assert action.kind is BootKind.SANBOOT
        assert action.target == node.target and action.portals == ("10.0.2.2:3260",)
        assert store.get_node(node.id).state is NodeState.BOOTING
    finally:
        store.close()
    assert schema_diff(url) == []


@pytest.mark.parametrize("shape", ["0001_baseline", "0002_project_quotas",
                                   "0003_config_drives", LAST_UNVERSIONED])
def test_each_unversioned_shape_is_recognised_and_completed(new_url, shape):
    """What the create_all path had made by each release of it, as its start left it."""
    url = new_url()
    previous_release(url, with_data=False)
    steps = ["0002_project_quotas", "0003_config_drives", LAST_UNVERSIONED]
    later = steps[: steps.index(shape) + 1] if shape in steps else []
    if later:
        engine = create_engine(url)
        with engine.begin() as conn:
            # Made as those releases did: the current tables of what they added.
            tables = {"0002_project_quotas": ["project_quotas"],
                      "0003_config_drives": ["node_configs"]}
            for step in later:
                for name in tables.get(step, []):
                    metadata.tables[name].create(conn)
        engine.dispose()
        columns = {"0003_config_drives": [("nodes", "instance_id VARCHAR(32)"),
                                          ("nodes", "hostname VARCHAR(253)"),
                                          ("nodes", "config_volume VARCHAR(64)"),
                                          ("gateway_targets", "config_volume VARCHAR(64)")],
                   LAST_UNVERSIONED: [("nodes", "session_iqn VARCHAR(255)"),
                          ("nodes", "session_state VARCHAR(16)"),
                          ("nodes", f"session_time {_timestamp(url)}")]}
        for step in later:
            execute(url, *(f"ALTER TABLE {t} ADD COLUMN {c}" for t, c in columns.get(step, [])))
        if LAST_UNVERSIONED in later:
            execute(url, "CREATE INDEX ix_nodes_target_iqn ON nodes (target_iqn)")
    engine = create_engine(url)
    with engine.connect() as conn:
        assert legacy.is_unversioned(conn) and legacy.shape(conn) == shape
    found, now = migrate.upgrade(engine)
    assert (found.shape, now.current) == (shape, HEAD)
    engine.dispose()
    assert schema_diff(url) == []


def _timestamp(url: str) -> str:
    return "TIMESTAMP WITH TIME ZONE" if url.startswith("postgresql") else "DATETIME"


def test_a_half_done_start_of_an_unversioned_server_is_completed(new_url):
    """The unversioned start added columns one by one: stopped between two, the database
    has part of a revision; it is stamped at the last whole one and the rest is made."""
    url = new_url()
    SqlStateStore(url).close()
    execute(url, "DROP TABLE alembic_version", "DROP INDEX ix_nodes_target_iqn",
            "ALTER TABLE nodes DROP COLUMN session_time")
    store = SqlStateStore(url)
    store.close()
    assert schema_diff(url) == []


def test_a_database_older_than_the_baseline_gets_what_that_release_added(tmp_path):
    """Before agents there was no nodes.boot_mode: the baseline adds it, as the start of
    that release did."""
    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    previous_release(url)
    execute(url, "ALTER TABLE nodes DROP COLUMN boot_mode")
    engine = create_engine(url)
    with engine.connect() as conn:
        assert legacy.is_unversioned(conn) and legacy.shape(conn) is None
    assert migrate.version(engine).origin == "a schema older than 0001"
    engine.dispose()
    store = SqlStateStore(url)
    try:
        assert store.find_node_by_mac(MAC).target.chap_secret == "s3cret-chap"
    finally:
        store.close()
    assert schema_diff(url) == []


def test_a_newer_database_is_refused_and_so_is_an_old_one_without_auto_upgrade(new_url):
    url = new_url()
    previous_release(url)
    with pytest.raises(FailedPrecondition, match="admin db upgrade"):
        SqlStateStore(url, upgrade=False)
    SqlStateStore(url).close()
    SqlStateStore(url, upgrade=False).close()
    execute(url, "UPDATE alembic_version SET version_num = '0099_from_the_future'")
    with pytest.raises(FailedPrecondition, match="newer than this server knows"):
        SqlStateStore(url)


def test_a_failed_migration_leaves_the_database_as_it_was(new_url, monkeypatch):
    """The lock's transaction holds the DDL too: nothing half made, nothing stamped."""
    url = new_url()
    previous_release(url)
    from bmi_server.adapters.sql.migrations import guarded

    real = guarded.add_column

    def failing(table, column):
        if column.name == "session_iqn":
            raise RuntimeError("disk full")
        real(table, column)

    monkeypatch.setattr(guarded, "add_column", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        SqlStateStore(url)
    engine = create_engine(url)
    assert "project_quotas" not in inspect(engine).get_table_names()
    assert migrate.version(engine).shape == "0001_baseline"
    engine.dispose()


def _cli(url: str, *args: str, state_dir) -> subprocess.Popen:
    env = {**os.environ, "BMI_DATABASE_URL": url, "BMI_STATE_DIR": str(state_dir)}
    return subprocess.Popen([sys.executable, "-m", "bmi_server.main", "admin", "db", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_admin_db_upgrade_four_at_once_then_current_prints_the_head(new_url, tmp_path):
    url = new_url()
    previous_release(url)
    out = _cli(url, "current", state_dir=tmp_path / "s").communicate(timeout=120)[0]
    assert out.startswith("none: unversioned") and "0001_baseline" in out
    runs = [_cli(url, "upgrade", state_dir=tmp_path / f"s{n}") for n in range(4)]
    results = [(p.communicate(timeout=120), p.returncode) for p in runs]
    assert [code for _, code in results] == [0] * 4, results
    said = sorted(out for (out, _), _ in results)
    assert sum("upgraded from 0001_baseline" in s for s in said) == 1, said
    assert sum("nothing to do" in s for s in said) == 3, said
    current = _cli(url, "current", state_dir=tmp_path / "s")
    out, err = current.communicate(timeout=120)
    assert current.returncode == 0, err
    assert out.strip() == f"{HEAD} (head)"
    assert schema_diff(url) == []


def test_admin_db_on_a_newer_database_says_so_and_changes_nothing(tmp_path):
    """A database a later release migrated: `current` names it newer, `upgrade` exits
    with the reason and leaves it as it was."""
    url = f"sqlite:///{tmp_path / 'newer.sqlite3'}"
    SqlStateStore(url).close()
    execute(url, "UPDATE alembic_version SET version_num = '0099_from_the_future'",
            "CREATE TABLE from_the_future (id INTEGER PRIMARY KEY)")
    current = _cli(url, "current", state_dir=tmp_path / "s")
    out, err = current.communicate(timeout=120)
    assert current.returncode == 0, err
    assert out.startswith("0099_from_the_future: newer than this server knows") and HEAD in out
    upgrade = _cli(url, "upgrade", state_dir=tmp_path / "s")
    out, err = upgrade.communicate(timeout=120)
    assert upgrade.returncode == 1 and out == ""
    assert "bmi-server: database schema is 0099_from_the_future: newer" in err
    assert "upgrade this server" in err and "Traceback" not in err
    engine = create_engine(url)
    assert migrate.version(engine).current == "0099_from_the_future"
    assert "from_the_future" in inspect(engine).get_table_names()
    engine.dispose()


def test_downgrades_go_back_to_the_baseline_and_up_again(new_url):
    """Downgrades are not an operator's tool (restore the backup), but each revision's
    must undo its upgrade, or a developer's trial of a new one cannot be undone."""
    from alembic.config import Config
    from alembic.runtime.environment import EnvironmentContext

    url = new_url()
    SqlStateStore(url).close()
    scripts = migrate.script()
    engine = create_engine(url)
    with engine.begin() as conn, EnvironmentContext(
        Config(), scripts, fn=lambda heads, _ctx: scripts._downgrade_revs("0001_baseline", heads)
    ) as env:
        env.configure(connection=conn, render_as_batch=True)
        env.run_migrations()
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), old.metadata) == []
    assert migrate.version(engine).current == "0001_baseline"
    migrate.upgrade(engine)
    engine.dispose()
    assert schema_diff(url) == []
