"""Boot storm: many simulated nodes fetch their iPXE script at once over HTTP.

Baseline: a bare http.server answering a constant script, with the same client and
concurrency, in the same run. The agents' gRPC side of the storm needs the BootService.
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from bench.common import Figure, Results, percentile, scale, with_cpu
from bmi_server.devenv.stack import DevStack, free_port

NODES = scale(300, 1000)
CLIENTS = 32
SCRIPT = b"#!ipxe\necho constant\nexit\n"


def _mac(i: int) -> str:
    return "52:54:02:" + ":".join(f"{b:02x}" for b in i.to_bytes(3, "big"))


def storm(address: str, paths: list[str]) -> tuple[float, list[float], int]:
    """(requests per second, latencies, errors) for every path fetched once."""
    host, _, port = address.rpartition(":")
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()

    def fetch(path: str) -> None:
        nonlocal errors
        t0 = time.perf_counter()
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request("GET", path)
            reply = conn.getresponse()
            reply.read()
            ok = reply.status == 200
            conn.close()
        except OSError:
            ok = False
        with lock:
            latencies.append(time.perf_counter() - t0)
            errors += 0 if ok else 1

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(fetch, paths))
    return len(paths) / (time.perf_counter() - t0), latencies, errors


def _serial_hex(i: int) -> str:
    return f"SN{i:06d}".encode().hex()  # as the chain script sends it


BARE_SERVER = f"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
SCRIPT = {SCRIPT!r}
class Constant(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(SCRIPT)))
        self.end_headers()
        self.wfile.write(SCRIPT)
    def log_message(self, *args):
        pass
class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # as BMI's boot endpoint
Server(("127.0.0.1", int(sys.argv[1])), Constant).serve_forever()
"""


def _bare_server() -> tuple[subprocess.Popen, str]:
    """In a process of its own, like bmi-server, so it does not share the client's GIL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(port)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"127.0.0.1:{port}"


def run(results: Results) -> None:
    paths = [f"/boot.ipxe?mac={_mac(i)}&serial_hex={_serial_hex(i)}" for i in range(NODES)]
    bare, bare_address = _bare_server()
    storm(bare_address, paths[:50])  # warm up
    (bare_rate, bare_lat, _), bare_cpu = with_cpu(bare.pid, lambda: storm(bare_address, paths))
    with DevStack() as stack:
        storm(stack.http_address, [f"/boot.ipxe?mac=52:54:03:00:00:{i:02x}" for i in range(50)])
        first_rate, first_lat, first_err = storm(stack.http_address, paths)  # registers them
        (again_rate, again_lat, again_err), cpu = with_cpu(  # known nodes
            stack.server.pid, lambda: storm(stack.http_address, paths))
    bare.terminate()
    bare.wait(10)
    results.add(Figure("boot storm", "known nodes: server CPU per script", cpu / NODES * 1000,
                       "ms", bare_cpu / NODES * 1000, "bare http.server",
                       note="the whole server process: HTTP, node read, script"))
    for label, rate, lat, err in (("unknown nodes register", first_rate, first_lat, first_err),
                                  ("known nodes ask again", again_rate, again_lat, again_err)):
        results.add(Figure("boot storm", f"{NODES} nodes, {label}: scripts per second", rate,
                           "req/s", bare_rate, "bare http.server", ">= 0.5x",
                           rate >= 0.5 * bare_rate))
        p99 = percentile(lat, 99) * 1000
        results.add(Figure("boot storm", f"{label}: p99 latency", p99, "ms",
                           percentile(bare_lat, 99) * 1000, "bare http.server", "<= 100 ms",
                           p99 <= 100))
        results.add(Figure("boot storm", f"{label}: errors", err, "", goal="0", ok=err == 0))
