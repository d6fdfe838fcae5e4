"""Data path: the same clone read and written through tgtd/iSCSI versus direct librbd.

Both sides use qemu-img's block layer (libiscsi for iscsi://, librbd for rbd:), with
the same request size, queue depth and count. qemu-img bench walks offsets in order,
so "4 KiB" is small-block IOPS at sequential offsets, not random I/O.
"""

from __future__ import annotations

import re
import secrets
import subprocess

from bench.common import Figure, Results, children_cpu_seconds, cpu_seconds, scale
from bmi_server.adapters.ceph.rbd_store import RbdImageStore
from bmi_server.adapters.tgt.tgtadm import TgtTargetDriver
from bmi_server.core.models import TargetSpec
from bmi_server.devenv.ceph_cluster import CephCluster
from bmi_server.devenv.tgtd import Tgtd

SIZE_MIB = scale(256, 1024)
QEMU_DEFAULT_INITIATOR = "iqn.2008-11.org.linux-kvm"  # what qemu-img logs in as
RUNS = 3
CASES = {
    # name: (request size, count, queue depth, write)
    "sequential read 1 MiB": ("1M", SIZE_MIB, 8, False),
    "sequential write 1 MiB": ("1M", SIZE_MIB, 8, True),
    "4 KiB read": ("4k", scale(10000, 40000), 16, False),
    "4 KiB write": ("4k", scale(10000, 40000), 16, True),
}


def _bench(url: str, size: str, count: int, depth: int, write: bool) -> float:
    """Seconds for the run (best of RUNS)."""
    args = ["qemu-img", "bench", "-f", "raw", "-t", "none", "-n", "-c", str(count),
            "-d", str(depth), "-s", size, *(["-w"] if write else []), url]
    best = float("inf")
    for _ in range(RUNS):
        out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
        best = min(best, float(re.search(r"Run completed in ([0-9.]+) seconds", out).group(1)))
    return best


def filled_clone(cluster: CephCluster, size_mib: int, image: str, disk: str) -> None:
    """A sealed image of ``size_mib`` MiB written full (reads hit real objects, not sparse
    holes) and ``disk``, a clone of it, as BMI provisions one."""
    conf, pool = str(cluster.conf_path), cluster.pool
    store = RbdImageStore(conf, pool)
    store.create(image, size_mib << 20, {"bmi.kind": "image"})
    store.close()
    subprocess.run(["qemu-img", "bench", "-f", "raw", "-w", "-c", str(size_mib), "-s", "1M",
                    "-d", "8", "--pattern=165", f"rbd:{pool}/{image}:conf={conf}"],
                   check=True, capture_output=True)
    store = RbdImageStore(conf, pool)
    store.seal(image)
    store.clone(image, disk, {"bmi.kind": "disk"})
    store.close()


def _cpu(processes: dict[str, int | None]) -> dict[str, float]:
    """CPU seconds so far of the daemons on the path, and of qemu-img runs (the initiator
    or librbd client)."""
    used = {name: cpu_seconds(pid) for name, pid in processes.items() if pid}
    return {**used, "qemu-img": children_cpu_seconds()}


def _cpu_figures(results: Results, case: str, cpu: dict[str, dict[str, float]],
                 gib: float) -> None:
    """Why the ratio is what it is: CPU per GiB each process spent, iSCSI against librbd.
    On a 2-core machine a path needing more CPU per GiB is slower by about that much."""
    iscsi, direct = (sum(cpu[k].values()) / gib for k in ("iSCSI via tgtd", "librbd"))
    detail = ", ".join(f"{name} {used / gib:.2f}" for name, used in cpu["iSCSI via tgtd"].items())
    results.add(Figure("data path", f"{case}: CPU seconds per GiB, all processes", iscsi,
                       "s/GiB", direct, "librbd path", note=f"iSCSI path: {detail}"))


def run(results: Results) -> None:
    with CephCluster(memstore_bytes=(SIZE_MIB * 3 + 512) << 20) as cluster, Tgtd() as tgtd:
        conf, pool = str(cluster.conf_path), cluster.pool
        filled_clone(cluster, SIZE_MIB, "bmi-img-bench", "bmi-dsk-bench")
        secret = secrets.token_urlsafe(12)
        iqn = "iqn.2026-11.org.moc.bmi:dsk-bench"
        driver = TgtTargetDriver(conf, pool, tgtd.portal, control=tgtd.control)
        driver.create_export(TargetSpec(iqn, "bmi-dsk-bench", QEMU_DEFAULT_INITIATOR,
                                        "bench", secret))
        urls = {
            "iSCSI via tgtd": f"iscsi://bench%{secret}@{tgtd.portal}/{iqn}/1",
            "librbd": f"rbd:{pool}/bmi-dsk-bench:conf={conf}",
        }
        processes = {"tgtd": tgtd.pid, "OSD": cluster.daemon_pid("osd.0")}
        for case, (size, count, depth, write) in CASES.items():
            seconds, cpu = {}, {}
            for name, url in urls.items():
                before = _cpu(processes)
                seconds[name] = _bench(url, size, count, depth, write)
                cpu[name] = {k: v - before[k] for k, v in _cpu(processes).items()}
            unit_bytes = (1 << 20) if size == "1M" else 4096
            if size == "1M":
                rate = {k: count * unit_bytes / v / 2**20 for k, v in seconds.items()}
                unit = "MiB/s"
            else:
                rate = {k: count / v for k, v in seconds.items()}
                unit = "IOPS"
            goal = ">= 0.8x" if case == "sequential read 1 MiB" else ""
            ratio = rate["iSCSI via tgtd"] / rate["librbd"]
            results.add(Figure("data path", f"{case} (depth {depth})", rate["iSCSI via tgtd"],
                               unit, rate["librbd"], "librbd, same clone", goal,
                               (ratio >= 0.8) if goal else None))
            if size == "1M" and not write:
                _cpu_figures(results, case, cpu, RUNS * count / 1024)
        driver.remove_export(iqn)
