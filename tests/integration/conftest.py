"""Fixtures for tests against a real, throwaway Ceph cluster (started once per session)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bmi_server.adapters.ceph.rbd_store import RbdImageStore
from bmi_server.devenv.ceph_cluster import CephCluster


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[CephCluster]:
    # No skip: if Ceph cannot start, every test using it errors with the daemon's log.
    cluster = CephCluster(memstore_bytes=4 << 30)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def rbd_store(ceph_cluster: CephCluster) -> Iterator[RbdImageStore]:
    store = RbdImageStore(str(ceph_cluster.conf_path), ceph_cluster.pool)
    try:
        yield store
    finally:
        store.close()


# -- a real bmi-server process on the cluster ---------------------------------------------

import rados  # noqa: E402
from bmi_client.client import BmiClient  # noqa: E402
from server_process import ADMIN_TOKEN, TENANT_TOKENS, ServerProcess  # noqa: E402

MIB = 1 << 20


@pytest.fixture(scope="module")
def server(ceph_cluster, tgtd, tmp_path_factory) -> Iterator[ServerProcess]:
    process = ServerProcess(
        tmp_path_factory.mktemp("bmi-state"), str(ceph_cluster.conf_path), ceph_cluster.pool,
        tgtd=tgtd,
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def client_for(server):
    made: list[BmiClient] = []

    def make(token: str) -> BmiClient:
        client = BmiClient(server.address, token, timeout=60)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def admin(client_for) -> BmiClient:
    return client_for(ADMIN_TOKEN)


@pytest.fixture
def alice(client_for) -> BmiClient:
    return client_for(TENANT_TOKENS["alice"])


@pytest.fixture
def bob(client_for) -> BmiClient:
    return client_for(TENANT_TOKENS["bob"])


@pytest.fixture(scope="session")
def ioctx(ceph_cluster):
    cluster = rados.Rados(conffile=str(ceph_cluster.conf_path))
    cluster.connect()
    ctx = cluster.open_ioctx(ceph_cluster.pool)
    yield ctx
    ctx.close()
    cluster.shutdown()


@pytest.fixture
def volumes(rbd_store):
    """Names of every BMI volume in the pool, now."""
    return lambda: sorted(v.name for v in rbd_store.list_volumes())


@pytest.fixture
def server_state(admin):
    """(images, disks) the server's database holds, by id."""
    return lambda: (
        sorted(i.id for i in admin.list_images()),
        sorted(d.id for d in admin.list_disks()),
    )


@pytest.fixture(scope="session")
def raw_image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "small.raw"
    path.write_bytes(bytes(range(256)) * (4 * MIB // 256))
    return path


@pytest.fixture(scope="session")
def raw_and_qcow2(tmp_path_factory) -> tuple[Path, Path]:
    """A 64 MiB raw disk with a recognisable pattern, and the same disk as qcow2."""
    folder = tmp_path_factory.mktemp("images64")
    raw = folder / "golden.raw"
    with open(raw, "wb") as f:
        for n in range(64):
            f.write(n.to_bytes(4, "big") * (MIB // 4))
    qcow2 = folder / "golden.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
                   check=True)
    return raw, qcow2


# -- a throwaway tgtd (iSCSI target daemon) -------------------------------------------------

from bmi_server.devenv.tgtd import Tgtd  # noqa: E402


@pytest.fixture(scope="session")
def tgtd() -> Iterator[Tgtd]:
    with Tgtd() as daemon:
        yield daemon
