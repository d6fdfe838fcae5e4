"""Versioned schema migrations (Alembic), shipped in the package and run by
``adapters/sql/migrate.py``: no alembic.ini, no env.py.

Adding a schema change: change ``schema.py``, then add ``versions/NNNN_<what>.py`` with
``revision = "NNNN_<what>"`` (at most 32 characters), ``down_revision`` the previous head,
and ``upgrade()`` / ``downgrade()`` written with ``alembic.op``. On SQLite, alter existing
columns inside ``op.batch_alter_table``. ``tests/test_migrations.py`` fails until the head
makes exactly what ``schema.py`` declares, and prints the difference.

Revisions 0001-0004 may meet a database an unversioned release made (``create_all`` and
per-column ALTERs at start, possibly interrupted half way), so they make only what is
missing (``guarded.py``). Later revisions only ever run on versioned databases and need
not."""
