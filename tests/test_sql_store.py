"""The SQL state store on SQLite and PostgreSQL: constraints, paging, round trips."""

from __future__ import annotations

import threading
import uuid

import pytest

from bmi_server.adapters.sql.store import SqlStateStore
from bmi_server.core.errors import AlreadyExists, Unavailable
from bmi_server.core.models import Disk, Image, ImageKind, ResourceState, Visibility


@pytest.fixture(params=["sqlite", "postgres"])
def sql(request, tmp_path):
    if request.param == "sqlite":
        store = SqlStateStore(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    else:
        store = SqlStateStore(request.getfixturevalue("postgres_url"))
        # One database serves every test: start each from empty tables.
        for disk in store.all_disks():
            store.delete_disk(disk.id)
        for image in store.all_images():
            store.delete_image(image.id)
    yield store
    store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def new_url(request, tmp_path) -> str:
    """The URL of a new, empty database of the backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'old.sqlite3'}"
    return request.getfixturevalue("fresh_postgres")()


def _as_unversioned(url: str, *statements: str) -> None:
    """Make the database at ``url`` (at the head) what an unversioned release left: no
    alembic_version, and ``statements`` take away what later revisions add."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        for statement in ("DROP TABLE alembic_version", *statements):
            conn.execute(text(statement))
    engine.dispose()


def _image(project="alice", name=None, visibility=Visibility.PRIVATE, request_id=""):
    image_id = "img-" + uuid.uuid4().hex[:16]
    return Image(id=image_id, name=name or image_id[-6:], project=project, kind=ImageKind.GOLDEN,
                 size_bytes=1 << 30, volume="bmi-" + image_id, visibility=visibility,
                 request_id=request_id)


def _disk(image, name, project="alice"):
    disk_id = "dsk-" + uuid.uuid4().hex[:16]
    return Disk(id=disk_id, name=name, project=project, image_id=image.id,
                image_name=image.name, size_bytes=image.size_bytes, volume="bmi-" + disk_id)


def test_round_trip_keeps_every_field(sql):
    image = _image(request_id="alice/r1")
    sql.add_image(image)
    assert sql.get_image(image.id) == image
    assert sql.find_image_by_request("alice/r1") == image
    image.state = ResourceState.READY
    image.name = "renamed"
    sql.update_image(image)
    assert sql.get_image(image.id) == image
    disk = _disk(image, "d1")
    sql.add_disk(disk)
    assert sql.get_disk(disk.id) == disk
    assert sql.disks_of_image(image.id) == [disk]


def test_names_are_unique_per_project_by_constraint(sql):
    sql.add_image(_image(name="ubuntu"))
    with pytest.raises(AlreadyExists):
        sql.add_image(_image(name="ubuntu"))
    sql.add_image(_image(project="bob", name="ubuntu"))
    other = _image(name="debian")
    sql.add_image(other)
    other.name = "ubuntu"
    with pytest.raises(AlreadyExists):
        sql.update_image(other)


def test_concurrent_creates_of_one_name_admit_exactly_one(sql):
    outcomes = []

    def attempt():
        try:
            sql.add_image(_image(name="race"))
            outcomes.append("ok")
        except AlreadyExists:
            outcomes.append("exists")

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["exists"] * 7 + ["ok"]


def test_paging_and_visibility_filters(sql):
    for n in range(5):
        sql.add_image(_image(name=f"a{n}"))
    sql.add_image(_image(project="ops", name="pub", visibility=Visibility.PUBLIC))
    sql.add_image(_image(project="ops", name="priv"))
    first = sql.list_images(projects=["alice"], include_public=True, after=None, limit=3)
    assert [i.name for i in first] == ["a0", "a1", "a2"]
    rest = sql.list_images(projects=["alice"], include_public=True,
                           after=(first[-1].project, first[-1].name), limit=10)
    assert [i.name for i in rest] == ["a3", "a4", "pub"]
    everything = sql.list_images(projects=None, include_public=False, after=None, limit=100)
    assert len(everything) == 7


def test_unreachable_database_is_unavailable(tmp_path):
    with pytest.raises(Unavailable):
        SqlStateStore("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")


def test_agent_records_round_trip(sql):
    """Inventories (JSON) and boot-token hashes round-trip and are replaced in place."""
    from datetime import UTC, datetime, timedelta

    from bmi_server.core.models import (
        BootMode,
        Inventory,
        InventoryCpu,
        InventoryDisk,
        InventoryNic,
        Node,
        NodeState,
        Smbios,
    )

    node = Node(id="node-" + uuid.uuid4().hex[:16], name="agent-" + uuid.uuid4().hex[:6],
                project="alice", macs=["52:54:00:" + ":".join(uuid.uuid4().hex[i:i + 2]
                                                              for i in (0, 2, 4))],
                state=NodeState.AVAILABLE, boot_mode=BootMode.AGENT)
    sql.add_node(node)
    assert sql.get_node(node.id).boot_mode is BootMode.AGENT
    now = datetime.now(UTC).replace(microsecond=0)
    inv = Inventory(cpu=InventoryCpu("Xeon", 32, "x86_64", 2),
                    disks=(InventoryDisk("sda", 10**12, "PERC", "S1", True),),
                    nics=(InventoryNic("eno1", node.macs[0], "bnxt_en", 10000, True),),
                    system=Smbios(serial="SN"), collectors=("generic",), collect_time=now)
    sql.save_inventory(node.id, inv)
    assert sql.get_inventory(node.id) == inv
    sql.save_inventory(node.id, Inventory(collect_time=now))
    assert sql.get_inventory(node.id) == Inventory(collect_time=now)
    sql.put_boot_token(node.id, "a" * 64, now + timedelta(minutes=30))
    sql.put_boot_token(node.id, "b" * 64, now + timedelta(minutes=31))
    assert sql.get_boot_token(node.id) == ("b" * 64, now + timedelta(minutes=31))
    sql.delete_boot_token(node.id)
    sql.delete_boot_token(node.id)
    assert sql.get_boot_token(node.id) is None and sql.get_inventory("node-none") is None


def test_request_log_records_once_and_forgets_old_keys(sql):
    from datetime import UTC, datetime, timedelta

    sql.record_request("alice/r1", "image.delete", "img-0000000000000001")
    with pytest.raises(AlreadyExists):
        sql.record_request("alice/r1", "image.delete", "img-0000000000000002")
    assert sql.recall_request("alice/r1") == ("image.delete", "img-0000000000000001")
    assert sql.recall_request("bob/r1") is None
    now = datetime.now(UTC)
    assert sql.forget_requests(now - timedelta(days=1)) == 0
    assert sql.forget_requests(now + timedelta(seconds=1)) == 1
    assert sql.recall_request("alice/r1") is None


def test_one_read_gives_a_node_with_all_its_macs_and_its_token(sql):
    """get_node and node_with_boot_token read a node and its MACs in one joined statement:
    every MAC comes back once; a node without a token gives None."""
    from datetime import UTC, datetime, timedelta

    from bmi_server.core.models import Node, NodeState

    suffix = uuid.uuid4().hex
    macs = sorted(f"52:54:0a:{suffix[i:i + 2]}:{suffix[6:8]}:{j:02x}"
                  for i, j in ((0, 3), (2, 1), (4, 2)))
    node = Node(id="node-" + suffix[:16], name="m-" + suffix[:6], project="alice", macs=macs,
                state=NodeState.AVAILABLE)
    sql.add_node(node)
    assert sql.get_node(node.id).macs == macs
    assert sql.find_node_by_mac(macs[1]).macs == macs
    assert sql.node_with_boot_token(node.id) is None  # no token yet
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=5)
    sql.put_boot_token(node.id, "c" * 64, expires)
    found, token_hash, expire_time = sql.node_with_boot_token(node.id)
    assert (found.id, found.macs, token_hash, expire_time) == (node.id, macs, "c" * 64, expires)
    assert sql.node_with_boot_token("node-" + "0" * 16) is None


