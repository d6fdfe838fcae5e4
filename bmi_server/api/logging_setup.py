"""Logs as text or as one JSON object per line, each carrying the request id of the RPC
it belongs to (from the caller's `x-request-id` metadata, or a new one)."""

from __future__ import annotations

import contextvars
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.request_tag = f" [{record.request_id}]" if record.request_id else ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", ""):
            entry["request_id"] = record.request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(level: str, fmt: str) -> None:
    """``fmt``: "text" or "json". Times are UTC."""
    logging.Formatter.converter = time.gmtime
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class RequestIdInterceptor(grpc.ServerInterceptor):
    """Binds a request id to everything logged while an RPC runs, and returns it to the
    caller in the `x-request-id` trailing metadata so a client can quote it."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        given = dict(handler_call_details.invocation_metadata or ()).get("x-request-id", "")
        for kind in ("unary_unary", "stream_unary", "unary_stream", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior:
                streaming = kind.endswith("stream")
                return handler._replace(**{kind: _bind(behavior, given, streaming)})
        return handler


def _bind(behavior: Callable, given: str, streaming: bool) -> Callable:
    def request_id() -> str:
        # Only a short printable id from outside is trusted into the logs.
        ok = given and len(given) <= 64 and given.isprintable() and " " not in given
        return given if ok else uuid.uuid4().hex[:16]

    if streaming:
        def stream(request: Any, context: grpc.ServicerContext):
            rid = request_id()
            token = REQUEST_ID.set(rid)
            context.set_trailing_metadata((("x-request-id", rid),))
            try:
                yield from behavior(request, context)
            finally:
                REQUEST_ID.reset(token)

        return stream

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        rid = request_id()
        token = REQUEST_ID.set(rid)
        context.set_trailing_metadata((("x-request-id", rid),))
        try:
            return behavior(request, context)
        finally:
            REQUEST_ID.reset(token)

    return unary
