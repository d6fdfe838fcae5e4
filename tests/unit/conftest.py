from __future__ import annotations

import pytest
from fakes import FakeImageStore, FakeInspector, FakeTargetDriver
from principals import ADMIN, ALICE, BOB  # noqa: F401 - re-exported for older imports

from bmi_server.adapters.sql.store import SqlStateStore
from bmi_server.core.models import Visibility
from bmi_server.server import Core


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


@pytest.fixture
def golden(core, store, inspector, tmp_path):
    """A public golden image of the ops project, uploaded by an admin."""
    from test_catalogue import upload

    return upload(core, store, inspector, tmp_path, ADMIN, "golden", project="ops",
                  visibility=Visibility.PUBLIC)
