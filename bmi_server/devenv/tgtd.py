"""A throwaway tgtd (iSCSI target daemon) on a free port and control socket, for tests, the
demo and benchmarks: ``bmi_server.embedded.tgtd.Tgtd`` without a kept directory.

    python -m bmi_server.devenv.tgtd start [--dir D] [--port P] [--control C]  # prints D last
    python -m bmi_server.devenv.tgtd stop --dir D
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bmi_server.adapters.tgt.ceph_profile import TGT_IO_THREADS
from bmi_server.embedded.tgtd import SOCKET_DIR, Tgtd, TgtdError, _free_control, free_controls

__all__ = ["SOCKET_DIR", "Tgtd", "TgtdError", "TgtdGroup", "_free_control", "main"]


class TgtdGroup:
    """K throwaway tgtds as a server with ``tgtd_processes = K`` drives them: free ports,
    consecutive control numbers (process i: ``control + i``)."""

    def __init__(self, count: int, io_threads: int | None = TGT_IO_THREADS,
                 host: str = "127.0.0.1") -> None:
        self.count = count
        self._io_threads = io_threads
        self._host = host
        self.control = 0
        self.daemons: list[Tgtd] = []

    def start(self) -> TgtdGroup:
        try:
            self.control = free_controls(self.count)
            for i in range(self.count):
                daemon = Tgtd(None, self.control + i, io_threads=self._io_threads,
                              host=self._host)
                daemon.start()
                self.daemons.append(daemon)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        while self.daemons:
            self.daemons.pop().stop()

    def __getitem__(self, process: int) -> Tgtd:
        return self.daemons[process]

    def __len__(self) -> int:
        return len(self.daemons)

    @property
    def portals(self) -> list[str]:
        return [d.portal for d in self.daemons]

    def server_env(self, advertise_host: str | None = None) -> dict[str, str]:
        """bmi-server settings (environment) for these tgtds."""
        env = {"BMI_TGT_PORTAL": ",".join(self.portals), "BMI_TGT_CONTROL": str(self.control),
               "BMI_TGTD_PROCESSES": str(self.count)}
        if advertise_host:
            env["BMI_ADVERTISED_PORTALS"] = ";".join(
                f"{advertise_host}:{d.port}" for d in self.daemons)
        return env

    def __enter__(self) -> TgtdGroup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
