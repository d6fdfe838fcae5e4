"""Profiles of bmi-server under each benchmark's load, as evidence for bench/README.md.

    .venv/bin/python -m bench.profile provision|boot_storm|agent_storm [--seconds S]

Starts a DevStack, drives the suite's own load at the server for S seconds while py-spy
samples the server process, and writes ``results/profile-<load>.txt``: the frames with
the largest share of samples (inclusive), where the load's requests spend the time.
``--gil`` counts only samples holding the GIL (Python CPU); ``--idle`` counts waiting
threads too (wall clock: where a provision waits on Ceph and tgtd); by default, every
thread's running samples.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import agent_storm, boot_storm, provision
from bmi_server.devenv.stack import DevStack

RESULTS = Path(__file__).resolve().parent / "results"
PY_SPY = Path(sys.executable).with_name("py-spy")
NODES = 300
SHOWN = 40


def _provision_load(stack: contextlib.ExitStack, folder: Path) -> tuple[int, Callable[[], object]]:
    series = provision._Bmi(stack, folder, 600)  # more than 10 s of provisions
    for i in range(10):  # warm: first clones and targets
        series.provision(i)
    counter = iter(range(10, 10**6))
    return series.stack.server.pid, lambda: series.provision(next(counter))


def _boot_storm_load(stack: contextlib.ExitStack, _: Path) -> tuple[int, Callable[[], object]]:
    dev = stack.enter_context(DevStack())
    paths = [f"/boot.ipxe?mac={boot_storm._mac(i)}" for i in range(NODES)]
    boot_storm.storm(dev.http_address, paths)  # registers them: the load is known nodes
    return dev.server.pid, lambda: boot_storm.storm(dev.http_address, paths)


def _agent_storm_load(stack: contextlib.ExitStack, _: Path) -> tuple[int, Callable[[], object]]:
    dev = stack.enter_context(DevStack(extra_env=agent_storm.stack_env()))
    agents = agent_storm.discover(dev.http_address, NODES)
    agent_storm.storm(dev.address, agents)
    return dev.server.pid, lambda: agent_storm.storm(dev.address, agents)


LOADS = {"provision": _provision_load, "boot_storm": _boot_storm_load,
         "agent_storm": _agent_storm_load}  # fmt: skip


def summarise(raw: Path, shown: int = SHOWN) -> str:
    """py-spy's raw (collapsed) stacks as the frames with the most samples, inclusive."""
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        total += int(count)
        for frame in set(stack.split(";")):
            inclusive[frame] += int(count)
    rows = [f"{n / total * 100:5.1f}%  {frame}" for frame, n in inclusive.most_common(shown)]
    return f"{total} samples\n" + "\n".join(rows) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.profile")
    parser.add_argument("load", choices=sorted(LOADS))
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--gil", action="store_true")
    parser.add_argument("--idle", action="store_true",
                        help="count waiting threads too (wall clock: time spent on Ceph, tgtd)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bmi-profile-") as tmp, \
            contextlib.ExitStack() as stack:
        pid, one_round = LOADS[args.load](stack, Path(tmp))
        raw = Path(tmp) / "profile.raw"
        spy = subprocess.Popen(
            [str(PY_SPY), "record", "--pid", str(pid), "--duration", str(int(args.seconds)),
             "--rate", "200", "--format", "raw", "--output", str(raw), "--nonblocking",
             *(["--gil"] if args.gil else []), *(["--idle"] if args.idle else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rounds, deadline = 0, time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            one_round()
            rounds += 1
        spy.wait(timeout=args.seconds + 30)
        RESULTS.mkdir(exist_ok=True)
        flags = "".join(f" --{f}" for f in ("gil", "idle") if getattr(args, f))
        out = RESULTS / f"profile-{args.load}{flags.replace(' --', '-')}.txt"
        out.write_text(f"bench.profile {args.load}{flags}: "
                       f"{rounds} rounds of load in {args.seconds:g} s\n" + summarise(raw))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
