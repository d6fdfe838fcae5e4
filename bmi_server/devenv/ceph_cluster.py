"""A throwaway one-node Ceph cluster (one mon, one memstore OSD, cephx) for tests, the demo,
benchmarks and developers: ``bmi_server.embedded.ceph.CephCluster`` without a kept
directory, started on a free port in a new temporary directory and deleted on stop.

    python -m bmi_server.devenv.ceph_cluster start [--dir D]   # prints the conf path last
    python -m bmi_server.devenv.ceph_cluster stop --dir D      # or --conf D/ceph.conf
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bmi_server.embedded.ceph import (
    ADMIN_CLIENT,
    DAEMONS,
    TGT_CLIENT,
    CephCluster,
    CephClusterError,
)

__all__ = ["ADMIN_CLIENT", "DAEMONS", "TGT_CLIENT", "CephCluster", "CephClusterError", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bmi_server.devenv.ceph_cluster",
        description="Throwaway one-node Ceph cluster.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="start a cluster; print its conf path last")
    p_start.add_argument("--dir", type=Path, help="cluster directory (default: a new temp dir)")
    p_start.add_argument("--pool", default="rbd")
    p_start.add_argument("--timeout", type=float, default=60)
    p_stop = sub.add_parser("stop", help="stop a cluster and delete its directory")
    where = p_stop.add_mutually_exclusive_group(required=True)
    where.add_argument("--dir", type=Path)
    where.add_argument("--conf", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            cluster = CephCluster(args.dir, pool=args.pool)
            started = time.monotonic()
            cluster.start(timeout=args.timeout)
            print(
                f"ceph cluster up in {time.monotonic() - started:.1f} s, pool {cluster.pool!r}",
                file=sys.stderr,
            )
            print(cluster.conf_path)
        else:
            base = args.dir if args.dir is not None else args.conf.parent
            CephCluster.attach(base).stop()
    except CephClusterError as e:
        first, _, rest = str(e).partition("\n")
        print(f"error: {first}", file=sys.stderr)
        if rest:
            print(rest, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
