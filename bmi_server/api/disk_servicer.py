"""bmi.v1.DiskService: translation only; the disk service decides."""

from __future__ import annotations

import grpc
from bmi.v1 import disks_pb2, disks_pb2_grpc

from ..core.disks import DiskService
from ..core.models import Principal
from ..core.ports import Authenticator
from . import convert
from .auth import principal_of


class DiskServicer(disks_pb2_grpc.DiskServiceServicer):
    def __init__(self, disks: DiskService, authenticator: Authenticator) -> None:
        self._disks = disks
        self._authn = authenticator

    def _who(self, context: grpc.ServicerContext) -> Principal:
        return principal_of(context, self._authn)

    def ListDisks(self, request, context):
        who = self._who(context)
        page = self._disks.list(
            who,
            project=request.project,
            image=request.image,
            size=request.page_size,
            token=request.page_token,
        )
        return disks_pb2.ListDisksResponse(
            disks=[convert.disk_message(d, who) for d in page.items],
            next_page_token=page.next_token,
        )

    def GetDisk(self, request, context):
        who = self._who(context)
        disk = self._disks.get(who, request.disk)
        return convert.disk_message(disk, who, used_bytes=self._disks.used_bytes(disk))

    def CreateDisk(self, request, context):
        who = self._who(context)
        disk = self._disks.create(
            who,
            name=request.name,
            image=request.image,
            project=request.project,
            request_id=request.request_id,
        )
        return convert.disk_message(disk, who)

    def DeleteDisk(self, request, context):
        self._disks.delete(self._who(context), request.disk, request_id=request.request_id)
        return disks_pb2.DeleteDiskResponse()

    def SnapshotDisk(self, request, context):
        who = self._who(context)
        image = self._disks.snapshot(
            who, request.disk, image_name=request.image_name, request_id=request.request_id
        )
        return convert.image_message(image, who)
