"""Boot storm, gRPC half: many node agents at once Register and GetBootPlan.

Each simulated node first fetches its boot script over HTTP (unknown MAC, discovery mode
"inventory"), which registers it and hands it the agent's one-boot token. Then every agent
makes the two calls a real agent makes on start: Register (its inventory) and GetBootPlan
(WAIT: not provisioned yet), with its token as metadata.

Baseline: a bare grpcio server in its own process answering the same two methods with a
constant message (same thread pool size as bmi-server), driven by the same client with the
same concurrency, in the same run.
"""

from __future__ import annotations

import http.client
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from bmi.v1 import boot_pb2, boot_pb2_grpc, inventory_pb2

from bench.common import Figure, Results, percentile, scale, with_cpu
from bmi_server.devenv.stack import DevStack, free_port

AGENTS = scale(300, 1000)
CLIENTS = 32
CHANNELS = 8  # agents are separate machines: spread the calls over several connections
TOKEN = "bmi-boot-token"
SERVER_WORKERS = 16  # bmi-server's default `workers`
AGENT_IMAGE = Path(__file__).resolve().parents[1] / "build" / "agent-image"

BARE_SERVER = f"""
import sys, time
from concurrent import futures
import grpc
from bmi.v1 import boot_pb2
REGISTERED = boot_pb2.RegisterResponse(node_id="n", name="n", heartbeat_seconds=10)
PLAN = boot_pb2.BootPlan(action=boot_pb2.BOOT_PLAN_ACTION_WAIT, reason="constant",
                         retry_after_seconds=10)
def constant(message):
    data = message.SerializeToString()
    return grpc.unary_unary_rpc_method_handler(lambda request, context: data)
handler = grpc.method_handlers_generic_handler("bmi.v1.BootService", {{
    "Register": constant(REGISTERED), "GetBootPlan": constant(PLAN)}})
server = grpc.server(futures.ThreadPoolExecutor(max_workers={SERVER_WORKERS}),
                     handlers=[handler])
server.add_insecure_port("127.0.0.1:" + sys.argv[1])
server.start()
server.wait_for_termination()
"""


def _mac(i: int) -> str:
    return "52:54:04:" + ":".join(f"{b:02x}" for b in i.to_bytes(3, "big"))


class Agent:
    """One simulated agent: its node id, token and inventory (one NIC: its MAC)."""

    def __init__(self, node_id: str, token: str, mac: str) -> None:
        self.node_id, self.token = node_id, token
        self.register = boot_pb2.RegisterRequest(
            node_id=node_id, agent_version="bench",
            inventory=inventory_pb2.Inventory(
                cpu=inventory_pb2.Cpu(model="bench", count=2, architecture="x86_64"),
                memory=inventory_pb2.Memory(physical_bytes=1 << 30),
                interfaces=[inventory_pb2.NetworkInterface(name="eth0", mac=mac)],
            ),
        )  # fmt: skip
        self.plan = boot_pb2.GetBootPlanRequest(node_id=node_id)


def storm(address: str, agents: list[Agent]) -> tuple[float, list[float], int]:
    """(agents per second, Register+GetBootPlan latencies, errors) for every agent once."""
    channels = [grpc.insecure_channel(address) for _ in range(CHANNELS)]
    stubs = [boot_pb2_grpc.BootServiceStub(c) for c in channels]
    for channel in channels:
        grpc.channel_ready_future(channel).result(timeout=30)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one(i_agent: tuple[int, Agent]) -> None:
        i, agent = i_agent
        stub = stubs[i % CHANNELS]
        metadata = ((TOKEN, agent.token),)
        t0 = time.perf_counter()
        error = ""
        try:
            stub.Register(agent.register, metadata=metadata, timeout=30)
            plan = stub.GetBootPlan(agent.plan, metadata=metadata, timeout=30)
            if plan.action != boot_pb2.BOOT_PLAN_ACTION_WAIT:
                error = f"plan {plan.action}"
        except grpc.RpcError as e:
            error = f"{e.code().name}: {e.details()}"
        with lock:
            latencies.append(time.perf_counter() - t0)
            if error:
                errors.append(error)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(one, enumerate(agents)))
    rate = len(agents) / (time.perf_counter() - t0)
    for channel in channels:
        channel.close()
    if errors:
        print(f"  agent storm: {len(errors)} errors, first: {errors[0]}", flush=True)
    return rate, latencies, len(errors)


def _bare_server() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(port)])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
    return proc, f"127.0.0.1:{port}"


def discover(http_address: str, count: int, first: int = 0) -> list[Agent]:
    """Each node fetches its boot script (unknown MAC): the server registers it and boots
    it into the agent with a token on the kernel command line."""
    host, _, port = http_address.rpartition(":")

    def fetch(i: int) -> Agent:
        mac = _mac(first + i)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("GET", f"/boot.ipxe?mac={mac}")
        script = conn.getresponse().read().decode()
        conn.close()
        kernel = next(ln for ln in script.splitlines() if ln.startswith("kernel "))
        args = dict(w.split("=", 1) for w in kernel.split() if "=" in w)
        return Agent(args["bmi.node"], args["bmi.token"], mac)

    with ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(fetch, range(count)))


def stack_env() -> dict[str, str]:
    return {"BMI_DISCOVERY_MODE": "inventory", "BMI_AGENT_IMAGE_DIR": str(AGENT_IMAGE)}


def run(results: Results) -> None:
    bare, bare_address = _bare_server()
    with DevStack(extra_env=stack_env()) as stack:
        warm = discover(stack.http_address, 50, first=AGENTS)
        agents = discover(stack.http_address, AGENTS)
        storm(bare_address, [Agent("n", "t", "m")] * 50)  # warm up both
        storm(stack.address, warm)
        (bare_rate, bare_lat, _), bare_cpu = with_cpu(
            bare.pid, lambda: storm(bare_address, agents))
        (rate, lat, errors), cpu = with_cpu(stack.server.pid, lambda: storm(stack.address, agents))
        again_rate, again_lat, again_errors = storm(stack.address, agents)
    bare.terminate()
    bare.wait(10)
    results.add(Figure("agent storm", "first registration: server CPU per agent",
                       cpu / AGENTS * 1000, "ms", bare_cpu / AGENTS * 1000, "bare grpcio server",
                       note="the whole server process: gRPC, interceptors, core, SQL"))
    for label, r, latency, err in (("first registration", rate, lat, errors),
                                   ("registering again", again_rate, again_lat, again_errors)):
        results.add(Figure("agent storm", f"{AGENTS} agents, {label}: Register + GetBootPlan "
                           "per second", r, "agents/s", bare_rate, "bare grpcio server",
                           ">= 0.5x", r >= 0.5 * bare_rate))
        p99 = percentile(latency, 99) * 1000
        results.add(Figure("agent storm", f"{label}: p50 latency",
                           percentile(latency, 50) * 1000, "ms",
                           percentile(bare_lat, 50) * 1000, "bare grpcio server"))
        results.add(Figure("agent storm", f"{label}: p99 latency", p99, "ms",
                           percentile(bare_lat, 99) * 1000, "bare grpcio server", "<= 100 ms",
                           p99 <= 100))
        results.add(Figure("agent storm", f"{label}: errors", err, "", goal="0", ok=err == 0))
