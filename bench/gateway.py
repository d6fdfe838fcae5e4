"""Gateway capacity: what one tgtd costs per exported disk (rbd backing store), and how
long a gateway takes to converge N targets from an empty tgtd (first start, or after a
tgtd restart) and to audit N targets when nothing changed.

The gateway's own code path is measured: ``plan`` + ``apply`` of bmi_gateway.reconcile
over TgtTargetDriver, the calls bmi-gateway makes, on a fresh tgtd per series. The
baseline is the same tgtd with the same number of targets backed by no store
(``--bstype null``: no librados client), so the figure isolates what rbd LUNs cost.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from bench.common import Figure, Results, cpu_seconds, scale, thread_budget, timed
from bmi_gateway.reconcile import apply, plan
from bmi_server.adapters.ceph.rbd_store import RbdImageStore
from bmi_server.adapters.tgt.control_socket import TgtdSocketRunner
from bmi_server.adapters.tgt.tgtadm import TgtTargetDriver
from bmi_server.core.models import TargetSpec
from bmi_server.devenv.ceph_cluster import CephCluster
from bmi_server.devenv.tgtd import Tgtd

PREFIX = "iqn.2026-11.org.moc.bmi:"
# Each rbd LUN costs tgtd 16 threads with the tgt client profile (31 without); the run
# raises the kernel's thread limits as a BMI host's sysctl does.
SIZES = scale([25, 50, 100], [100, 250, 1000])


def _proc(pid: int) -> tuple[float, int]:
    """(resident MiB, threads) of a process."""
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


def _specs(n: int) -> list[TargetSpec]:
    return [TargetSpec(f"{PREFIX}dsk-bench-{i:05d}", f"bmi-dsk-bench-{i:05d}",
                       f"iqn.2026-11.org.moc.bmi.node:bench-{i}", f"bmi-dsk-bench-{i:05d}",
                       secrets.token_urlsafe(12)) for i in range(n)]


def _settle(pid: int) -> tuple[float, int]:
    time.sleep(1)  # librados clients start their threads lazily after connecting
    return _proc(pid)


def _idle_cpu(pid: int, seconds: float = 5) -> float:
    """Share of one core the process burns while nothing is asked of it."""
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / seconds


def _null_cost(n: int) -> tuple[float, int]:
    """RSS and threads of a tgtd holding n targets with a null-backed LUN each."""
    with Tgtd() as tgtd:
        for i in range(1, n + 1):
            tgtd.tgtadm("--op", "new", "--mode", "target", "--tid", str(i),
                        "-T", f"{PREFIX}null-{i}")
            tgtd.tgtadm("--op", "new", "--mode", "logicalunit", "--tid", str(i), "--lun", "1",
                        "--bstype", "null", "--backing-store", f"/dev/null-{i}")
        return _settle(tgtd.pid)


def run(results: Results) -> None:
    top = max(SIZES)
    with thread_budget(top * 40), CephCluster(memstore_bytes=1 << 30) as cluster:
        conf, pool = str(cluster.tgt_conf_path), cluster.pool
        store = RbdImageStore(conf, pool)
        store.create("bmi-img-bench", 64 << 20, {"bmi.kind": "image"})
        store.seal("bmi-img-bench")
        specs = _specs(top)
        for spec in specs:
            store.clone("bmi-img-bench", spec.volume, {"bmi.kind": "disk"})
        store.close()
        for n in SIZES:
            with Tgtd() as tgtd:
                empty_rss, empty_threads = _settle(tgtd.pid)
                driver = TgtTargetDriver(conf, pool, tgtd.portal, control=tgtd.control,
                                         runner=TgtdSocketRunner(),  # bmi-gateway's default
                                         rbd_user=cluster.tgt_user)
                desired = {s.iqn: s for s in specs[:n]}
                outcome = None

                def converge(desired=desired, driver=driver) -> None:
                    nonlocal outcome
                    steps = plan(desired, driver.live_targets(), {}, prefix=PREFIX,
                                 backing_store=driver.backing_store)
                    outcome = apply(steps, driver)

                seconds = timed(converge)
                assert outcome is not None and not outcome.failed, outcome
                rss, threads = _settle(tgtd.pid)
                idle = _idle_cpu(tgtd.pid)
                audit = timed(lambda d=desired, drv=driver, o=outcome: plan(
                    d, drv.live_targets(), o.applied, prefix=PREFIX,
                    backing_store=drv.backing_store))
            null_rss, null_threads = _null_cost(n)
            per_mib = (rss - empty_rss) / n
            per_threads = (threads - empty_threads) / n
            results.series.setdefault("gateway", {}).setdefault(
                "converge seconds", []).append((n, seconds))
            results.add(Figure("gateway", f"converge {n} targets from an empty tgtd", seconds,
                               "s", note=f"{seconds / n * 1000:.0f} ms per target"))
            results.add(Figure("gateway", f"tgtd resident memory per rbd LUN (N={n})", per_mib,
                               "MiB", (null_rss - empty_rss) / n or None,
                               "null-backed LUN, same tgtd build"))
            results.add(Figure("gateway", f"tgtd threads per rbd LUN (N={n})", per_threads,
                               "threads", (null_threads - empty_threads) / n or None,
                               "null-backed LUN"))
            results.add(Figure("gateway", f"audit of {n} targets, nothing to do", audit, "s"))
            results.add(Figure("gateway", f"tgtd CPU while idle with {n} rbd LUNs", idle * 100,
                               "% of a core", note="timers of the LUNs' Ceph clients"))
