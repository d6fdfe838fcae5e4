"""Hands each RPC's deadline to the core (core/deadlines.py), so long copies and
conversions stop once the caller has given up instead of running on for nobody."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from ..core import deadlines


def _remaining(context: grpc.ServicerContext) -> float | None:
    left = context.time_remaining()
    # grpcio reports no deadline as None or as a huge number, depending on the version.
    return None if left is None or left > 1e8 else left


def _unary(behavior: Callable) -> Callable:
    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        with deadlines.scope(_remaining(context)):
            return behavior(request, context)

    return wrapped


def _stream(behavior: Callable) -> Callable:
    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        with deadlines.scope(_remaining(context)):
            yield from behavior(request, context)

    return wrapped


class DeadlineInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary:
            return handler._replace(unary_unary=_unary(handler.unary_unary))
        if handler.stream_unary:
            return handler._replace(stream_unary=_unary(handler.stream_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=_stream(handler.unary_stream))
        if handler.stream_stream:
            return handler._replace(stream_stream=_stream(handler.stream_stream))
        return handler
