"""Admission control: long-lived streams never take the capacity unary calls need, and
a server past its capacity says so at once instead of letting calls time out.

Two budgets, decided in grpcio's polling thread before a call gets a thread:

- **Unary calls** (everything with one response that is not an upload): at most
  ``workers`` run at once, on a lane of their own (``rpc_executor.py``); up to
  ``max_queued`` more wait in its queue. Past that, RESOURCE_EXHAUSTED.
- **Streams** (WatchNodes, WatchTargets, UploadImage, health Watch, reflection): at most
  ``max_streams`` open at once and ``max_streams_per_caller`` per caller (a principal, a
  gateway, or all anonymous callers together). A stream's caller is authenticated before
  it starts: only health may be watched without credentials.

A refusal is RESOURCE_EXHAUSTED with trailing metadata ``retry-after-ms``: how long to
wait before trying again. Clients retry only when it is there (a quota refusal, also
RESOURCE_EXHAUSTED, carries none), with jitter.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from ..core.errors import BmiError, ResourceExhausted, Unauthenticated
from ..core.ports import Authenticator, GatewayAuthenticator
from .auth import principal_of
from .errors import public_message, status_of
from .rpc_executor import RpcExecutor

log = logging.getLogger(__name__)

RETRY_AFTER_METADATA = "retry-after-ms"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
GATEWAY_PREFIX = "/bmi.v1.GatewayService/"
ANONYMOUS = "anonymous"
# Unary calls that may copy, convert, fetch or hash a whole volume (minutes, hours for a
# URL import): they take the streams' lane and caps, never a unary worker for that long.
LONG_RUNNING = frozenset({
    "/bmi.v1.ImageService/ImportImage",
    "/bmi.v1.ImageService/CopyImage",
    "/bmi.v1.ImageService/VerifyImage",
    "/bmi.v1.DiskService/SnapshotDisk",
})
# Retry hints: a queue drains in a fraction of a second; a stream slot frees when a
# stream ends, which takes longer.
UNARY_RETRY_MS = 200
STREAM_RETRY_MS = 2000


@dataclass(frozen=True)
class AdmissionLimits:
    workers: int = 16
    max_queued: int = 64
    max_streams: int = 256
    max_streams_per_caller: int = 32

    def __post_init__(self) -> None:
        if min(self.workers, self.max_streams, self.max_streams_per_caller) < 1:
            raise ValueError("workers, max_streams and max_streams_per_caller must be >= 1")
        if self.max_queued < 0:
            raise ValueError("max_queued must be >= 0")

    @property
    def stream_threads(self) -> int:
        """Threads of the stream lane: one per open stream, and a few for refusals."""
        return self.max_streams + 16


class _Counter:
    """A count bounded by a limit, taken and given back under a lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.value = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.value >= self.limit:
                return False
            self.value += 1
            return True

    def give(self) -> None:
        with self._lock:
            self.value -= 1


class _StreamsByCaller:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, caller: str) -> bool:
        with self._lock:
            count = self._open.get(caller, 0)
            if count >= self.limit:
                return False
            self._open[caller] = count + 1
            return True

    def give(self, caller: str) -> None:
        with self._lock:
            count = self._open.pop(caller) - 1
            if count:
                self._open[caller] = count


def _once(action: Callable[[], None]) -> Callable[[], None]:
    lock = threading.Lock()
    done = False

    def run() -> None:
        nonlocal done
        with lock:
            if done:
                return
            done = True
        action()

    return run


def _refuse(context: grpc.ServicerContext, exc: BmiError, retry_ms: int | None = None) -> None:
    if retry_ms is not None:
        context.set_trailing_metadata(((RETRY_AFTER_METADATA, str(retry_ms)),))
    context.abort(status_of(exc), public_message(exc.message))


def _refusal(message: str, retry_ms: int) -> Callable:
    def behavior(request: Any, context: grpc.ServicerContext) -> Any:
        _refuse(context, ResourceExhausted(message), retry_ms)

    return behavior


