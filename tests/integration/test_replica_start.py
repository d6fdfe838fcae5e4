"""Four bmi-server replicas (real processes) started at once on an empty PostgreSQL
database: one migrates it (under the advisory lock), the others wait and find it done,
and all four serve, each seeing what another wrote."""

from __future__ import annotations

import re
import uuid

import pytest
from bmi_client.client import BmiClient
from server_process import ADMIN_TOKEN, ServerProcess

from bmi_server.adapters.sql import migrate

pytestmark = pytest.mark.ceph


def test_four_replicas_started_at_once_on_an_empty_database_all_serve(
    tmp_path, ceph_cluster, tgtd, fresh_postgres
):
    url = fresh_postgres()
    replicas = [
        ServerProcess(tmp_path / f"replica-{n}", str(ceph_cluster.conf_path), ceph_cluster.pool,
                      url, tgtd=tgtd, extra_env={"BMI_REPLICA_NAME": f"r{n}"})
        for n in range(4)
    ]
    clients: list[BmiClient] = []
    try:
        for replica in replicas:
            replica.start(wait=False)
        for replica in replicas:
            replica.wait_serving(timeout=120)
        logs = [r.log() for r in replicas]
        migrated = [n for n, log in enumerate(logs)
                    if f"database schema migrated from nothing to {migrate.head()}" in log]
        assert len(migrated) == 1, logs
        assert not any(re.search(r"Traceback|UniqueViolation", log) for log in logs), logs
        name = "n" + uuid.uuid4().hex[:8]
        clients = [BmiClient([r.address], ADMIN_TOKEN, timeout=30) for r in replicas]
        clients[0].enroll_node(name, "alice", ["52:54:00:aa:00:01"])
        for client in clients:
            assert name in [n.name for n in client.list_nodes(project="alice")]
    finally:
        for client in clients:
            client.close()
        for replica in replicas:
            replica.stop()
