"""Fixtures shared by the store tests and the integration tests."""

from __future__ import annotations

import os

import pytest

from bmi_server.devenv.postgres import PostgresInstance


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL database for the whole session: BMI_TEST_POSTGRES_URL, or a throwaway
    server from Debian's binaries."""
    url = os.environ.get("BMI_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    instance = PostgresInstance()
    instance.start()
    yield instance.url
    instance.stop()


@pytest.fixture
def fresh_postgres(postgres_url):
    """new() -> the URL of a new, empty database on the session's PostgreSQL server."""
    import uuid

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(postgres_url, isolation_level="AUTOCOMMIT")

    def new() -> str:
        name = f"bmi_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
        return make_url(postgres_url).set(database=name).render_as_string(hide_password=False)

    yield new
    admin.dispose()
