"""Provisioning cost per node as the number of provisioned nodes grows.

BMI: the ProvisionNode RPC (clone + target + boot plan + state) through gRPC.
Baseline A, the raw floor: rbd clone + the same tgtadm calls, no BMI.
Baseline A', the raw floor BMI now stands on: rbd clone + the same five requests sent over
tgtd's control socket (BMI's default tgt_admin = "socket"), no process spawned.
Baseline B, the older approach: a tgt config file per target, then `tgt-admin
--execute` over all of them for every new target.
Each series runs alone on a fresh Ceph cluster and tgtd of its own (see run).
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import rados
import rbd
from bmi.v1 import images_pb2
from bmi_client.client import BmiClient

from bench.common import (
    Figure,
    Results,
    median,
    percentile,
    scale,
    thread_budget,
    timed,
    window,
)
from bmi_server.adapters.tgt.control_socket import TgtdSocketRunner
from bmi_server.devenv.ceph_cluster import CephCluster
from bmi_server.devenv.stack import DevStack
from bmi_server.devenv.test_disk import build_test_disk
from bmi_server.devenv.tgtd import Tgtd

# Each LUN in tgtd is a Ceph client with its own threads (16 with the profile in
# bmi_server/adapters/tgt/ceph_profile.py, 31 without): the run raises the kernel's
# thread limits (bench.common.thread_budget) as a BMI host's sysctl would.
CHECKPOINTS = scale([10, 50, 100], [10, 100, 500, 1000])
CONCURRENT_CLIENTS = 8
# Full scale: 1000 nodes from scratch at once, the "1000 nodes ready to boot" figure.
CONCURRENT_NODES = scale(80, 1000)
# B re-runs tgt-admin over every config file per target: its cost grows with N.
B_UP_TO = scale(100, 200)
THREADS_PER_LUN = 40  # an upper bound for the budget, with or without the profile
IQN = "iqn.2026-11.org.moc.bench:"


def _mac(i: int) -> str:
    return "52:54:01:" + ":".join(f"{b:02x}" for b in i.to_bytes(3, "big"))


# Up to 1000 nodes (and their disks) in one project, a project's default limit: the
# benchmark measures provisioning, not quotas, so it lifts the project limits.
NO_QUOTAS = {"BMI_QUOTA_BYTES": "0", "BMI_QUOTA_IMAGES": "0", "BMI_QUOTA_DISKS": "0"}


class _Bmi:
    """The ProvisionNode RPC on a whole BMI installation of its own."""

    def __init__(self, stack: contextlib.ExitStack, folder: Path, nodes: int) -> None:
        self.stack = stack.enter_context(DevStack(extra_env=NO_QUOTAS))
        self.client = stack.enter_context(
            BmiClient(self.stack.address, self.stack.admin_token, timeout=120))
        disk = build_test_disk(folder / "bench.raw", size_mib=16)
        self.image = self.client.upload_image(disk, "bench", project="bench",
                                              visibility=images_pb2.VISIBILITY_PUBLIC)
        for i in range(nodes):
            self.client.enroll_node(f"n{i:05d}", "bench", macs=[_mac(i)])

    def provision(self, i: int) -> None:
        self.client.provision_node(f"n{i:05d}", image=self.image.id)

    def concurrently(self, count: int) -> dict[str, float]:
        """Nodes #1..#count by CONCURRENT_CLIENTS clients at once; a failed call is
        counted, not fatal (the figure says how many)."""
        latencies: list[float] = []
        errors: list[str] = []

        def one(i: int) -> None:
            try:
                latencies.append(timed(lambda: self.provision(i)))
            except grpc.RpcError as e:
                errors.append(f"{e.code().name}: {e.details()}")

        t0 = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENT_CLIENTS) as pool:
            list(pool.map(one, range(count)))
        wall = time.perf_counter() - t0
        if errors:
            print(f"provision: {len(errors)} concurrent provisions failed, first: {errors[0]}",
                  flush=True)
        return {"wall": wall, "p50": median(latencies), "p99": percentile(latencies, 99),
                "per_node": wall / count, "errors": len(errors)}


class _RawFloor:
    """Baseline A: what BMI must do at least, with no bookkeeping at all."""

    def __init__(self, cluster: CephCluster, tgtd: Tgtd, config_dir: Path | None,
                 over_socket: bool = False) -> None:
        self.tgtd = tgtd
        self.socket = TgtdSocketRunner() if over_socket else None
        self.conf = str(cluster.conf_path)
        # As BMI's throwaway tgtd is given them: the lean profile, its own Ceph user.
        self.tgt_bsopts = f"conf={cluster.tgt_conf_path};id={cluster.tgt_user}"
        self.lun_seconds: list[float] = []  # the logicalunit step alone
        self.rados = rados.Rados(conffile=self.conf)
        self.rados.connect()
        self.ioctx = self.rados.open_ioctx(cluster.pool)
        # Ceph's default features (rbd_default_features: layering, exclusive-lock,
        # object-map, fast-diff, deep-flatten), what `rbd clone` gives and BMI asks for.
        rbd.RBD().create(self.ioctx, "golden", 16 << 20, old_format=False)
        with rbd.Image(self.ioctx, "golden") as golden:
            golden.create_snap("s")
            golden.protect_snap("s")
        self.config_dir = config_dir
        self.tid = 0

    def close(self) -> None:
        self.ioctx.close()
        self.rados.shutdown()

    def _tgtadm(self, *args: str) -> None:
        if self.socket is None:
            self.tgtd.tgtadm(*args)
            return
        rc, _, err = self.socket(["tgtadm", "-C", str(self.tgtd.control), "--lld", "iscsi", *args])
        if rc:
            raise RuntimeError(f"tgtd refused {args}: {err}")

    def provision(self, i: int) -> None:
        name = f"clone-{i}"
        rbd.RBD().clone(self.ioctx, "golden", "s", self.ioctx, name)
        iqn, user, secret = IQN + name, f"u{i}", secrets.token_urlsafe(12)
        initiator = f"iqn.2026-11.org.moc.bench.node:{i}"
        if self.config_dir is None:
            self.tid += 1
            tid = str(self.tid)
            self._tgtadm("--op", "new", "--mode", "target", "--tid", tid, "-T", iqn)
            self.lun_seconds.append(timed(lambda: self._tgtadm(
                "--op", "new", "--mode", "logicalunit", "--tid", tid, "--lun", "1",
                "--bstype", "rbd", "-b", f"rbd/{name}", "--bsopts", self.tgt_bsopts)))
            self._tgtadm("--op", "new", "--mode", "account", "--user", user,
                         "--password", secret)
            self._tgtadm("--op", "bind", "--mode", "account", "--tid", tid, "--user", user)
            self._tgtadm("--op", "bind", "--mode", "target", "--tid", tid, "-Q", initiator)
            return
        (self.config_dir / f"{name}.conf").write_text(
            f"<target {iqn}>\n  driver iscsi\n  bs-type rbd\n  backing-store rbd/{name}\n"
            f"  bsopts \"{self.tgt_bsopts}\"\n  incominguser {user} {secret}\n"
            f"  initiator-name {initiator}\n</target>\n"
        )
        main = self.config_dir.parent / "targets.conf"
        main.write_text(f"include {self.config_dir}/*.conf\n")
        done = subprocess.run(["tgt-admin", "--execute", "-c", str(main),
                               "-C", str(self.tgtd.control)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"tgt-admin --execute exited {done.returncode}: "
                               f"{(done.stderr or done.stdout).strip()[-300:]}")


def _raw(stack: contextlib.ExitStack, folder: Path, with_config_files: bool,
         over_socket: bool = False) -> _RawFloor:
    cluster = stack.enter_context(CephCluster())
    tgtd = stack.enter_context(Tgtd())
    config_dir = None
    if with_config_files:
        config_dir = folder / "conf.d"
        config_dir.mkdir()
    floor = _RawFloor(cluster, tgtd, config_dir, over_socket)
    stack.callback(floor.close)
    return floor


def _provision_series(name: str, one: _Bmi | _RawFloor, count: int) -> list[float]:
    """Seconds of provisions #1..#count, one after the other."""
    costs: list[float] = []
    for i in range(count):
        try:
            costs.append(timed(lambda i=i: one.provision(i)))
        except RuntimeError as e:
            if name != "B":
                raise
            # The older approach failing is a finding, not a reason to lose the run.
            print(f"provision: baseline B stopped at #{i + 1}: {e}", flush=True)
            break
        if (i + 1) in CHECKPOINTS:  # printed as it goes: a long run may not finish
            print(f"provision: {name}: {i + 1} done, median of the last 10 "
                  f"{window(costs, i + 1) * 1000:.1f} ms", flush=True)
    return costs


