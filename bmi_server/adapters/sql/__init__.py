"""StateStore on SQLAlchemy: SQLite by default, PostgreSQL by URL."""