def test_nodes_are_counted_by_state_in_the_database(sql):
    from bmi_server.core.models import Node, NodeState

    before = sql.count_nodes_by_state()
    suffix = uuid.uuid4().hex
    for i, state in enumerate([NodeState.AVAILABLE, NodeState.AVAILABLE, NodeState.DISCOVERED]):
        sql.add_node(Node(id=f"node-{suffix[:14]}{i:02d}", name=f"c{i}-{suffix[:6]}",
                          project="alice", macs=[f"52:54:0b:{suffix[:2]}:{suffix[2:4]}:{i:02x}"],
                          state=state))
    after = sql.count_nodes_by_state()
    assert after.get(NodeState.AVAILABLE, 0) - before.get(NodeState.AVAILABLE, 0) == 2
    assert after.get(NodeState.DISCOVERED, 0) - before.get(NodeState.DISCOVERED, 0) == 1
    assert sum(after.values()) - sum(before.values()) == 3
    assert all(isinstance(state, NodeState) for state in after)


# -- quotas ------------------------------------------------------------------------------


def _project() -> str:
    return "q-" + uuid.uuid4().hex[:10]  # one database serves every PostgreSQL test


def test_quota_usage_counts_virtual_sizes_in_every_state_of_one_project(sql):
    from bmi_server.core.models import QuotaAmounts

    project = _project()
    assert sql.quota_usage(project) == QuotaAmounts()
    creating = _image(project=project)  # an upload under way holds its share already
    sql.add_image(creating)
    ready = _image(project=project)
    ready.state, ready.size_bytes = ResourceState.READY, 3 << 30
    sql.add_image(ready)
    deleting = _disk(ready, "d1", project=project)
    deleting.state = ResourceState.DELETING
    sql.add_disk(deleting)
    sql.add_image(_image(project=_project()))  # another project's: not counted
    assert sql.quota_usage(project) == QuotaAmounts(size_bytes=(1 << 30) + 2 * (3 << 30),
                                                    images=2, disks=1)
    sql.delete_disk(deleting.id)
    assert sql.quota_usage(project) == QuotaAmounts(size_bytes=4 << 30, images=2, disks=0)


