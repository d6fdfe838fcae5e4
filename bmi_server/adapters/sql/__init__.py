"""StateStore on SQLAlchemy: SQLite by default, PostgreSQL by URL."""

import logging

# Alembic logs its plugins at import and its dialect on every version read (each start) at
# INFO; migrate.py logs the steps it runs instead.
logging.getLogger("alembic").setLevel(logging.WARNING)
