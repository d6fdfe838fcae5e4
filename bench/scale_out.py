"""Scale-out: provisioning throughput with 1, 2 and 4 bmi-server replicas on one PostgreSQL
database, against one server on SQLite (the baseline), all in the same run on the same Ceph
cluster and tgtd.

Each configuration gets a fresh database and its own nodes; CLIENTS threads provision
NODES nodes, client i talking to replica i mod R. Also measured per provision: SQL
statements the database ran (pg_stat_statements, relays of the other replicas included),
and OSD operations (the OSD's perf counters). Background loops (session poll, target
audit, reconcile) are slowed down so they do not count.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from bmi.v1 import images_pb2
from bmi_client.client import BmiClient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text

from bench.common import Figure, Results, median, percentile, scale
from bmi_server.devenv.ceph_cluster import CephCluster
from bmi_server.devenv.postgres import PostgresInstance
from bmi_server.devenv.stack import free_port
from bmi_server.devenv.test_disk import build_test_disk
from bmi_server.devenv.tgtd import Tgtd

CONFIGS = [("sqlite", 1), ("postgres", 1), ("postgres", 2), ("postgres", 4)]
NODES = scale(48, 200)
CLIENTS = 8
QUIET = {  # background loops off the measurement
    "BMI_SESSION_POLL_SECONDS": "3600",
    "BMI_TARGET_AUDIT_SECONDS": "3600",
    "BMI_RECONCILE_SECONDS": "3600",
    "BMI_REPLICA_LEASE_SECONDS": "3600",
}


class Replicas:
    """``count`` bmi-server processes on one database, Ceph cluster and tgtd."""

    def __init__(self, folder: Path, cluster: CephCluster, tgtd: Tgtd, database: str,
                 count: int) -> None:
        self.token = secrets.token_urlsafe(24)
        self.addresses: list[str] = []
        self.procs: list[subprocess.Popen] = []
        for i in range(count):
            state = folder / f"replica-{i}"
            state.mkdir(parents=True)
            (state / "tokens").write_text(f"{self.token} admin bench\n")
            address = f"127.0.0.1:{free_port()}"
            env = {
                **os.environ, **QUIET,
                "BMI_LISTEN": address,
                "BMI_HTTP_LISTEN": f"127.0.0.1:{free_port()}",
                "BMI_STATE_DIR": str(state),
                "BMI_DATABASE_URL": database,
                "BMI_CEPH_CONF": str(cluster.conf_path),
                "BMI_CEPH_POOL": cluster.pool,
                "BMI_TGT_PORTAL": tgtd.portal,
                "BMI_TGT_CONTROL": str(tgtd.control),
                "BMI_REPLICA_NAME": f"r{i}",
            }
            with open(state / "server.log", "w") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "bmi_server.main", "serve"],
                    env=env, stdout=log, stderr=subprocess.STDOUT))
            self.addresses.append(address)
        for address in self.addresses:
            with grpc.insecure_channel(address) as channel:
                grpc.channel_ready_future(channel).result(timeout=60)
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _osd_ops(cluster: CephCluster) -> int:
    sock = cluster.base_dir / "run" / "osd.0.asok"
    out = subprocess.run(["ceph", "--admin-daemon", str(sock), "perf", "dump"],
                         capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)["osd"]["op"])


class _Statements:
    """Statements PostgreSQL ran in one database, from pg_stat_statements."""

    def __init__(self, admin_url: str) -> None:
        self.engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with self.engine.connect() as conn:
            conn.execute(text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))

    def count(self, database_url: str) -> int:
        name = database_url.rsplit("/", 1)[1]
        with self.engine.connect() as conn:
            return int(conn.execute(text(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s "
                "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = :n"), {"n": name}
            ).scalar())


def _measure(replicas: Replicas, golden_file: Path, tag: str) -> dict[str, float]:
    # Retries (same request id) ride out tgtd refusing its control socket under load.
    clients = [BmiClient(replicas.addresses[i % len(replicas.addresses)], replicas.token,
                         timeout=120, max_attempts=10) for i in range(CLIENTS)]
    try:
        admin = clients[0]
        image = admin.upload_image(golden_file, "golden", project=tag,
                                   visibility=images_pb2.VISIBILITY_PUBLIC)
        for i in range(NODES):
            mac = "52:54:02:" + ":".join(f"{b:02x}" for b in i.to_bytes(3, "big"))
            admin.enroll_node(f"{tag}-{i:04d}", tag, macs=[mac])
        latencies: list[float] = []

        def worker(c: int) -> None:
            for i in range(c, NODES, CLIENTS):
                t0 = time.perf_counter()
                clients[c].provision_node(f"{tag}-{i:04d}", image=image.id)
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(worker, range(CLIENTS)))
        wall = time.perf_counter() - t0
    finally:
        for client in clients:
            client.close()
    return {"rate": NODES / wall, "p50": median(latencies), "p99": percentile(latencies, 99)}


def run(results: Results) -> None:
    folder = Path(tempfile.mkdtemp(prefix="bmi-scale-"))
    golden_file = build_test_disk(folder / "golden.raw", size_mib=16)
    pg = PostgresInstance(settings={"shared_preload_libraries": "pg_stat_statements"})
    with CephCluster() as cluster, Tgtd() as tgtd, pg:
        statements = _Statements(pg.url)
        measured: dict[tuple[str, int], dict[str, float]] = {}
        for kind, count in CONFIGS:
            tag = f"{kind[:2]}{count}"
            database = pg.new_database() if kind == "postgres" else ""
            replicas = Replicas(folder / tag, cluster, tgtd, database, count)
            try:
                ops0 = _osd_ops(cluster)
                sql0 = statements.count(database) if database else 0
                figures = _measure(replicas, golden_file, tag)
                # Per provision, upload and enrolment subtracted by a second, empty pass
                # would cost another run; they are a fixed few hundred ops, noted instead.
                figures["osd_ops"] = (_osd_ops(cluster) - ops0) / NODES
                figures["sql"] = (statements.count(database) - sql0) / NODES if database else 0
            finally:
                replicas.stop()
            measured[(kind, count)] = figures
            print(f"  {tag}: {figures}", flush=True)
    base = measured[("sqlite", 1)]["rate"]
    for (kind, count), f in measured.items():
        label = f"{count} replica{'s' if count > 1 else ''} on {kind}"
        results.add(Figure("scale-out", f"provisions/s, {label} ({CLIENTS} clients, {NODES} nodes)",
                           f["rate"], "1/s", base, "1 server on SQLite"))
        results.add(Figure("scale-out", f"p99 provision, {label}", f["p99"] * 1000, "ms"))
        results.add(Figure("scale-out", f"OSD ops per provision, {label}", f["osd_ops"], "ops",
                           note="incl. image upload and enrolment, spread over the nodes"))
        if kind == "postgres":
            results.add(Figure("scale-out", f"SQL statements per provision, {label}", f["sql"],
                               "stmts", note="incl. enrolment and other replicas' relays"))
