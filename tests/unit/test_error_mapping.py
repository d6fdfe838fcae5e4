"""api/errors.py: every RPC's exceptions become one clear status: domain errors their
code, with no host path or volume name; a caller gone mid-call CANCELLED, quietly; anything
else INTERNAL with a reference to the server log, never a traceback."""

from __future__ import annotations

import logging

import grpc
import pytest

from bmi_server.api.errors import ErrorMappingInterceptor
from bmi_server.core import errors


class Aborted(Exception):
    """What grpc's context.abort raises after recording the status."""


class Context:
    def __init__(self, active: bool = True) -> None:
        self.active = active
        self.status: tuple[grpc.StatusCode, str] | None = None

    def is_active(self) -> bool:
        return self.active

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise Aborted(details)


class CallerGone(grpc.RpcError):
    """What reading the next request of a stream raises once the caller cancelled."""


class Details:
    method = "/bmi.v1.ImageService/UploadImage"


def answer(exc: Exception, *, active: bool = True, kind: str = "stream_unary"):
    """The status an RPC of ``kind`` whose behaviour raises ``exc`` ends with."""

    def unary(request, context):
        raise exc

    def streaming(request, context):
        raise exc
        yield  # a generator, as a server-streaming behaviour is

    if kind == "stream_unary":
        handler = grpc.stream_unary_rpc_method_handler(unary)
    else:
        handler = grpc.unary_stream_rpc_method_handler(streaming)
    mapped = ErrorMappingInterceptor().intercept_service(lambda _: handler, Details())
    context = Context(active)
    with pytest.raises(Aborted):
        result = getattr(mapped, kind)(iter(()), context)
        if kind == "unary_stream":
            list(result)
    assert context.status is not None
    return context.status


@pytest.mark.parametrize("kind", ["stream_unary", "unary_stream"])
def test_domain_errors_get_their_code_and_a_public_message(kind):
    code, details = answer(
        errors.NotFound("no drive bmi-cfg-0123456789abcdef in /var/lib/bmi/x"), kind=kind
    )
    assert code is grpc.StatusCode.NOT_FOUND
    assert details == "no drive cfg-0123456789abcdef in <path>"


def test_a_caller_gone_mid_stream_is_cancelled_not_an_internal_error(caplog):
    with caplog.at_level(logging.INFO, logger="bmi_server.api.errors"):
        code, details = answer(CallerGone(), active=False)
    assert (code, details) == (grpc.StatusCode.CANCELLED, "cancelled")
    assert "the caller went away" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


@pytest.mark.parametrize("exc", [CallerGone(), ValueError("boom at /srv/secret/path")])
def test_anything_else_is_internal_with_a_reference_and_no_details(exc, caplog):
    """An RpcError while the caller is still there (a call the server made failed) is the
    server's fault like any other exception."""
    with caplog.at_level(logging.INFO, logger="bmi_server.api.errors"):
        code, details = answer(exc, active=True)
    assert code is grpc.StatusCode.INTERNAL
    assert details.startswith("internal error (ref ") and "boom" not in details
    assert "/srv" not in details
    assert [r for r in caplog.records if r.exc_info]  # the operator gets the traceback
