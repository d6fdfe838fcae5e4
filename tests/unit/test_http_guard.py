"""The HTTP boot endpoint's connections: timeouts, the connection cap, reset clients
and ambiguous framing."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time

import pytest

from bmi_server.api.http_boot import BootHttpServer
from bmi_server.api.http_guard import HttpLimits

GET = b"GET /boot.ipxe?mac=52:54:00:00:00:09 HTTP/1.1\r\nHost: x\r\n"


@pytest.fixture
def serve(core):
    servers = []

    def start(**limits) -> tuple[str, int]:
        server = BootHttpServer(("127.0.0.1", 0), core.planner, None,
                                http_limits=HttpLimits(**limits))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def _exchange(address, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


@pytest.mark.parametrize("headers", [
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 0\r\nContent-Length: 0\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: -1\r\n",
    b"Content-Length: \xd9\xa3\r\n",
])
def test_ambiguous_framing_is_refused_and_the_connection_closed(serve, headers, core):
    server = serve()
    # A second request behind the first must not be read as one.
    reply = _exchange(server.server_address, GET + headers + b"\r\nhello" + GET + b"\r\n")
    assert _status(reply) == 400
    assert reply.count(b"HTTP/1.1") == 1
    assert b"Connection: close" in reply
    assert core.state.all_nodes() == []


def test_plain_get_and_content_length_zero_are_served(serve):
    server = serve()
    request = GET + b"Content-Length: 0\r\nConnection: close\r\n\r\n"
    reply = _exchange(server.server_address, request)
    assert _status(reply) == 200


def test_a_slow_request_head_times_out_as_a_whole(serve):
    server = serve(idle_seconds=0.5, read_seconds=0.6)
    with socket.create_connection(server.server_address, timeout=5) as sock:
        start = time.monotonic()
        # One byte every 0.2 s: each recv is quick, the head never completes.
        for byte in GET[:20]:
            try:
                sock.send(bytes([byte]))
            except OSError:
                break
            time.sleep(0.2)
            if sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b"":
                break
        assert sock.recv(100) == b""  # closed by the server
        assert time.monotonic() - start < 3
    assert _wait(lambda: server.open_connections == 0)


def test_idle_connections_are_closed(serve):
    server = serve(idle_seconds=0.3)
    socks = [socket.create_connection(server.server_address, timeout=5) for _ in range(5)]
    for sock in socks:
        assert sock.recv(10) == b""
        sock.close()
    assert _wait(lambda: server.open_connections == 0)


def test_over_the_cap_is_503_without_a_thread(serve):
    server = serve(max_connections=3, idle_seconds=30)
    held = [socket.create_connection(server.server_address, timeout=5) for _ in range(3)]
    assert _wait(lambda: server.open_connections == 3)
    threads = threading.active_count()
    reply = _exchange(server.server_address, GET + b"\r\n")
    assert _status(reply) == 503 and b"Retry-After: 1" in reply
    assert threading.active_count() == threads
    for sock in held:
        sock.close()
    assert _wait(lambda: server.open_connections == 0)
    assert _status(_exchange(server.server_address, GET + b"Connection: close\r\n\r\n")) == 200


def test_a_reset_connection_logs_no_traceback(serve, caplog, capfd):
    server = serve()
    caplog.set_level(logging.DEBUG)
    for _ in range(20):
        sock = socket.create_connection(server.server_address, timeout=5)
        sock.sendall(GET + b"\r\n")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST, maybe before, maybe while the server writes
    assert _wait(lambda: server.open_connections == 0)
    time.sleep(0.2)
    assert "Traceback" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]


def _wait(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()
