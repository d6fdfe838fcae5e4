"""A real server under idle load: 200 streams of every kind, with and without
credentials, and 200 slow HTTP connections, while a client makes unary calls. The unary
calls are all answered in time, every stream past the budgets is refused at once (never
left to time out), and the server's threads and memory come back afterwards.

The issue's goal is p99 < 100 ms; the assertion is a generous guard (1 s) so a loaded
2-core machine does not flake, and the figure is printed."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter

import grpc
import pytest
from bmi.v1 import (
    gateway_pb2,
    gateway_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
    nodes_pb2,
    nodes_pb2_grpc,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_process import TENANT_TOKENS, ServerProcess

pytestmark = pytest.mark.ceph

STREAMS = 200  # of each kind, for each caller
SLOW_HTTP = 200
UNARY_CALLS = 400
UNARY_WORKERS = 16  # the server's default `workers`
GATEWAY_TOKEN = "gateway-token-for-tests"
ALICE = (("authorization", f"Bearer {TENANT_TOKENS['alice']}"),)
GATEWAY = (("authorization", f"Bearer {GATEWAY_TOKEN}"),)


@pytest.fixture(scope="module")
def busy_server(ceph_cluster, tmp_path_factory):
    state = tmp_path_factory.mktemp("capacity")
    (state / "gateway-tokens").write_text(f"{GATEWAY_TOKEN} gw-a\n")
    # Gateway mode, so gateways' WatchTargets streams are part of the load.
    process = ServerProcess(state, str(ceph_cluster.conf_path), ceph_cluster.pool,
                            extra_env={"BMI_TARGET_MODE": "gateways"})
    process.start()
    yield process
    process.stop()


def _proc_status(pid: int) -> dict[str, int]:
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("Threads", "VmRSS"):
                values[key] = int(value.split()[0])
    return values


class _Held:
    """A request stream that sends ``first`` (if any) and then nothing until released."""

    def __init__(self, release: threading.Event, first=None) -> None:
        self._release, self._first = release, first

    def __iter__(self):
        if self._first is not None:
            yield self._first
        self._release.wait()


def _open_streams(channels: dict[str, grpc.Channel], release: threading.Event) -> list:
    """Every kind of long-lived call, STREAMS of each, anonymous and with credentials."""
    calls = []
    header = images_pb2.UploadImageRequest(header=images_pb2.UploadImageHeader(
        name="never-sent", file_size_bytes=1 << 20, format=images_pb2.IMAGE_FORMAT_RAW))
    listing = reflection_pb2.ServerReflectionRequest(list_services="")
    for who, metadata in (("anonymous", ()), ("alice", ALICE), ("gateway", GATEWAY)):
        channel = channels[who]
        health = health_pb2_grpc.HealthStub(channel)
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        nodes = nodes_pb2_grpc.NodeServiceStub(channel)
        images = images_pb2_grpc.ImageServiceStub(channel)
        gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
        for _ in range(STREAMS):
            if who == "gateway":
                calls.append(("WatchTargets", gateway.WatchTargets(
                    gateway_pb2.WatchTargetsRequest(name="gw-a"), metadata=metadata)))
                continue
            calls.append(("Watch", health.Watch(health_pb2.HealthCheckRequest(),
                                                metadata=metadata)))
            calls.append(("Reflection", reflection.ServerReflectionInfo(
                iter(_Held(release, listing)), metadata=metadata)))
            calls.append(("WatchNodes", nodes.WatchNodes(nodes_pb2.WatchNodesRequest(),
                                                         metadata=metadata)))
            calls.append(("Upload", images.UploadImage.future(
                iter(_Held(release, header)), metadata=metadata)))
        if who == "anonymous":  # the gateway's stream without its credential
            calls += [("WatchTargets", gateway.WatchTargets(
                gateway_pb2.WatchTargetsRequest(name="gw-a"))) for _ in range(STREAMS)]
    return calls


def _slow_http(address: str) -> tuple[list[socket.socket], int]:
    """SLOW_HTTP connections that each send part of a request line and stop; how many
    were answered 503 at once (past the server's connection cap)."""
    host, port = address.rsplit(":", 1)
    held, refused = [], 0
    for _ in range(SLOW_HTTP):
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.sendall(b"GET /boot.ipxe?mac=52:54")
        held.append(sock)
    time.sleep(0.5)
    for sock in held:
        sock.setblocking(False)
        try:
            if sock.recv(64).startswith(b"HTTP/1.1 503"):
                refused += 1
        except BlockingIOError:
            pass  # still open, waiting
        except OSError:
            refused += 1
    return held, refused


def _outcomes(calls: list) -> Counter:
    """(kind, outcome) of every call: "open" or the status code it ended with."""
    seen: Counter = Counter()
    for kind, call in calls:
        seen[(kind, call.code().name if call.done() else "open")] += 1
    return seen


def test_idle_streams_and_slow_connections_leave_unary_calls_fast(busy_server):
    server = busy_server
    pid = server.proc.pid
    addresses = server.address
    channels = {who: grpc.insecure_channel(addresses) for who in ("anonymous", "alice", "gateway")}
    unary_channel = grpc.insecure_channel(addresses)
    images = images_pb2_grpc.ImageServiceStub(unary_channel)

    def list_images() -> float:
        started = time.perf_counter()
        images.ListImages(images_pb2.ListImagesRequest(), metadata=ALICE, timeout=5)
        return time.perf_counter() - started

    for _ in range(50):  # warm up: what the server loads lazily is not a leak
        list_images()
    before = _proc_status(pid)
    release = threading.Event()
    calls = []
    held: list[socket.socket] = []
    try:
        calls = _open_streams(channels, release)
        held, http_refused = _slow_http(server.http_address)
        time.sleep(2)  # every stream answered, opened or refused
        during = _proc_status(pid)

        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def client(count: int) -> None:
            for _ in range(count):
                try:
                    took = list_images()
                except grpc.RpcError as exc:
                    with lock:
                        errors.append(exc.code().name)
                else:
                    with lock:
                        latencies.append(took)

        workers = [threading.Thread(target=client, args=(UNARY_CALLS // 4,)) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        outcomes = _outcomes(calls)
    finally:
        release.set()
        for _, call in calls:
            call.cancel()
        for sock in held:
            sock.close()

    latencies.sort()
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(f"\nunary ListImages under load: {len(latencies)} calls, p50 {p50 * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms; streams {sorted(outcomes.items())}; slow HTTP answered "
          f"503 at once: {http_refused}; server threads {before['Threads']} -> "
          f"{during['Threads']}, RSS {before['VmRSS'] // 1024} -> {during['VmRSS'] // 1024} MiB")
    assert errors == []
    assert p99 < 1.0
    # No stream was left waiting: each is open, or was answered at once with a refusal.
    assert {outcome for _, outcome in outcomes} <= {
        "open", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED"}
    # Anonymous callers only get health; each caller its own share.
    for kind in ("Reflection", "WatchNodes", "Upload", "WatchTargets"):
        assert outcomes[(kind, "UNAUTHENTICATED")] == STREAMS
    open_streams = sum(n for (_, outcome), n in outcomes.items() if outcome == "open")
    assert 0 < open_streams <= 3 * 32  # anonymous, alice, the gateway: 32 each
    assert 0 < http_refused < SLOW_HTTP  # the connection cap answered the rest at once
    assert during["Threads"] < before["Threads"] + 256

    # Everything comes back: the streams' threads end once idle, memory stays near where
    # it was. (The unary calls' pool, `workers` = 16 threads, is made as calls need it.)
    settled = before["Threads"] + UNARY_WORKERS
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        after = _proc_status(pid)
        if after["Threads"] <= settled:
            break
        time.sleep(0.5)
    print(f"after: threads {after['Threads']}, RSS {after['VmRSS'] // 1024} MiB")
    assert after["Threads"] <= settled
    assert after["VmRSS"] < before["VmRSS"] + 64 * 1024
    # And the budgets are whole again: the caller's streams are served.
    watch = health_pb2_grpc.HealthStub(channels["alice"]).Watch(
        health_pb2.HealthCheckRequest(), metadata=ALICE, timeout=10)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    for channel in (*channels.values(), unary_channel):
        channel.close()
