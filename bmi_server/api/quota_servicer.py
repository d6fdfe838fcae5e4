"""bmi.v1.QuotaService: translation only; the quota book decides."""

from __future__ import annotations

import grpc
from bmi.v1 import quotas_pb2_grpc

from ..core.models import Principal
from ..core.ports import Authenticator
from ..core.quotas import QuotaBook
from . import convert
from .auth import principal_of


class QuotaServicer(quotas_pb2_grpc.QuotaServiceServicer):
    def __init__(self, quotas: QuotaBook, authenticator: Authenticator) -> None:
        self._quotas = quotas
        self._authn = authenticator

    def _who(self, context: grpc.ServicerContext) -> Principal:
        return principal_of(context, self._authn)

    def GetQuota(self, request, context):
        return convert.quota_message(self._quotas.get(self._who(context), request.project))

    def SetQuota(self, request, context):
        def given(field: str) -> int | None:
            return getattr(request, field) if request.HasField(field) else None

        quota = self._quotas.set(
            self._who(context),
            request.project,
            size_bytes=given("max_virtual_bytes"),
            images=given("max_images"),
            disks=given("max_disks"),
            reset=request.reset,
        )
        return convert.quota_message(quota)
