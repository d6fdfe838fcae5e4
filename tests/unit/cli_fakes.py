"""In-memory ImageService/DiskService fakes for CLI tests: record requests, check auth."""

from __future__ import annotations

from collections import defaultdict

import grpc
from bmi.v1 import disks_pb2, disks_pb2_grpc, images_pb2, images_pb2_grpc

TOKEN = "s3cret"
MiB = 1024 * 1024


def _image(n: int, name: str, **kw: object) -> images_pb2.Image:
    img = images_pb2.Image(
        id=f"img-{n:016x}",
        name=name,
        project=kw.pop("project", "proj-a"),
        visibility=kw.pop("visibility", images_pb2.VISIBILITY_PRIVATE),
        kind=kw.pop("kind", images_pb2.IMAGE_KIND_GOLDEN),
        state=images_pb2.RESOURCE_STATE_READY,
        size_bytes=kw.pop("size_bytes", 64 * MiB),
        **kw,
    )
    img.create_time.FromSeconds(1_700_000_000)
    return img


class _Recording:
    """Shared behaviour: auth check, request log, scripted failures per method."""

    def __init__(self) -> None:
        self.requests: dict[str, list[object]] = defaultdict(list)
        self.tokens: list[str] = []
        # method name -> status codes to fail with, consumed one per call
        self.fail: dict[str, list[grpc.StatusCode]] = defaultdict(list)

    def _enter(self, method: str, request: object, context: grpc.ServicerContext) -> None:
        auth = dict(context.invocation_metadata()).get("authorization", "")
        self.tokens.append(auth)
        self.requests[method].append(request)
        if auth != f"Bearer {TOKEN}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")
        if self.fail[method]:
            context.abort(self.fail[method].pop(0), f"{method} failed on purpose")


class FakeImages(_Recording, images_pb2_grpc.ImageServiceServicer):
    def __init__(self) -> None:
        super().__init__()
        self.images = [
            _image(1, "ubuntu-22.04", visibility=images_pb2.VISIBILITY_PUBLIC),
            _image(2, "centos-9", size_bytes=3 * 1024 * MiB),
            _image(3, "snap-1", kind=images_pb2.IMAGE_KIND_SNAPSHOT, source="dsk-1"),
        ]
        self.page_size = 2  # small, so `ls` has to follow next_page_token
        self.uploads: list[list[images_pb2.UploadImageRequest]] = []

    def _find(self, ref: str, context: grpc.ServicerContext) -> images_pb2.Image:
        for img in self.images:
            if ref in (img.id, img.name):
                return img
        context.abort(grpc.StatusCode.NOT_FOUND, f'image "{ref}" not found')
        raise AssertionError

    def ListImages(self, request, context):
        self._enter("ListImages", request, context)
        matching = [i for i in self.images if not request.project or i.project == request.project]
        start = int(request.page_token or 0)
        end = start + self.page_size
        token = str(end) if end < len(matching) else ""
        return images_pb2.ListImagesResponse(images=matching[start:end], next_page_token=token)

    def GetImage(self, request, context):
        self._enter("GetImage", request, context)
        return self._find(request.image, context)

    def ImportImage(self, request, context):
        self._enter("ImportImage", request, context)
        return _image(10, request.name, project=request.project or "proj-a")

    def VerifyImage(self, request, context):
        self._enter("VerifyImage", request, context)
        matches = getattr(self, "verify_matches", True)
        return images_pb2.VerifyImageResponse(
            image_id="img-0000000000000010", recorded_sha256="a" * 64,
            computed_sha256="a" * 64 if matches else "b" * 64, matches=matches,
            detail="" if matches else "changed")

    def UploadImage(self, request_iterator, context):
        messages = list(request_iterator)
        self.uploads.append(messages)
        self._enter("UploadImage", messages[0] if messages else None, context)
        header = messages[0].header
        size = sum(len(m.chunk) for m in messages[1:])
        return _image(11, header.name, size_bytes=size, visibility=header.visibility)

    def CopyImage(self, request, context):
        self._enter("CopyImage", request, context)
        src = self._find(request.image, context)
        return _image(
            12,
            request.name or src.name,
            project=request.project,
            kind=images_pb2.IMAGE_KIND_COPY,
            source=src.id,
        )

    def UpdateImage(self, request, context):
        self._enter("UpdateImage", request, context)
        img = images_pb2.Image()
        img.CopyFrom(self._find(request.image, context))
        if request.name:
            img.name = request.name
        if request.visibility:
            img.visibility = request.visibility
        return img

    def DeleteImage(self, request, context):
        self._enter("DeleteImage", request, context)
        self._find(request.image, context)
        return images_pb2.DeleteImageResponse()


class FakeDisks(_Recording, disks_pb2_grpc.DiskServiceServicer):
    def __init__(self) -> None:
        super().__init__()
        disk = disks_pb2.Disk(
            id="dsk-00000000000000a1",
            name="node-1",
            project="proj-a",
            image_id="img-0000000000000001",
            image_name="ubuntu-22.04",
            state=images_pb2.RESOURCE_STATE_READY,
            size_bytes=64 * MiB,
        )
        self.disks = [disk]

    def ListDisks(self, request, context):
        self._enter("ListDisks", request, context)
        return disks_pb2.ListDisksResponse(disks=self.disks)

    def GetDisk(self, request, context):
        self._enter("GetDisk", request, context)
        for d in self.disks:
            if request.disk in (d.id, d.name):
                out = disks_pb2.Disk()
                out.CopyFrom(d)
                out.used_bytes = 3 * MiB
                return out
        context.abort(grpc.StatusCode.NOT_FOUND, f'disk "{request.disk}" not found')

    def CreateDisk(self, request, context):
        self._enter("CreateDisk", request, context)
        return disks_pb2.Disk(
            id="dsk-00000000000000b2",
            name=request.name,
            project=request.project or "proj-a",
            image_name=request.image,
            state=images_pb2.RESOURCE_STATE_READY,
        )

    def DeleteDisk(self, request, context):
        self._enter("DeleteDisk", request, context)
        return disks_pb2.DeleteDiskResponse()

    def SnapshotDisk(self, request, context):
        self._enter("SnapshotDisk", request, context)
        return _image(13, request.image_name, kind=images_pb2.IMAGE_KIND_SNAPSHOT)
