"""Reads a caller's credentials from gRPC metadata."""

from __future__ import annotations

import grpc

from ..core.models import Principal
from ..core.ports import Authenticator

# Metadata naming the project a caller acts in (HIL users may belong to several).
PROJECT_METADATA = "bmi-project"


def principal_of(context: grpc.ServicerContext, authenticator: Authenticator) -> Principal:
    credentials = None
    project = ""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and credentials is None:
            credentials = value
        elif key == PROJECT_METADATA and not project:
            project = value.strip()
    return authenticator.authenticate(credentials, project)
