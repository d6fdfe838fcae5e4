from __future__ import annotations

import pytest
from fakes import FakeImageStore, FakeInspector, FakeTargetDriver

from bmi_server.adapters.sql.store import SqlStateStore
from bmi_server.core.models import Principal
from bmi_server.server import Core

ADMIN = Principal(name="root", is_admin=True)
ALICE = Principal(name="alice", project="alice")
BOB = Principal(name="bob", project="bob")


@pytest.fixture
def store() -> FakeImageStore:
    return FakeImageStore()


@pytest.fixture
def inspector() -> FakeInspector:
    return FakeInspector()


@pytest.fixture
def state(tmp_path) -> SqlStateStore:
    s = SqlStateStore(f"sqlite:///{tmp_path / 'state.sqlite3'}")
    yield s
    s.close()


@pytest.fixture
def targets() -> FakeTargetDriver:
    return FakeTargetDriver()


@pytest.fixture
def core(state, store, targets) -> Core:
    return Core.build(state, store, targets, advertised_portals=["10.0.2.2:3260"], retry_seconds=5)