def test_quota_overrides_are_kept_per_limit_and_replaced_on_request(sql):
    from bmi_server.core.models import QuotaOverride

    project, other = _project(), _project()
    assert sql.get_quota_override(project) == QuotaOverride()
    assert sql.set_quota_override(project, QuotaOverride(images=5)) == QuotaOverride(images=5)
    sql.set_quota_override(other, QuotaOverride(disks=9))
    # Only what is given changes; 0 (no limit) is a limit of the project's own too.
    assert sql.set_quota_override(project, QuotaOverride(disks=0)) == QuotaOverride(
        images=5, disks=0)
    assert sql.set_quota_override(project, QuotaOverride(size_bytes=1 << 40), replace=True) == (
        QuotaOverride(size_bytes=1 << 40))
    assert sql.get_quota_override(project) == QuotaOverride(size_bytes=1 << 40)
    assert sql.set_quota_override(project, QuotaOverride(), replace=True) == QuotaOverride()
    assert sql.get_quota_override(other) == QuotaOverride(disks=9)


def test_admission_sees_the_project_and_a_refusal_inserts_nothing(sql):
    from bmi_server.core.errors import QuotaExceeded
    from bmi_server.core.models import QuotaAmounts, QuotaOverride
    from bmi_server.core.quotas import QuotaBook

    project = _project()
    sql.set_quota_override(project, QuotaOverride(images=1))
    seen = []
    first = _image(project=project)
    sql.add_image(first, lambda used, override: seen.append((used, override)))
    assert seen == [(QuotaAmounts(), QuotaOverride(images=1))]
    book = QuotaBook(sql)
    second = _image(project=project)
    with pytest.raises(QuotaExceeded) as refused:
        book.add_image(second)
    assert (refused.value.kind, refused.value.limit, refused.value.used,
            refused.value.asked) == ("images", 1, 1, 1)
    assert sql.get_image(second.id) is None
    book.add_disk(_disk(first, "d", project=project))  # disks are not limited by images
    with pytest.raises(AlreadyExists):  # the name clash still wins over the admission
        sql.add_image(_image(project=project, name=first.name), lambda used, override: None)


