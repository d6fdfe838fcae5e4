"""Provisioning cost per node as the number of provisioned nodes grows.

BMI: the ProvisionNode RPC (clone + target + boot plan + state) through gRPC.
Baseline A, the raw floor: rbd clone + the same tgtadm calls, no BMI.
Baseline B, the older approach: a tgt config file per target, then `tgt-admin
--execute` over all of them for every new target.
Each series runs on its own fresh Ceph cluster and tgtd, one after the other.
"""

from __future__ import annotations

import secrets
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import rados
import rbd
from bmi.v1 import images_pb2
from bmi_client.client import BmiClient

from bench.common import Figure, Results, median, percentile, scale, timed, window
from bmi_server.devenv.ceph_cluster import CephCluster
from bmi_server.devenv.stack import DevStack
from bmi_server.devenv.test_disk import build_test_disk
from bmi_server.devenv.tgtd import Tgtd

CHECKPOINTS = scale([10, 50, 100], [10, 100, 500, 1000])
CONCURRENT_CLIENTS = 8
CONCURRENT_NODES = scale(80, 400)
IQN = "iqn.2026-11.org.moc.bench:"


def _mac(i: int) -> str:
    return "52:54:01:" + ":".join(f"{b:02x}" for b in i.to_bytes(3, "big"))


def bmi_series(folder: Path) -> tuple[list[float], dict[str, float]]:
    total = CHECKPOINTS[-1]
    costs: list[float] = []
    with DevStack() as stack, BmiClient(stack.address, stack.admin_token, timeout=120) as bmi:
        disk = build_test_disk(folder / "bench.raw", size_mib=16)
        image = bmi.upload_image(disk, "bench", project="bench",
                                 visibility=images_pb2.VISIBILITY_PUBLIC)
        for i in range(total + CONCURRENT_NODES):
            bmi.enroll_node(f"n{i:05d}", "bench", macs=[_mac(i)])
        for i in range(total):
            costs.append(timed(lambda i=i: bmi.provision_node(f"n{i:05d}", image=image.id)))
        latencies: list[float] = []

        def one(i: int) -> None:
            latencies.append(timed(lambda: bmi.provision_node(f"n{i:05d}", image=image.id)))

        t0 = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENT_CLIENTS) as pool:
            list(pool.map(one, range(total, total + CONCURRENT_NODES)))
        wall = time.perf_counter() - t0
    return costs, {"wall": wall, "p50": median(latencies), "p99": percentile(latencies, 99),
                   "per_node": wall / CONCURRENT_NODES}


class _RawFloor:
    """Baseline A: what BMI must do at least, with no bookkeeping at all."""

    def __init__(self, cluster: CephCluster, tgtd: Tgtd, config_dir: Path | None) -> None:
        self.tgtd = tgtd
        self.conf = str(cluster.conf_path)
        self.rados = rados.Rados(conffile=self.conf)
        self.rados.connect()
        self.ioctx = self.rados.open_ioctx(cluster.pool)
        rbd.RBD().create(self.ioctx, "golden", 16 << 20, old_format=False,
                         features=rbd.RBD_FEATURE_LAYERING)
        with rbd.Image(self.ioctx, "golden") as golden:
            golden.create_snap("s")
            golden.protect_snap("s")
        self.config_dir = config_dir
        self.tid = 0

    def close(self) -> None:
        self.ioctx.close()
        self.rados.shutdown()

    def _tgtadm(self, *args: str) -> None:
        self.tgtd.tgtadm(*args)

    def provision(self, i: int) -> None:
        name = f"clone-{i}"
        rbd.RBD().clone(self.ioctx, "golden", "s", self.ioctx, name,
                        features=rbd.RBD_FEATURE_LAYERING)
        iqn, user, secret = IQN + name, f"u{i}", secrets.token_urlsafe(12)
        initiator = f"iqn.2026-11.org.moc.bench.node:{i}"
        if self.config_dir is None:
            self.tid += 1
            tid = str(self.tid)
            self._tgtadm("--op", "new", "--mode", "target", "--tid", tid, "-T", iqn)
            self._tgtadm("--op", "new", "--mode", "logicalunit", "--tid", tid, "--lun", "1",
                         "--bstype", "rbd", "-b", f"rbd/{name}", "--bsopts", f"conf={self.conf}")
            self._tgtadm("--op", "new", "--mode", "account", "--user", user,
                         "--password", secret)
            self._tgtadm("--op", "bind", "--mode", "account", "--tid", tid, "--user", user)
            self._tgtadm("--op", "bind", "--mode", "target", "--tid", tid, "-Q", initiator)
            return
        (self.config_dir / f"{name}.conf").write_text(
            f"<target {iqn}>\n  driver iscsi\n  bs-type rbd\n  backing-store rbd/{name}\n"
            f"  bsopts \"conf={self.conf}\"\n  incominguser {user} {secret}\n"
            f"  initiator-name {initiator}\n</target>\n"
        )
        main = self.config_dir.parent / "targets.conf"
        main.write_text(f"include {self.config_dir}/*.conf\n")
        subprocess.run(["tgt-admin", "--execute", "-c", str(main), "-C", str(self.tgtd.control)],
                       check=True, capture_output=True)


