"""Unversioned databases: made by a release before versioned migrations, whose start ran
``create_all`` and added nullable columns and indexes itself. Which revision's schema one
has is told by the objects each revision adds (newest first), so it is stamped there
and only the later revisions run."""

from __future__ import annotations

from sqlalchemy import Connection, inspect

from .migrations import baseline_schema

# What each revision after the baseline adds, as (table, columns, indexes); a table named
# with no columns: the table itself.
_ADDED: list[tuple[str, list[tuple[str, tuple[str, ...], tuple[str, ...]]]]] = [
    ("0002_project_quotas", [("project_quotas", (), ())]),
    ("0003_config_drives", [
        ("node_configs", (), ()),
        ("nodes", ("instance_id", "hostname", "config_volume"), ()),
        ("gateway_targets", ("config_volume",), ()),
    ]),
    ("0004_node_sessions", [
        ("nodes", ("session_iqn", "session_state", "session_time"), ("ix_nodes_target_iqn",)),
    ]),
]


def is_unversioned(conn: Connection) -> bool:
    """BMI's tables without Alembic's version table (an empty database is not)."""
    tables = set(inspect(conn).get_table_names())
    return "alembic_version" not in tables and bool(tables & set(baseline_schema.metadata.tables))


def shape(conn: Connection) -> str | None:
    """The newest revision whose schema, and every earlier one's, the database has in
    full; None: not even the baseline's (a database from before that release)."""
    present = inspect(conn)
    tables = set(present.get_table_names())
    columns = {t: {c["name"] for c in present.get_columns(t)} for t in tables}
    indexes = {t: {i["name"] for i in present.get_indexes(t)} for t in tables}

    def has(table: str, cols: tuple[str, ...], idx: tuple[str, ...]) -> bool:
        return table in tables and set(cols) <= columns[table] and set(idx) <= indexes[table]

    for table in baseline_schema.metadata.sorted_tables:
        wanted = tuple(c.name for c in table.columns)
        if not has(table.name, wanted, tuple(i.name for i in table.indexes)):
            return None
    found = "0001_baseline"
    for revision, objects in _ADDED:
        if not all(has(*o) for o in objects):
            break
        found = revision
    return found
