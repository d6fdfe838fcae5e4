"""Maps domain errors to gRPC status codes in one place, for every RPC.

Unexpected exceptions become INTERNAL with a reference the operator can find in the
log; the client never sees a traceback.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from typing import Any, NoReturn

import grpc

from ..core import errors
from .logging_setup import REQUEST_ID

log = logging.getLogger(__name__)

STATUS_OF: dict[type[errors.BmiError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_of(exc: errors.BmiError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


# Callers are told what went wrong, never where on the server: an absolute path (not a
# URL's) becomes "<path>", and a Ceph volume name becomes the resource id it derives from.
_HOST_PATH = re.compile(r"(?<![\w.:/~-])/(?:[\w.@+,=-]+/)+[\w.@+,=-]*")
_VOLUME_NAME = re.compile(r"\bbmi-(img|dsk|cfg)-([0-9a-f]{16})\b")


def public_message(message: str) -> str:
    message = _VOLUME_NAME.sub(r"\1-\2", message)
    return _HOST_PATH.sub("<path>", message)


def _fail(context: grpc.ServicerContext, exc: Exception, method: str) -> NoReturn:
    """Ends the call with the mapped status (context.abort raises; grpc sends it)."""
    if isinstance(exc, errors.BmiError):
        public = public_message(exc.message)
        if public != exc.message or isinstance(exc, errors.DeadlineExceeded):
            log.info("%s: %s", method, exc.message)  # the operator sees the whole message
        context.abort(status_of(exc), public)
    if isinstance(exc, grpc.RpcError) and not context.is_active():
        # The caller cancelled or went away mid-stream (an upload's requests end so): no
        # one is left to answer, and it is not the server's fault.
        log.info("%s: the caller went away", method)
        context.abort(grpc.StatusCode.CANCELLED, "cancelled")
    ref = REQUEST_ID.get() or uuid.uuid4().hex[:12]
    log.exception("internal error in %s (ref %s)", method, ref)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref} in the server log)")


def _aborted(context: grpc.ServicerContext) -> bool:
    # context.abort raises a bare Exception after recording the status; let it through.
    state = getattr(context, "_state", None)
    return bool(getattr(state, "aborted", False))


def _wrap_unary(behavior: Callable, method: str) -> Callable:
    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(request, context)
        except Exception as exc:
            if _aborted(context):
                raise
            _fail(context, exc, method)

    return wrapped


def _wrap_stream(behavior: Callable, method: str) -> Callable:
    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            yield from behavior(request, context)
        except Exception as exc:
            if _aborted(context):
                raise
            _fail(context, exc, method)

    return wrapped


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=_wrap_unary(handler.stream_unary, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream, method))
        if handler.stream_stream:
            return handler._replace(stream_stream=_wrap_stream(handler.stream_stream, method))
        return handler
