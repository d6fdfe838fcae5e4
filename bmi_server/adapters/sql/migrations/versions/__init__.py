"""Alembic revisions, oldest first (see the package docstring)."""