def run(results: Results) -> None:
    """Each series alone on the machine, on a Ceph cluster and tgtd of its own, torn down
    before the next: at N the host holds exactly N LUNs, as a BMI host with N nodes does.
    (Side by side, four series' idle LUN clients loaded the machine as no BMI host is.)"""
    costs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bmi-bench-") as tmp, \
            thread_budget(max(CHECKPOINTS[-1], CONCURRENT_NODES) * THREADS_PER_LUN):
        folder = Path(tmp)
        for name, files, socket in (("A", False, False), ("A'", False, True),
                                    ("B", True, False)):
            (folder / name).mkdir()
            with contextlib.ExitStack() as stack:
                raw = _raw(stack, folder / name, with_config_files=files, over_socket=socket)
                costs[name] = _provision_series(
                    name, raw, B_UP_TO if name == "B" else CHECKPOINTS[-1])
                if name == "A'":
                    lun_seconds = raw.lun_seconds
        (folder / "BMI").mkdir()
        with contextlib.ExitStack() as stack:
            bmi_series = _Bmi(stack, folder / "BMI", CHECKPOINTS[-1])
            costs["BMI"] = _provision_series("BMI", bmi_series, CHECKPOINTS[-1])
        # From scratch again, all at once: the host ends with CONCURRENT_NODES LUNs.
        (folder / "BMI-concurrent").mkdir()
        with contextlib.ExitStack() as stack:
            bmi_series = _Bmi(stack, folder / "BMI-concurrent", CONCURRENT_NODES)
            print(f"provision: {CONCURRENT_NODES} BMI nodes, {CONCURRENT_CLIENTS} clients at "
                  "once", flush=True)
            concurrent = bmi_series.concurrently(CONCURRENT_NODES)
    bmi, floor, socket_floor, files = (costs[k] for k in ("BMI", "A", "A'", "B"))
    results.series["provision"] = {
        name: [(n, window(values, n)) for n in CHECKPOINTS if n <= len(values)]
        for name, values in (("BMI (tgtd socket)", bmi), ("A: rbd + tgtadm", floor),
                             ("A': rbd + tgtd socket", socket_floor),
                             ("B: tgt-admin over config files", files))
    }
    for n in CHECKPOINTS:
        results.add(Figure("provision", f"seconds per node at N={n}", window(bmi, n), "s",
                           window(floor, n), "baseline A", "<= 1.3x",
                           window(bmi, n) <= 1.3 * window(floor, n)))
        results.add(Figure("provision", f"seconds per node at N={n}", window(bmi, n), "s",
                           window(socket_floor, n), "baseline A' (same socket calls)",
                           note="BMI against the floor it now stands on"))
        if n <= len(files):
            results.add(Figure("provision", f"baseline B at N={n}", window(files, n), "s",
                               window(floor, n), "baseline A", note="the older approach"))
    first, last = window(bmi, CHECKPOINTS[0]), window(bmi, CHECKPOINTS[-1])
    results.add(Figure("provision", f"cost of provision #{CHECKPOINTS[-1]} vs #10", last, "s",
                       first, f"BMI at N={CHECKPOINTS[0]}", "<= 1.15x", last <= 1.15 * first))
    results.add(Figure(
        "provision", f"{CONCURRENT_NODES} nodes, {CONCURRENT_CLIENTS} concurrent clients: "
        "wall time per node", concurrent["per_node"], "s", window(floor, CHECKPOINTS[-1]),
        "baseline A sequential", note=f"p50 {concurrent['p50']:.3f}s "
        f"p99 {concurrent['p99']:.3f}s, {concurrent['errors']:.0f} failed",
    ))
    lun = median(lun_seconds)
    results.add(Figure(
        "provision", "tgtd: adding one rbd LUN (connects a Ceph client, opens the image)", lun,
        "s", window(socket_floor, CHECKPOINTS[-1]), "baseline A' whole provision",
        note="tgtd does it in its one management thread: 1000 targets on one tgtd take at "
        f"least {1000 * lun:.0f} s"))
    projected = 1000 * concurrent["per_node"]
    measured = "" if CONCURRENT_NODES == 1000 else "projected "
    results.add(Figure("provision", f"{measured}wall time for 1000 nodes "
                       f"({CONCURRENT_CLIENTS} concurrent clients)", projected, "s",
                       1000 * lun, "1000 LUN additions in one tgtd", "<= 30 s",
                       projected <= 30 and not concurrent["errors"]))
