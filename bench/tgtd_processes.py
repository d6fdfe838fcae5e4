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

Then tgtd alone, without BMI's server (which on two cores takes the CPU the tgtds would
use): M rbd LUNs exported through TgtdPool by 8 threads, on one tgtd and on K, each on
tgtds of their own; the time to add them all and the tgtds' idle CPU after. The pair
(one, K) is measured ``ROUNDS`` times, alternating, and the medians kept: ratios between
runs on this shared machine move by ±20%.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
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
LUNS = scale(500, 1000)  # tgtd alone
SERIES = 10
IDLE_SECONDS = scale(10, 20)
ROUNDS = scale(2, 1)
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


@contextlib.contextmanager
def _golden_cluster() -> Iterator[tuple[CephCluster, rados.Ioctx]]:
    """A throwaway cluster whose pool holds "golden" (16 MiB) and its protected snapshot
    "s", to clone from; the pool's ioctx."""
    with CephCluster() as cluster, rados.Rados(conffile=str(cluster.conf_path)) as cl:
        ioctx = cl.open_ioctx(cluster.pool)
        try:
            rbd.RBD().create(ioctx, "golden", 16 << 20, old_format=False)
            with rbd.Image(ioctx, "golden") as golden:
                golden.create_snap("s")
                golden.protect_snap("s")
            yield cluster, ioctx
        finally:
            ioctx.close()


def _floor(count: int) -> float:
    """N clones and N small volumes by 8 threads on a cluster of their own: no tgtd."""
    with _golden_cluster() as (_, ioctx):

        def one(i: int) -> None:
            rbd.RBD().clone(ioctx, "golden", "s", ioctx, f"clone-{i}")
            rbd.RBD().create(ioctx, f"cfg-{i}", 2 << 20, old_format=False)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENT_CLIENTS) as pool:
            list(pool.map(one, range(count)))
        return time.perf_counter() - t0


def _tgtd_alone(cluster, ioctx, processes: int, luns: int, folder: Path, tag: str):
    """(seconds to export ``luns`` clones through ``processes`` tgtds, idle CPU after)."""
    from bmi_gateway.processes import FilePlacements
    from bmi_server.adapters.tgt.control_socket import TgtdSocketRunner
    from bmi_server.adapters.tgt.pool import TgtdPool
    from bmi_server.adapters.tgt.tgtadm import TgtTargetDriver
    from bmi_server.core.models import TargetSpec
    from bmi_server.devenv.tgtd import TgtdGroup

    with ThreadPoolExecutor(CONCURRENT_CLIENTS) as pool:
        list(pool.map(lambda i: rbd.RBD().clone(ioctx, "golden", "s", ioctx,
                                                f"{tag}-{i}"), range(luns)))
    with TgtdGroup(processes) as tgtds:
        drivers = [TgtTargetDriver(str(cluster.tgt_conf_path), cluster.pool, d.portal,
                                   control=d.control, runner=TgtdSocketRunner(),
                                   rbd_user=cluster.tgt_user) for d in tgtds.daemons]
        targets = TgtdPool(drivers, [[d.portal] for d in tgtds.daemons],
                           FilePlacements(folder / f"{tag}.json"))
        specs = [TargetSpec(f"iqn.2026-11.org.moc.bmi:{tag}-{i}", f"{tag}-{i}",
                            f"iqn.2026-11.org.moc.bmi.node:{i}", f"u{i}", "secret1234")
                 for i in range(luns)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENT_CLIENTS) as pool:
            list(pool.map(targets.create_export, specs))
        added = time.perf_counter() - t0
        idle = _idle_cpu([d.pid for d in tgtds.daemons if d.pid], IDLE_SECONDS)
    return added, idle


def _alone_rounds(folder: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"add1": [], "addK": [], "idle1": [], "idleK": []}
    with _golden_cluster() as (cluster, ioctx):
        for r in range(ROUNDS):
            for processes, key in ((1, "1"), (K, "K")):
                added, idle = _tgtd_alone(cluster, ioctx, processes, LUNS, folder,
                                          f"r{r}k{processes}")
                print(f"tgtd_processes: tgtd alone, K={processes}: {LUNS} LUNs added in "
                      f"{added:.1f} s, idle {idle:.2f} cores", flush=True)
                out["add" + key].append(added)
                out["idle" + key].append(idle)
    return out


def run(results: Results) -> None:
    with tempfile.TemporaryDirectory(prefix="bmi-bench-") as tmp, \
            thread_budget(max((NODES + SERIES) * 2, LUNS) * THREADS_PER_LUN):
        folder = Path(tmp)
        rounds = [(_series(1, folder / f"one{r}"), _series(K, folder / f"many{r}"))
                  for r in range(ROUNDS)]
        one = {k: median([r[0][k] for r in rounds]) for k in rounds[0][0]}
        many = {k: median([r[1][k] for r in rounds]) for k in rounds[0][1]}
        floor = _floor(NODES)
        alone = _alone_rounds(folder)
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
    add1, addk = median(alone["add1"]), median(alone["addK"])
    idle1, idlek = median(alone["idle1"]), median(alone["idleK"])
    results.add(Figure("tgtd_processes", f"tgtd alone, {name}: {LUNS} rbd LUNs added "
                       f"({CONCURRENT_CLIENTS} threads, no BMI server)", addk, "s", add1,
                       "one tgtd", "<= 0.33x", addk <= add1 / 3))
    results.add(Figure("tgtd_processes", f"tgtd alone, {name}: CPU while idle at {LUNS} rbd "
                       "LUNs, share of a core", idlek, "cores", idle1, "one tgtd", "<= 0.5x",
                       idlek <= 0.5 * idle1))