def raw_series(folder: Path, with_config_files: bool) -> list[float]:
    costs: list[float] = []
    with CephCluster() as cluster, Tgtd() as tgtd:
        config_dir = None
        if with_config_files:
            config_dir = folder / "conf.d"
            config_dir.mkdir()
        floor = _RawFloor(cluster, tgtd, config_dir)
        try:
            for i in range(CHECKPOINTS[-1]):
                costs.append(timed(lambda i=i: floor.provision(i)))
        finally:
            floor.close()
    return costs


def run(results: Results) -> None:
    with tempfile.TemporaryDirectory(prefix="bmi-bench-") as tmp:
        folder = Path(tmp)
        print("provision: BMI series", flush=True)
        bmi, concurrent = bmi_series(folder)
        print("provision: baseline A (raw rbd clone + tgtadm)", flush=True)
        floor = raw_series(folder, with_config_files=False)
        print("provision: baseline B (config file per target + tgt-admin --execute)", flush=True)
        files = raw_series(folder, with_config_files=True)
    results.series["provision"] = {
        name: [(n, window(costs, n)) for n in CHECKPOINTS]
        for name, costs in (("BMI", bmi), ("A: rbd + tgtadm", floor),
                            ("B: tgt-admin over config files", files))
    }
    for n in CHECKPOINTS:
        results.add(Figure("provision", f"seconds per node at N={n}", window(bmi, n), "s",
                           window(floor, n), "baseline A", "<= 1.3x",
                           window(bmi, n) <= 1.3 * window(floor, n)))
        results.add(Figure("provision", f"baseline B at N={n}", window(files, n), "s",
                           window(floor, n), "baseline A", note="the older approach"))
    first, last = window(bmi, CHECKPOINTS[0]), window(bmi, CHECKPOINTS[-1])
    results.add(Figure("provision", f"cost of provision #{CHECKPOINTS[-1]} vs #10", last, "s",
                       first, f"BMI at N={CHECKPOINTS[0]}", "<= 1.15x", last <= 1.15 * first))
    results.add(Figure(
        "provision", f"{CONCURRENT_NODES} nodes, {CONCURRENT_CLIENTS} concurrent clients: "
        "wall time per node", concurrent["per_node"], "s", window(floor, CHECKPOINTS[-1]),
        "baseline A sequential", note=f"p50 {concurrent['p50']:.3f}s p99 {concurrent['p99']:.3f}s",
    ))
    projected = 1000 * concurrent["per_node"]
    results.add(Figure("provision", "projected wall time for 1000 nodes (concurrent)",
                       projected, "s", goal="<= 30 s", ok=projected <= 30))