def test_racing_creates_on_two_servers_take_exactly_the_free_room(sql):
    """16 creates (images and disks, through two stores on one database: two servers)
    race for a byte limit with room for 5: exactly 5 get in. Each admission sleeps
    between counting and inserting, so without the project's lock several would count
    the same free room."""
    import time

    from bmi_server.core.errors import QuotaExceeded
    from bmi_server.core.models import QuotaOverride
    from bmi_server.core.quotas import QuotaBook

    project = _project()
    sql.set_quota_override(project, QuotaOverride(size_bytes=5 << 30))
    base = _image(project=_project())
    other = SqlStateStore(sql.url)

    class SlowBook(QuotaBook):
        def admission(self, project, asked):
            admit = super().admission(project, asked)

            def slow(used, override):
                time.sleep(0.02)
                admit(used, override)

            return slow

    books = [SlowBook(sql), SlowBook(other)]
    outcomes: list[str] = []
    start = threading.Barrier(16)

    def attempt(n: int) -> None:
        book = books[n % 2]
        start.wait()
        try:
            if n % 4 < 2:
                book.add_image(_image(project=project))
            else:
                book.add_disk(_disk(base, f"d{n}", project=project))
            outcomes.append("ok")
        except QuotaExceeded:
            outcomes.append("refused")

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.close()
    assert sorted(outcomes) == ["ok"] * 5 + ["refused"] * 11
    assert sql.quota_usage(project).size_bytes == 5 << 30


def test_an_older_database_gets_the_quota_table(new_url):
    """A database an unversioned release made before quotas (no alembic_version) gets
    project_quotas at start (revision 0002)."""
    from bmi_server.core.models import QuotaOverride

    url = new_url
    SqlStateStore(url).close()
    _as_unversioned(url, "DROP TABLE project_quotas")
    store = SqlStateStore(url)
    try:
        store.set_quota_override("alice", QuotaOverride(disks=3))
        assert store.get_quota_override("alice") == QuotaOverride(disks=3)
    finally:
        store.close()


def _config_node(sql):
    from bmi_server.core.models import Node, NodeState

    suffix = uuid.uuid4().hex
    node = Node(id="node-" + suffix[:16], name="cfg-" + suffix[:6], project="alice",
                macs=[f"52:54:0c:{suffix[:2]}:{suffix[2:4]}:{suffix[4:6]}"],
                state=NodeState.PROVISIONING)  # fmt: skip
    sql.add_node(node)
    return node


def _provisioned_node(sql, iqn: str):
    from bmi_server.core.models import Node, NodeState, NodeTarget

    node = Node(id="node-" + uuid.uuid4().hex[:16], name="s-" + uuid.uuid4().hex[:8],
                project="alice", state=NodeState.PROVISIONED,
                macs=["52:54:00:" + ":".join(uuid.uuid4().hex[i:i + 2] for i in (0, 2, 4))],
                target=NodeTarget(iqn, "bmi-dsk-x", "iqn.x:init", "user", "secret"))
    sql.add_node(node)
    return node


def test_a_node_config_is_saved_with_the_node_and_dropped_with_it(sql):
    """The config goes in, is replaced, is kept (UNCHANGED) and goes out in the node's own
    compare-and-set save; the row's instance id, host name and drive volume round-trip."""
    from bmi_server.core.errors import FailedPrecondition
    from bmi_server.core.models import NodeConfig, NodeState, NodeTarget

    node = _config_node(sql)
    config = NodeConfig(hostname="web1.example.org", ssh_keys=("ssh-ed25519 AAAA me",),
                        user_data=b"#cloud-config\n\x00\xff binary ok",
                        network_config=b"version: 2\n",
                        metadata=(("rack", "r7"), ("role", "db")))  # fmt: skip
    node.instance_id, node.hostname = "i-00000000000000a1", config.hostname
    node.target = NodeTarget("iqn.x:dsk-1", "bmi-dsk-1", "iqn.i", "u", "s",
                             config_volume="bmi-cfg-00000000000000a1")  # fmt: skip
    sql.save_node(node, None, expected=NodeState.PROVISIONING, config=config)
    stored = sql.get_node(node.id)
    assert (stored.instance_id, stored.hostname, stored.target.config_volume) == (
        "i-00000000000000a1", "web1.example.org", "bmi-cfg-00000000000000a1")
    assert sql.get_node_config(node.id) == config
    assert sql.list_nodes(projects=["alice"], state=None, after=None, limit=1000)
    sql.save_node(stored, None, expected=NodeState.PROVISIONING)  # UNCHANGED: kept
    assert sql.get_node_config(node.id) == config
    other = NodeConfig(hostname="web2")
    sql.save_node(stored, None, expected=NodeState.PROVISIONING, config=other)
    assert sql.get_node_config(node.id) == other
    # A save that loses its compare-and-set changes the config no more than the node.
    with pytest.raises(FailedPrecondition):
        sql.save_node(stored, None, expected=NodeState.AVAILABLE, config=None)
    assert sql.get_node_config(node.id) == other
    stored.instance_id = stored.hostname = ""
    stored.target = None
    sql.save_node(stored, None, expected=NodeState.PROVISIONING, config=None)
    assert sql.get_node_config(node.id) is None
    again = sql.get_node(node.id)
    assert (again.instance_id, again.hostname, again.target) == ("", "", None)