class AdmissionInterceptor(grpc.ServerInterceptor):
    def __init__(
        self,
        limits: AdmissionLimits,
        executor: RpcExecutor,
        authenticator: Authenticator,
        gateway_authenticator: GatewayAuthenticator | None = None,
        on_refused: Callable[[str], None] = lambda reason: None,
    ) -> None:
        """``executor``: the server's, which gives a call's slot back when it has run.
        ``on_refused`` is called with the reason of every refusal (a metrics counter)."""
        self.limits = limits
        self._executor = executor
        self._on_refused = on_refused
        self._authn = authenticator
        self._gateway_authn = gateway_authenticator
        self._unary = _Counter(limits.workers + limits.max_queued)
        self._streams = _Counter(limits.max_streams)
        self._callers = _StreamsByCaller(limits.max_streams_per_caller)
        self._full_logged = 0.0

    @property
    def open_streams(self) -> int:
        return self._streams.value

    @property
    def unary_in_flight(self) -> int:
        return self._unary.value

    # Runs in grpcio's polling thread, under its lock: counters only, nothing that waits.
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.request_streaming or handler.response_streaming or method in LONG_RUNNING:
            if not self._streams.take():
                self._on_refused("streams")
                self._log_full("streams", self.limits.max_streams)
                self._executor.route_next(unary=False)
                return self._replace(handler, _refusal(
                    "too many streams open on this server; try again later", STREAM_RETRY_MS))
            self._executor.route_next(unary=False, release=self._streams.give)
            return self._replace(handler, self._stream(_behavior(handler), method,
                                                       handler.response_streaming))
        if not self._unary.take():
            self._on_refused("queue")
            self._log_full("unary calls", self.limits.workers + self.limits.max_queued)
            self._executor.route_next(unary=False)  # not behind the queue it found full
            return self._replace(handler, _refusal(
                "the server is busy; try again later", UNARY_RETRY_MS))
        self._executor.route_next(unary=True, release=self._unary.give)
        return handler

    @staticmethod
    def _replace(handler: grpc.RpcMethodHandler, behavior: Callable) -> grpc.RpcMethodHandler:
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            if getattr(handler, kind):
                return handler._replace(**{kind: behavior})
        return handler

    def _log_full(self, what: str, limit: int) -> None:
        now = time.monotonic()
        if now - self._full_logged >= 60:  # a storm must not flood the log
            self._full_logged = now
            log.warning("gRPC admission: %d %s in flight; refusing more with "
                        "RESOURCE_EXHAUSTED", limit, what)

    def _stream(self, behavior: Callable, method: str, response_streaming: bool) -> Callable:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            # The stream's own slot is the executor's to give back; this is the caller's.
            try:
                caller = self._caller(method, context)
            except BmiError as exc:
                _refuse(context, exc)
            if not self._callers.take(caller):
                self._on_refused("caller")
                _refuse(context, ResourceExhausted(
                    f"at most {self.limits.max_streams_per_caller} streams open per caller"),
                    STREAM_RETRY_MS)
            release = _once(lambda: self._callers.give(caller))
            if not response_streaming:  # an upload or a long call: ends when it returns
                try:
                    return behavior(request, context)
                finally:
                    release()
            # A response stream may be abandoned without being iterated to its end: the
            # slot is given back when the RPC ends, whichever way.
            if not context.add_callback(release):
                release()
            try:
                return _Releasing(behavior(request, context), release)
            except BaseException:
                release()
                raise

        return wrapped

    def _caller(self, method: str, context: grpc.ServicerContext) -> str:
        """Who opens this stream; Unauthenticated if anyone but a health watcher has no
        valid credentials."""
        if method.startswith(GATEWAY_PREFIX):
            if self._gateway_authn is None:
                raise Unauthenticated("no gateway credentials accepted here")
            credentials = next((v for k, v in context.invocation_metadata() or ()
                                if k == "authorization"), None)
            return "gateway:" + self._gateway_authn.authenticate(credentials)
        try:
            principal = principal_of(context, self._authn)
        except BmiError:
            if method.startswith(HEALTH_PREFIX):
                return ANONYMOUS
            raise
        return f"{'admin' if principal.is_admin else principal.project}:{principal.name}"


class _Releasing:
    """A response iterator that gives its slot back when it ends or is closed."""

    def __init__(self, responses: Iterator, release: Callable[[], None]) -> None:
        self._responses = iter(responses)
        self._release = release

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._responses)
        except BaseException:
            self._release()
            raise

    def close(self) -> None:
        self._release()
        close = getattr(self._responses, "close", None)
        if close is not None:
            close()


def _behavior(handler: grpc.RpcMethodHandler) -> Callable:
    return (handler.unary_unary or handler.unary_stream or handler.stream_unary
            or handler.stream_stream)
