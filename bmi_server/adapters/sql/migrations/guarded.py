"""Schema operations that make only what is missing, for the revisions an unversioned
database may already have (in part): it was brought up to date by ``create_all`` and
per-column ALTERs at each start, and a start could stop between two of them."""

from __future__ import annotations

from alembic import op
from sqlalchemy import Column, Table, inspect


def create_table(table: Table) -> None:
    """``table`` (of a frozen MetaData) with its indexes, or just its missing columns
    and indexes when the table is there."""
    if not inspect(op.get_bind()).has_table(table.name):
        table.create(op.get_bind())
        return
    for column in table.columns:
        add_column(table.name, Column(column.name, column.type, nullable=column.nullable))
    for index in table.indexes:
        create_index(index.name, table.name, [c.name for c in index.columns],
                     unique=bool(index.unique))


def add_column(table: str, column: Column) -> None:
    have = {c["name"] for c in inspect(op.get_bind()).get_columns(table)}
    if column.name not in have:
        if not column.nullable:
            # Existing rows would need a value: never done to an existing table.
            raise RuntimeError(f"column {table}.{column.name} is missing and not nullable")
        op.add_column(table, column)


def create_index(name: str, table: str, columns: list[str], *, unique: bool = False) -> None:
    if not any(i["name"] == name for i in inspect(op.get_bind()).get_indexes(table)):
        op.create_index(name, table, columns, unique=unique)