def test_an_older_database_gets_the_config_columns_and_table(new_url):
    """A database made before config drives: its nodes (provisioned then) read back with
    no config; the columns and node_configs are added at start (revision 0003)."""
    from bmi_server.core.models import NodeConfig, NodeState

    url = new_url
    first = SqlStateStore(url)
    node = _config_node(first)
    first.close()
    _as_unversioned(
        url, "DROP TABLE node_configs",
        *(f"ALTER TABLE nodes DROP COLUMN {c}" for c in ("instance_id", "hostname",
                                                         "config_volume")),
        "ALTER TABLE gateway_targets DROP COLUMN config_volume",
    )  # fmt: skip
    store = SqlStateStore(url)
    try:
        old = store.get_node(node.id)
        assert (old.instance_id, old.hostname) == ("", "")
        assert store.get_node_config(node.id) is None
        old.instance_id = "i-00000000000000b2"
        store.save_node(old, None, expected=NodeState.PROVISIONING,
                        config=NodeConfig(hostname="h"))  # fmt: skip
        assert store.get_node_config(node.id) == NodeConfig(hostname="h")
    finally:
        store.close()


def test_session_records_change_only_on_a_change_and_survive_node_saves(sql):
    from datetime import UTC, datetime

    from bmi_server.core.models import NodeState, SessionState

    iqn = "iqn.2026-11.org.moc.bmi:dsk-" + uuid.uuid4().hex[:16]
    node = _provisioned_node(sql, iqn)
    before = sql.count_node_sessions()
    assert sql.target_sessions()[iqn] is None
    t1, t2 = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    assert sql.record_session(iqn, SessionState.LOGGED_IN, t1)
    assert not sql.record_session(iqn, SessionState.LOGGED_IN, t2)  # no change, no write
    assert sql.target_sessions()[iqn].time == t1
    assert sql.record_session("iqn.x:no-such-target", SessionState.ENDED, t2) is False
    stored = sql.get_node(node.id)
    stored.state, stored.failure_reason = NodeState.BOOTING, ""
    sql.save_node(stored, None, expected=NodeState.PROVISIONED)  # a transition...
    session = sql.get_node(node.id).current_session  # ...leaves the session record be
    assert (session.state, session.time) == (SessionState.LOGGED_IN, t1)
    assert sql.record_session(iqn, SessionState.ENDED, t2)
    assert sql.get_node(node.id).current_session.state is SessionState.ENDED
    after = sql.count_node_sessions()
    assert after.get(SessionState.ENDED, 0) == before.get(SessionState.ENDED, 0) + 1


def test_an_older_database_gets_the_session_columns_and_index(new_url):
    from datetime import UTC, datetime

    from sqlalchemy import create_engine, inspect

    from bmi_server.core.models import SessionState

    url = new_url
    SqlStateStore(url).close()
    _as_unversioned(
        url, "DROP INDEX ix_nodes_target_iqn",
        *(f"ALTER TABLE nodes DROP COLUMN {c}" for c in ("session_iqn", "session_state",
                                                         "session_time")),
    )  # fmt: skip
    engine = create_engine(url)
    store = SqlStateStore(url)
    try:
        assert inspect(engine).has_index("nodes", "ix_nodes_target_iqn")
        node = _provisioned_node(store, "iqn.x:old")
        assert store.record_session("iqn.x:old", SessionState.LOGGED_IN, datetime.now(UTC))
        assert store.get_node(node.id).current_session.state is SessionState.LOGGED_IN
    finally:
        store.close()
        engine.dispose()
