"""`make chaos`: concurrent operators provision and deprovision nodes for a while, under a
1000-node boot storm; then the database, Ceph and tgtd must agree exactly and the
server's memory must be flat.

- Operators: ``--operators`` threads, each with its own gRPC client and tenant token
  (two operators per tenant, each working its own share of the tenant's nodes),
  provisioning and deprovisioning random nodes of theirs, and listing them now and then.
  Every error is counted; the only one tolerated is the documented compare-and-set
  conflict ("changed meanwhile ... retry"), which a node fetching its boot script at the
  same moment causes, and which is retried.
- Boot storm: ``--nodes`` simulated nodes (the operators' among them) fetch
  /boot.ipxe over HTTP all at once, and again every ``--storm-interval`` seconds (as nodes
  not ready to boot do); any answer but 200 is an error.
- Memory: the server's RSS is sampled every few seconds; the slope after a warm-up is
  reported and the run fails on clear growth.
- At the end: every node the operators think provisioned is, with exactly one complete
  clone and one live target; every other node has neither; no record, volume or target
  is left over or duplicated.

    python -m bench.chaos [--minutes 10] [--operators 10] [--nodes 1000]

Results go to bench/results/chaos.md (and are printed). Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import grpc
from bmi.v1 import images_pb2, nodes_pb2
from bmi_client.client import BmiClient

from bench.boot_storm import _mac, _serial_hex, storm
from bench.common import percentile
from bmi_server.adapters.ceph.rbd_store import RbdImageStore
from bmi_server.devenv.stack import DevStack

RESULTS = Path(__file__).parent / "results" / "chaos.md"
NODES_PER_OPERATOR = 6
OPERATORS_PER_TENANT = 2
CONFLICT = re.compile(r"changed meanwhile")
RSS_INTERVAL = 5.0
WARM_UP = 0.2  # share of the run left out of the RSS slope
# Clear growth: the fitted line rises by more than this over the measured part of the run.
RSS_GROWTH_LIMIT_MIB = 16.0
EXPORTED = {nodes_pb2.NODE_STATE_PROVISIONED, nodes_pb2.NODE_STATE_BOOTING,
            nodes_pb2.NODE_STATE_ACTIVE}


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter = field(default_factory=Counter)
    conflicts: int = 0
    storm_requests: int = 0
    storm_errors: int = 0
    storm_rounds: int = 0
    storm_latencies: list[float] = field(default_factory=list)

    def took(self, op: str, seconds: float) -> None:
        with self.lock:
            self.latencies[op].append(seconds)

    def failed(self, op: str, exc: grpc.RpcError) -> None:
        with self.lock:
            self.errors[f"{op}: {exc.code().name}: {exc.details()}"] += 1


class Operator(threading.Thread):
    def __init__(self, number: int, address: str, token: str, nodes: list[str], image: str,
                 stop: threading.Event, tally: Tally, seed: int) -> None:
        super().__init__(name=f"operator-{number}", daemon=True)
        self.client = BmiClient(address, token, timeout=30, max_attempts=1)
        self.nodes = nodes
        self.image = image
        self.stop_event = stop
        self.tally = tally
        self.random = random.Random(seed)
        self.provisioned: set[str] = set()  # what this operator believes

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                if self.random.random() < 0.1:
                    self._timed("list", lambda: list(self.client.list_nodes()))
                    continue
                node = self.random.choice(self.nodes)
                if node in self.provisioned:
                    self._deprovision(node)
                else:
                    self._provision(node)
        finally:
            self.client.close()

    def _provision(self, node: str) -> None:
        reply = self._timed("provision", lambda: self.client.provision_node(node, image=self.image))
        if reply is not None:
            if reply.state != nodes_pb2.NODE_STATE_PROVISIONED:
                self._unexpected("provision", f"{node} is {reply.state}")
            self.provisioned.add(node)

    def _deprovision(self, node: str) -> None:
        while not self.stop_event.is_set():
            reply = self._timed("deprovision", lambda: self.client.deprovision_node(node),
                                conflict_ok=True)
            if reply is _RETRY:
                continue
            if reply is not None:
                if reply.state != nodes_pb2.NODE_STATE_AVAILABLE:
                    self._unexpected("deprovision", f"{node} is {reply.state}")
                self.provisioned.discard(node)
            return

    def _timed(self, op: str, call, conflict_ok: bool = False):
        t0 = time.perf_counter()
        try:
            reply = call()
        except grpc.RpcError as exc:
            if conflict_ok and exc.code() == grpc.StatusCode.FAILED_PRECONDITION and \
                    CONFLICT.search(exc.details() or ""):
                with self.tally.lock:
                    self.tally.conflicts += 1
                return _RETRY
            self.tally.failed(op, exc)
            return None
        self.tally.took(op, time.perf_counter() - t0)
        return reply

    def _unexpected(self, op: str, what: str) -> None:
        with self.tally.lock:
            self.tally.errors[f"{op}: unexpected reply: {what}"] += 1


_RETRY = object()


def boot_storm(address: str, paths: list[str], interval: float, stop: threading.Event,
               tally: Tally) -> None:
    while not stop.is_set():
        started = time.monotonic()
        _rate, latencies, errors = storm(address, paths)
        with tally.lock:
            tally.storm_rounds += 1
            tally.storm_requests += len(paths)
            tally.storm_errors += errors
            tally.storm_latencies += latencies
        stop.wait(max(0.0, started + interval - time.monotonic()))


def sample_rss(pid: int, stop: threading.Event, samples: list[tuple[float, float]]) -> None:
    t0 = time.monotonic()
    while not stop.is_set():
        samples.append((time.monotonic() - t0, rss_mib(pid)))
        stop.wait(RSS_INTERVAL)
    samples.append((time.monotonic() - t0, rss_mib(pid)))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (y per x unit)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def live_targets(stack: DevStack) -> set[str]:
    assert stack.tgtd is not None
    out = stack.tgtd.tgtadm("--op", "show", "--mode", "target").stdout
    return set(re.findall(r"^Target \d+: (\S+)", out, re.MULTILINE))


def agreement(stack: DevStack, admin: BmiClient, operators: list[Operator],
              golden: images_pb2.Image) -> list[str]:
    """Problems found comparing the operators' view, the database, Ceph and tgtd."""
    assert stack.cluster is not None
    problems = []
    nodes = {n.name: n for n in admin.list_nodes()}
    disks = {d.id: d for d in admin.list_disks()}
    images = {i.id: i for i in admin.list_images()}
    store = RbdImageStore(str(stack.cluster.conf_path), stack.cluster.pool)
    try:
        volumes = {v.name: v for v in store.list_volumes()}
    finally:
        store.close()
    targets = live_targets(stack)
    believed = {name for op in operators for name in op.provisioned}
    for op in operators:
        for name in op.nodes:
            node = nodes[name]
            if (name in believed) != (node.state in EXPORTED):
                problems.append(f"{name}: operator believes provisioned={name in believed}, "
                                f"server says {nodes_pb2.NodeState.Name(node.state)}")
    disk_users = Counter(n.disk_id for n in nodes.values() if n.disk_id)
    problems += [f"disk {d} used by {c} nodes" for d, c in disk_users.items() if c > 1]
    for node in nodes.values():
        if node.state in EXPORTED:
            if node.disk_id not in disks:
                problems.append(f"{node.name}: its disk {node.disk_id} has no record (lost)")
            if node.target.iqn not in targets:
                problems.append(f"{node.name}: its target is not in tgtd (lost)")
        elif node.disk_id or node.HasField("target"):
            problems.append(f"{node.name}: {nodes_pb2.NodeState.Name(node.state)} "
                            "but still has a disk or target")
    problems += [f"disk {d} belongs to no node (orphan record)" for d in disks
                 if d not in disk_users]
    records = {"bmi-" + i for i in [*disks, *images]}
    problems += [f"volume {v} has no record (orphan)" for v in volumes if v not in records]
    problems += [f"record {r} has no volume (lost)" for r in records if r not in volumes]
    problems += [f"volume {v} is incomplete" for v, info in volumes.items() if not info.complete]
    problems += [f"record {r.id} is {r.state}, not ready" for r in [*disks.values(),
                                                                      *images.values()]
                 if r.state != 2]
    exported = {n.target.iqn for n in nodes.values() if n.HasField("target")}
    problems += [f"target {t} belongs to no node (orphan)" for t in targets - exported]
    if golden.id not in images:
        problems.append("the golden image is gone")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--operators", type=int, default=10)
    parser.add_argument("--nodes", type=int, default=1000, help="nodes in the boot storm")
    parser.add_argument("--storm-interval", type=float, default=30.0,
                        help="seconds between the storm's rounds (discovery_retry_seconds)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    tenants = max(1, args.operators // OPERATORS_PER_TENANT)
    tokens = {f"chaos-t{t}": f"chaos-token-{t}-{args.seed}" for t in range(tenants)}
    extra = {"BMI_TARGET_AUDIT_SECONDS": "10",
             "BMI_DISCOVERY_RETRY_SECONDS": str(int(args.storm_interval))}
    tally = Tally()
    samples: list[tuple[float, float]] = []
    started = datetime.now(UTC)
    with DevStack(extra_env=extra) as stack, \
            BmiClient(stack.address, stack.admin_token, timeout=60) as admin:
        assert stack.server is not None
        token_file = stack.dir / "server" / "tokens"
        with token_file.open("a") as f:
            for project, token in tokens.items():
                f.write(f"{token} project:{project} chaos\n")
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "golden.raw"
            raw.write_bytes(bytes(range(256)) * ((4 << 20) // 256))
            golden = admin.upload_image(raw, "chaos-golden", project="ops",
                                        visibility=images_pb2.VISIBILITY_PUBLIC)
        # Every operator's nodes, enrolled in its tenant; their MACs are in the storm too.
        names = [f"chaos-n{i:04d}" for i in range(args.operators * NODES_PER_OPERATOR)]
        for i, name in enumerate(names):
            tenant = (i // NODES_PER_OPERATOR) % tenants
            admin.enroll_node(name, f"chaos-t{tenant}", macs=[_mac(i)])
        paths = [f"/boot.ipxe?mac={_mac(i)}&serial_hex={_serial_hex(i)}"
                 for i in range(max(args.nodes, len(names)))]

        stop = threading.Event()
        # Operator n works nodes n*6 .. n*6+5, which are in its tenant (n % tenants).
        operators = [
            Operator(n, stack.address, tokens[f"chaos-t{n % tenants}"],
                     names[n * NODES_PER_OPERATOR:(n + 1) * NODES_PER_OPERATOR],
                     golden.id, stop, tally, args.seed * 1000 + n)
            for n in range(args.operators)
        ]
        background = [
            threading.Thread(target=boot_storm, args=(stack.http_address, paths,
                                                      args.storm_interval, stop, tally),
                             name="storm", daemon=True),
            threading.Thread(target=sample_rss, args=(stack.server.pid, stop, samples),
                             name="rss", daemon=True),
        ]
        print(f"chaos: {args.operators} operators, {len(paths)}-node boot storm, "
              f"{args.minutes:g} min", flush=True)
        t0 = time.monotonic()
        for thread in [*background, *operators]:
            thread.start()
        duration = args.minutes * 60
        while not stop.wait(min(60.0, max(0.0, t0 + duration - time.monotonic()))):
            if time.monotonic() >= t0 + duration:
                break
            with tally.lock:
                done = sum(len(v) for v in tally.latencies.values())
                print(f"  {time.monotonic() - t0:5.0f}s: {done} operations, "
                      f"{sum(tally.errors.values())} errors, {tally.storm_requests} boot "
                      f"requests ({tally.storm_errors} failed), RSS {samples[-1][1]:.1f} MiB",
                      flush=True)
        stop.set()
        for thread in operators:
            thread.join(120)
        for thread in background:
            thread.join(300)
        elapsed = time.monotonic() - t0
        problems = agreement(stack, admin, operators, golden)
        server_log = stack.server_log()
        server_errors = [line for line in server_log.splitlines()
                         if " ERROR " in line or "Traceback" in line]
    # The stack's directory is gone with it: keep the server's log for a post-mortem.
    kept_log = Path(tempfile.gettempdir()) / f"bmi-chaos-server-{started:%Y%m%dT%H%M%S}.log"
    kept_log.write_text(server_log)

    measured = [p for p in samples if p[0] >= WARM_UP * samples[-1][0]]
    rss_slope = slope(measured) * 60  # MiB per minute
    growth = rss_slope / 60 * (measured[-1][0] - measured[0][0]) if len(measured) > 1 else 0.0
    report = summary(args, started, elapsed, tally, samples, rss_slope, growth, problems,
                     server_errors, len(paths))
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    failed = (sum(tally.errors.values()) or tally.storm_errors or problems or server_errors
              or growth > RSS_GROWTH_LIMIT_MIB)
    print(f"server log: {kept_log}")
    print("chaos: FAILED" if failed else "chaos: passed")
    return 1 if failed else 0


def summary(args, started, elapsed, tally: Tally, samples, rss_slope, growth, problems,
            server_errors, storm_nodes: int) -> str:
    ops = {op: v for op, v in tally.latencies.items()}
    lines = [
        f"# Chaos run, {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"{args.operators} operators for {elapsed / 60:.1f} min under a {storm_nodes}-node "
        f"boot storm (every {args.storm_interval:g} s); `python -m bench.chaos "
        f"--minutes {args.minutes:g}`.",
        "",
        "| operation | count | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
    ]
    for op, values in sorted(ops.items()):
        lines.append(f"| {op} | {len(values)} | {percentile(values, 50) * 1000:.0f} | "
                     f"{percentile(values, 99) * 1000:.0f} | {max(values) * 1000:.0f} |")
    if tally.storm_latencies:
        lines.append(f"| boot script (storm, {tally.storm_rounds} rounds) | "
                     f"{tally.storm_requests} | "
                     f"{percentile(tally.storm_latencies, 50) * 1000:.0f} | "
                     f"{percentile(tally.storm_latencies, 99) * 1000:.0f} | "
                     f"{max(tally.storm_latencies) * 1000:.0f} |")
    rss = [r for _, r in samples]
    lines += [
        "",
        f"- operator errors: {sum(tally.errors.values())}; boot-script errors: "
        f"{tally.storm_errors}; compare-and-set conflicts retried: {tally.conflicts}",
        f"- database, Ceph and tgtd: {'agree' if not problems else f'{len(problems)} problems'}",
        f"- server log ERROR lines: {len(server_errors)}",
        f"- server RSS: start {rss[0]:.1f} MiB, min {min(rss):.1f}, max {max(rss):.1f}, "
        f"end {rss[-1]:.1f}; slope after {WARM_UP:.0%} warm-up {rss_slope:+.3f} MiB/min "
        f"({growth:+.1f} MiB over the measured part; limit {RSS_GROWTH_LIMIT_MIB:g})",
        f"- samples (s, MiB): {', '.join(f'{t:.0f}:{r:.1f}' for t, r in every_nth(samples))}",
    ]
    for error, count in tally.errors.most_common(20):
        lines.append(f"- error x{count}: {error}")
    lines += [f"- problem: {p}" for p in problems[:50]]
    lines += [f"- server log: {line}" for line in server_errors[:20]]
    return "\n".join(lines) + "\n"


def every_nth(samples: list, count: int = 20) -> list:
    return samples[:: max(1, len(samples) // count)]


if __name__ == "__main__":
    sys.exit(main())
