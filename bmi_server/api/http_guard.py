"""What keeps the HTTP boot endpoint's connections from holding the server: timeouts on
every read and write, a cap on open connections, and refusal of requests whose framing
two HTTP parsers could read differently (request smuggling through a proxy in front)."""

from __future__ import annotations

import io
import logging
import socket
import time
from dataclasses import dataclass
from email.message import Message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpLimits:
    """``idle_seconds``: how long a connection may wait for the first byte of a request
    (the first one, or the next one on a kept-alive connection). ``read_seconds``: how long
    a request's line and headers may take from their first byte, and each response write.
    ``max_connections``: open connections (each has a thread); more are answered 503 by
    the accepting thread and closed."""

    idle_seconds: float = 5.0
    read_seconds: float = 10.0
    max_connections: int = 128

    def __post_init__(self) -> None:
        if self.idle_seconds <= 0 or self.read_seconds <= 0 or self.max_connections < 1:
            raise ValueError("HTTP timeouts must be positive and max_connections at least 1")


# Sent by the accepting thread, without reading the request: it must fit a socket buffer.
CONNECTIONS_FULL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nCache-Control: no-store\r\n"
    b"Content-Length: 37\r\n\r\n#!ipxe\necho too many connections\nexit\n"
)


def framing_problem(headers: Message) -> str | None:
    """Why a request's framing is refused, or None. Only GET is served and a GET has no body,
    so any sign of one (or two ways to measure it) is refused rather than guessed at."""
    if headers.get_all("Transfer-Encoding"):
        return "Transfer-Encoding on a request without a body"
    lengths = headers.get_all("Content-Length") or []
    if len(lengths) > 1:
        return "more than one Content-Length"
    if lengths:
        value = lengths[0].strip()
        if not value.isdigit() or not value.isascii():
            return "malformed Content-Length"
        if int(value) != 0:
            return "a request body (only GET without one is served)"
    return None


class DeadlineReader(io.RawIOBase):
    """A socket's reading side where each request has a deadline, not each recv: a
    client sending a byte every few seconds still runs out of time.

    ``expect_request`` starts the idle wait; the first byte that arrives starts the
    request's own ``read_seconds``."""

    def __init__(self, sock: socket.socket, limits: HttpLimits) -> None:
        super().__init__()
        self._sock = sock
        self._limits = limits
        self._idle = True
        self._deadline = time.monotonic() + limits.idle_seconds

    def expect_request(self) -> None:
        self._idle = True
        self._deadline = time.monotonic() + self._limits.idle_seconds

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not received in time")
        self._sock.settimeout(left)
        count = self._sock.recv_into(buffer)
        if self._idle and count:
            self._idle = False
            self._deadline = time.monotonic() + self._limits.read_seconds
        return count


def refuse_connection(sock: socket.socket) -> None:
    """Answer 503 and close, from the accepting thread: never blocks."""
    try:
        sock.setblocking(False)
        sock.send(CONNECTIONS_FULL)
        sock.shutdown(socket.SHUT_WR)
        # Whatever of the request arrived already is dropped, so the close is a FIN
        # rather than a reset that could discard the answer in flight.
        sock.recv(65536)
    except OSError:
        pass
    finally:
        sock.close()


def is_disconnect(exc: BaseException | None) -> bool:
    """A client that went away (reset, closed early, timed out): not a server fault."""
    return isinstance(exc, (ConnectionError, TimeoutError))
