"""Serving models compared on one trivial unary method (no BMI work at all), to choose
the gRPC serving layer: grpcio's sync server with a fixed ThreadPoolExecutor (what BMI
had), with every call on an elastic pool (a thread per call in flight: the first design
tried), with admission control and its two lanes (what BMI has: unary calls on a fixed
pool, streams on the elastic one), and grpc.aio on one event loop.

    .venv/bin/python -m bench.serving_models [calls]

Each server runs in its own process; the same client (32 threads over 8 channels) drives
each in turn. Prints calls/s, p50/p99 and the server's CPU per call. Not part of
`make bench` (a design measurement, recorded in bench/README.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import grpc
from bmi.v1 import boot_pb2, boot_pb2_grpc

from bmi_server.devenv.stack import free_port

CLIENTS = 32
CHANNELS = 8
MODES = ("pool", "elastic", "admission", "aio")

SERVER = """
import asyncio, sys
from concurrent import futures
import grpc
from bmi.v1 import boot_pb2
DATA = boot_pb2.BootPlan(reason="constant").SerializeToString()
mode, port = sys.argv[1], sys.argv[2]
if mode == "aio":
    async def plan(request, context):
        return DATA
    async def main():
        handler = grpc.method_handlers_generic_handler("bmi.v1.BootService", {
            "GetBootPlan": grpc.unary_unary_rpc_method_handler(plan)})
        server = grpc.aio.server(handlers=[handler])
        server.add_insecure_port("127.0.0.1:" + port)
        await server.start()
        print("ready", flush=True)
        await server.wait_for_termination()
    asyncio.run(main())
else:
    handler = grpc.method_handlers_generic_handler("bmi.v1.BootService", {
        "GetBootPlan": grpc.unary_unary_rpc_method_handler(lambda request, context: DATA)})
    if mode == "pool":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), handlers=[handler])
    elif mode == "elastic":
        from bmi_server.api.rpc_executor import ElasticExecutor
        server = grpc.server(ElasticExecutor(352), handlers=[handler])
    else:
        from bmi_server.api.admission import AdmissionInterceptor, AdmissionLimits
        from bmi_server.api.rpc_executor import RpcExecutor
        limits = AdmissionLimits()
        executor = RpcExecutor(limits.workers, limits.stream_threads)
        server = grpc.server(executor, handlers=[handler],
                             interceptors=[AdmissionInterceptor(limits, executor, None)])
    server.add_insecure_port("127.0.0.1:" + port)
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()
"""


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(mode: str, calls: int) -> dict[str, float]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, mode, str(port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(CHANNELS)]
        stubs = [boot_pb2_grpc.BootServiceStub(c) for c in channels]
        for stub in stubs:
            stub.GetBootPlan(boot_pb2.GetBootPlanRequest(), timeout=10)
        latencies: list[float] = []
        errors = 0
        lock = threading.Lock()

        def client(index: int) -> None:
            nonlocal errors
            stub = stubs[index % CHANNELS]
            mine = []
            for _ in range(calls // CLIENTS):
                started = time.perf_counter()
                try:
                    stub.GetBootPlan(boot_pb2.GetBootPlanRequest(), timeout=10)
                except grpc.RpcError:
                    with lock:
                        errors += 1
                    continue
                mine.append(time.perf_counter() - started)
            with lock:
                latencies.extend(mine)

        cpu = _cpu_seconds(server.pid)
        started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        cpu = _cpu_seconds(server.pid) - cpu
        for channel in channels:
            channel.close()
    finally:
        server.terminate()
        server.wait(10)
    latencies.sort()
    return {
        "per_second": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "cpu_ms_per_call": cpu / max(len(latencies), 1) * 1000,
        "errors": errors,
    }


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 6400
    for round_ in range(2):  # interleaved, so a change in the machine's load hits all
        for mode in MODES:
            figures = measure(mode, calls)
            print(f"round {round_} {mode:16} " + "  ".join(
                f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in figures.items()), flush=True)


if __name__ == "__main__":
    main()
