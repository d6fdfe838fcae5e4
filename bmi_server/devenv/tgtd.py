"""A throwaway tgtd (iSCSI target daemon) on a free port and control socket, for tests, the
demo and benchmarks: ``bmi_server.embedded.tgtd.Tgtd`` without a kept directory.

    python -m bmi_server.devenv.tgtd start [--dir D] [--port P] [--control C]  # prints D last
    python -m bmi_server.devenv.tgtd stop --dir D
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bmi_server.embedded.tgtd import SOCKET_DIR, Tgtd, TgtdError, _free_control

__all__ = ["SOCKET_DIR", "Tgtd", "TgtdError", "_free_control", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bmi_server.devenv.tgtd", description="Throwaway tgtd iSCSI target daemon."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="start tgtd; print its directory last")
    p_start.add_argument("--dir", type=Path, help="state and log directory (default: temp dir)")
    p_start.add_argument("--port", type=int, help="iSCSI port on 127.0.0.1 (default: free port)")
    p_start.add_argument("--control", type=int, help="tgtd -C number (default: a free one)")
    p_stop = sub.add_parser("stop", help="stop tgtd and delete its directory")
    p_stop.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            tgtd = Tgtd(args.port, args.control, args.dir)
            tgtd.start()
            print(
                f"tgtd up: portal {tgtd.portal}, control {tgtd.control} "
                f"(tgtadm -C {tgtd.control}), log {tgtd.log_path}",
                file=sys.stderr,
            )
            print(tgtd.base_dir)
        else:
            Tgtd.attach(args.dir).stop()
    except TgtdError as e:
        first, _, rest = str(e).partition("\n")
        print(f"error: {first}", file=sys.stderr)
        if rest:
            print(rest, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
