"""Several tgtd processes per host against one, in the same run on the same machine.

For one tgtd and for K (``tgtd_processes``, the server's default on this machine unless
BENCH_TGTD_PROCESSES says otherwise), each on a BMI installation of its own (DevStack),
torn down before the next:

- N nodes from scratch, 8 clients at once: wall time until all are provisioned;
- then, on the same installation with those N nodes, ten more provisioned one by one
  (provision #N+1..#N+10) against ten on a fresh installation (#1..#10);
- tgtd's CPU while idle with those N nodes (2N rbd LUNs: disk and config drive), summed
  over the processes.

And the floor: N RBD clones (and N config-drive volumes) by 8 threads, no tgtd at all.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import rados
import rbd

from bench.common import Figure, Results, cpu_seconds, median, scale, thread_budget, timed
from bench.provision import CONCURRENT_CLIENTS, NO_QUOTAS, THREADS_PER_LUN, _mac
from bmi_server.adapters.tgt.layout import default_processes
from bmi_server.devenv.ceph_cluster import CephCluster
from bmi_server.devenv.stack import DevStack
from bmi_server.devenv.test_disk import build_test_disk

NODES = scale(100, 1000)
SERIES = 10
IDLE_SECONDS = scale(10, 20)
K = int(os.environ.get("BENCH_TGTD_PROCESSES") or default_processes())


def _installation(stack: contextlib.ExitStack, folder: Path, processes: int, nodes: int):
    from bmi.v1 import images_pb2
    from bmi_client.client import BmiClient

    dev = stack.enter_context(DevStack(extra_env=NO_QUOTAS, tgtd_processes=processes))
    client = stack.enter_context(BmiClient(dev.address, dev.admin_token, timeout=300))
    disk = build_test_disk(folder / "bench.raw", size_mib=16)
    image = client.upload_image(disk, "bench", project="bench",
                                visibility=images_pb2.VISIBILITY_PUBLIC)
    for i in range(nodes):
        client.enroll_node(f"n{i:05d}", "bench", macs=[_mac(i)])
    return dev, client, image.id


def _from_scratch(client, image: str, first: int, count: int) -> tuple[float, int]:
    errors = []

    def one(i: int) -> None:
        try:
            client.provision_node(f"n{i:05d}", image=image)
        except Exception as exc:  # counted: the figure says how many
            errors.append(exc)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENT_CLIENTS) as pool:
        list(pool.map(one, range(first, first + count)))
    return time.perf_counter() - t0, len(errors)


def _idle_cpu(pids: list[int], seconds: float) -> float:
    time.sleep(2)  # librados clients start their threads lazily after connecting
    before = sum(cpu_seconds(p) for p in pids)
    time.sleep(seconds)
    return (sum(cpu_seconds(p) for p in pids) - before) / seconds


def _series(processes: int, folder: Path) -> dict[str, float]:
    folder.mkdir()
    out: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        _, client, image = _installation(stack, folder, processes, SERIES)
        out["first"] = median([timed(lambda i=i: client.provision_node(
            f"n{i:05d}", image=image)) for i in range(SERIES)])
    with contextlib.ExitStack() as stack:
        dev, client, image = _installation(stack, folder, processes, NODES + SERIES)
        print(f"tgtd_processes: K={processes}: {NODES} nodes, {CONCURRENT_CLIENTS} clients",
              flush=True)
        out["scratch"], out["errors"] = _from_scratch(client, image, 0, NODES)
        print(f"tgtd_processes: K={processes}: {NODES} nodes in {out['scratch']:.1f} s",
              flush=True)
        assert dev.tgtds is not None
        out["idle"] = _idle_cpu([d.pid for d in dev.tgtds.daemons if d.pid], IDLE_SECONDS)
        out["last"] = median([timed(lambda i=i: client.provision_node(
            f"n{i:05d}", image=image)) for i in range(NODES, NODES + SERIES)])
    return out


def _floor(count: int) -> float:
    """N clones and N small volumes by 8 threads on a cluster of their own: no tgtd."""
    with CephCluster() as cluster, rados.Rados(conffile=str(cluster.conf_path)) as cl:
        ioctx = cl.open_ioctx(cluster.pool)
        try:
            rbd.RBD().create(ioctx, "golden", 16 << 20, old_format=False)
            with rbd.Image(ioctx, "golden") as golden:
                golden.create_snap("s")
                golden.protect_snap("s")

            def one(i: int) -> None:
                rbd.RBD().clone(ioctx, "golden", "s", ioctx, f"clone-{i}")
                rbd.RBD().create(ioctx, f"cfg-{i}", 2 << 20, old_format=False)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(CONCURRENT_CLIENTS) as pool:
                list(pool.map(one, range(count)))
            return time.perf_counter() - t0
        finally:
            ioctx.close()


def run(results: Results) -> None:
    with tempfile.TemporaryDirectory(prefix="bmi-bench-") as tmp, \
            thread_budget((NODES + SERIES) * 2 * THREADS_PER_LUN):
        folder = Path(tmp)
        one = _series(1, folder / "one")
        many = _series(K, folder / "many")
        floor = _floor(NODES)
    name = f"K={K} tgtd processes"
    results.add(Figure("tgtd_processes", f"{name}: {NODES} nodes from scratch "
                       f"({CONCURRENT_CLIENTS} clients)", many["scratch"], "s",
                       one["scratch"], "one tgtd", "<= 0.33x",
                       many["scratch"] <= one["scratch"] / 3 and not many["errors"],
                       note=f"{many['errors']:.0f} / {one['errors']:.0f} failed"))
    results.add(Figure("tgtd_processes", f"one tgtd: provision #{NODES + 1}..{NODES + SERIES} "
                       "vs #1..10 (median)", one["last"], "s", one["first"], "one tgtd at #1..10"))
    results.add(Figure("tgtd_processes", f"{name}: provision #{NODES + 1}..{NODES + SERIES} "
                       "vs #1..10 (median)", many["last"], "s", many["first"],
                       f"{name} at #1..10", "<= 2x", many["last"] <= 2 * many["first"]))
    results.add(Figure("tgtd_processes", f"{name}: tgtd CPU while idle at {NODES} nodes "
                       f"({2 * NODES} rbd LUNs), share of a core", many["idle"], "cores",
                       one["idle"], "one tgtd", "<= 0.5x", many["idle"] <= 0.5 * one["idle"]))
    results.add(Figure("tgtd_processes", f"floor: {NODES} clones + config volumes alone "
                       f"({CONCURRENT_CLIENTS} threads, no tgtd)", floor, "s",
                       many["scratch"], f"{name} from scratch"))
