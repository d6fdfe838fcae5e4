"""What BMI controls on the data path, tried one at a time on sequential 1 MiB reads.

Each variant exports the same clone through tgtd and is measured right after librbd on
that clone (best of RUNS each), so every ratio has its own same-moment baseline:

* iSCSI segment lengths: tgtd's per-target MaxRecvDataSegmentLength /
  MaxXmitDataSegmentLength 256 KiB and MaxBurstLength 1 MiB (defaults 8 KiB / 256 KiB),
  set with `--op update --mode target` (four requests, cheap over tgtd's socket);
* librbd readahead for tgtd's backing store, through the ceph.conf tgt-rbd is given
  (bsopts conf=): readahead kept on for the whole read, up to 4 MiB;
* both.

`make bench BENCH=datapath_tuning`; not part of the default run.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from bench.common import Figure, Results, scale
from bench.datapath import QEMU_DEFAULT_INITIATOR, _bench, filled_clone
from bmi_server.adapters.tgt.control_socket import TgtdSocketRunner
from bmi_server.adapters.tgt.tgtadm import TgtTargetDriver
from bmi_server.core.models import TargetSpec
from bmi_server.devenv.ceph_cluster import CephCluster
from bmi_server.devenv.tgtd import Tgtd

SIZE_MIB = scale(256, 512)
SEGMENTS = {"MaxRecvDataSegmentLength": "262144", "MaxXmitDataSegmentLength": "262144",
            "MaxBurstLength": "1048576", "FirstBurstLength": "262144"}  # fmt: skip
READAHEAD = "rbd_readahead_disable_after_bytes = 0\nrbd_readahead_max_bytes = 4194304\n"
VARIANTS = {"defaults": (False, False), "segment lengths": (True, False),
            "rbd readahead": (False, True), "both": (True, True)}  # fmt: skip


def _readahead_conf(conf: str, folder: Path) -> str:
    text = Path(conf).read_text()
    tuned = folder / "ceph-readahead.conf"
    tuned.write_text(text + "\n[client]\n" + READAHEAD)
    return str(tuned)


def run(results: Results) -> None:
    with CephCluster(memstore_bytes=(SIZE_MIB * 3 + 512) << 20) as cluster, Tgtd() as tgtd:
        conf, pool = str(cluster.conf_path), cluster.pool
        filled_clone(cluster, SIZE_MIB, "bmi-img-tune", "bmi-dsk-tune")
        tuned_conf = _readahead_conf(conf, Path(cluster.conf_path).parent)
        librbd = f"rbd:{pool}/bmi-dsk-tune:conf={conf}"
        runner = TgtdSocketRunner()
        for name, (segments, readahead) in VARIANTS.items():
            driver = TgtTargetDriver(tuned_conf if readahead else conf, pool, tgtd.portal,
                                     control=tgtd.control, runner=runner)
            secret = secrets.token_urlsafe(12)
            iqn = f"iqn.2026-11.org.moc.bmi:dsk-tune-{name.replace(' ', '-')}"
            driver.create_export(TargetSpec(iqn, "bmi-dsk-tune", QEMU_DEFAULT_INITIATOR,
                                            "tune", secret))
            if segments:
                tid = driver._known[iqn].tid  # a bench reaching in on purpose
                for key, value in SEGMENTS.items():
                    rc, _, err = runner(["tgtadm", "-C", str(tgtd.control), "--lld", "iscsi",
                                         "--op", "update", "--mode", "target", "--tid", str(tid),
                                         "--name", key, "--value", value])
                    if rc:
                        raise RuntimeError(f"{key}: {err}")
            base = _bench(librbd, "1M", SIZE_MIB, 8, False)
            iscsi = _bench(f"iscsi://tune%{secret}@{tgtd.portal}/{iqn}/1", "1M", SIZE_MIB, 8,
                           False)
            driver.remove_export(iqn)
            results.add(Figure("data path tuning", f"sequential read 1 MiB, {name}",
                               SIZE_MIB / iscsi, "MiB/s", SIZE_MIB / base, "librbd, same clone",
                               ">= 0.8x", iscsi <= base / 0.8))
