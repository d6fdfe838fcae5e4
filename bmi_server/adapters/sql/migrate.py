"""The database's schema version, and bringing it to this release's (the Alembic head of
``migrations/``) once, under a lock: several replicas starting on one database migrate it
once; the others wait, then find it done.

The lock is taken in the transaction that migrates, and is its first statement:
PostgreSQL ``pg_advisory_xact_lock``, SQLite ``BEGIN IMMEDIATE`` (its write lock). Both
run DDL inside the transaction, so a migration that fails (or a replica killed in the
middle) leaves the database as it was."""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

from ...core.errors import FailedPrecondition
from . import legacy
from .schema import metadata

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Apart from the keys of replica_store.exclusive ("bmi:<job>") and of quota admission.
_LOCK_KEY = zlib.crc32(b"bmi:schema-migration")


@dataclass(frozen=True)
class SchemaVersion:
    """``current``: the revision recorded in the database; None for an empty database or
    one an earlier release made without versions (``unversioned``; ``shape``: the
    revision whose schema it has, None if older than the baseline)."""

    current: str | None
    head: str
    unversioned: bool = False
    shape: str | None = None

    @property
    def at_head(self) -> bool:
        return self.current == self.head

    @property
    def newer(self) -> bool:
        """Recorded by a later release: a revision this one does not know."""
        return self.current is not None and self.current not in _known()

    @property
    def origin(self) -> str:
        """What a migration from here starts from, for the log and the CLI."""
        if self.current or self.shape:
            return self.current or self.shape
        return "a schema older than 0001" if self.unversioned else "nothing"

    def describe(self) -> str:
        if self.at_head:
            return f"{self.current} (head)"
        if self.newer:
            return (f"{self.current}: newer than this server knows (its head is "
                    f"{self.head}); upgrade this server")
        if self.unversioned:
            made = f"the schema of {self.shape}" if self.shape else "a schema older than 0001"
            return (f"none: unversioned (made by an earlier release, {made}); "
                    f"upgrading makes it {self.head}")
        if self.current is None:
            return f"none: empty database; upgrading makes it {self.head}"
        return f"{self.current}: behind the head {self.head}; upgrading makes it {self.head}"


@cache
def script() -> ScriptDirectory:
    return ScriptDirectory(str(MIGRATIONS_DIR))


@cache
def _known() -> frozenset[str]:
    return frozenset(s.revision for s in script().walk_revisions())


def head() -> str:
    """This release's revision."""
    return script().get_current_head()


def version(engine: Engine) -> SchemaVersion:
    with engine.connect() as conn:
        return _version(conn)


def upgrade(engine: Engine) -> tuple[SchemaVersion, SchemaVersion]:
    """Migrate to the head unless the database is there; returns the version found and
    the one left. Raises FailedPrecondition for a database a later release migrated."""
    found = version(engine)
    if found.at_head:  # every start but the first after an upgrade: no lock taken
        return found, found
    _refuse_newer(found)
    with engine.connect() as conn, conn.begin():
        _lock(conn)
        found = _version(conn)  # another process may have migrated while we waited
        _refuse_newer(found)
        if not found.at_head:
            _migrate(conn, found)
    return found, version(engine)


def require_head(engine: Engine) -> None:
    """For a server told not to migrate: refuse a database that is not at this release's
    revision."""
    found = version(engine)
    _refuse_newer(found)
    if not found.at_head:
        raise FailedPrecondition(
            f"database schema is {found.describe()}; run 'bmi-server admin db upgrade' "
            "(or set database_auto_upgrade)")


def _version(conn: Connection) -> SchemaVersion:
    current = MigrationContext.configure(conn).get_current_revision()
    if current is None and legacy.is_unversioned(conn):
        return SchemaVersion(None, head(), unversioned=True, shape=legacy.shape(conn))
    return SchemaVersion(current, head())


def _refuse_newer(found: SchemaVersion) -> None:
    if found.newer:
        raise FailedPrecondition(f"database schema is {found.describe()}")


def _lock(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
    elif conn.dialect.name == "sqlite":
        # pysqlite has not begun the transaction yet: this is its BEGIN.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _migrate(conn: Connection, found: SchemaVersion) -> None:
    scripts = script()

    def steps(heads, _context):
        # As alembic's own `upgrade` command does.
        return scripts._upgrade_revs("head", heads)

    with EnvironmentContext(Config(), scripts, fn=steps, destination_rev="head") as env:
        # render_as_batch: SQLite alters a table by copying it (see migrations/__init__).
        env.configure(connection=conn, target_metadata=metadata, render_as_batch=True,
                      on_version_apply=_log_step)
        if found.unversioned and found.shape:
            log.warning("database made by a release before versioned migrations has the "
                        "schema of %s: recorded as such", found.shape)
            env.get_context().stamp(scripts, found.shape)
        env.run_migrations()
    log.info("database schema migrated from %s to %s", found.origin, head())


def _log_step(*, step, **_kw) -> None:
    log.info("database schema: %s -> %s", ",".join(step.down_revision_ids) or "empty",
             step.up_revision_id)
