"""Reads a caller's credentials from gRPC metadata."""

from __future__ import annotations

import grpc

from ..core.models import Principal
from ..core.ports import Authenticator


def principal_of(context: grpc.ServicerContext, authenticator: Authenticator) -> Principal:
    credentials = None
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            credentials = value
            break
    return authenticator.authenticate(credentials)
