"""bmi.v1.ImageService: translation only; the catalogue decides."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
from bmi.v1 import images_pb2, images_pb2_grpc

from ..core.errors import InvalidArgument
from ..core.image_digests import Verification
from ..core.images import ImageCatalogue
from ..core.models import Principal, Visibility
from ..core.ports import Authenticator
from ..core.uploads import Upload
from ..core.url_imports import UrlImports
from . import convert
from .auth import principal_of

MAX_CHUNK_BYTES = 4 << 20


class ImageServicer(images_pb2_grpc.ImageServiceServicer):
    def __init__(
        self,
        images: ImageCatalogue,
        begin_upload: Callable[..., Upload],
        authenticator: Authenticator,
        *,
        url_imports: UrlImports,
        verify: Callable[[Principal, str], Verification],
    ) -> None:
        self._images = images
        self._begin_upload = begin_upload
        self._authn = authenticator
        self._url_imports = url_imports
        self._verify = verify

    def _who(self, context: grpc.ServicerContext) -> Principal:
        return principal_of(context, self._authn)

    def ListImages(self, request, context):
        who = self._who(context)
        page = self._images.list(
            who, project=request.project, size=request.page_size, token=request.page_token
        )
        return images_pb2.ListImagesResponse(
            images=[convert.image_message(i, who) for i in page.items],
            next_page_token=page.next_token,
        )

    def GetImage(self, request, context):
        who = self._who(context)
        return convert.image_message(self._images.get(who, request.image), who)

    def ImportImage(self, request, context):
        who = self._who(context)
        if request.source_url:
            if request.source_rbd_image:
                raise InvalidArgument("give source_rbd_image or source_url, not both")
            image = self._url_imports.import_url(
                who,
                name=request.name,
                project=request.project,
                url=request.source_url,
                expected_digest=request.expected_digest,
                file_format=convert.format_of(request.format) if request.format else None,
                visibility=convert.visibility_of(request.visibility, default=Visibility.PRIVATE),
                request_id=request.request_id,
            )
            return convert.image_message(image, who)
        if request.expected_digest or request.format:
            raise InvalidArgument("expected_digest and format go with source_url only")
        image = self._images.import_volume(
            who,
            name=request.name,
            project=request.project,
            source_volume=request.source_rbd_image,
            visibility=convert.visibility_of(request.visibility, default=Visibility.PRIVATE),
            request_id=request.request_id,
        )
        return convert.image_message(image, who)

    def UploadImage(self, request_iterator: Iterator[images_pb2.UploadImageRequest], context):
        who = self._who(context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("the first message of an upload must be its header")
        header = first.header
        upload = self._begin_upload(
            who,
            name=header.name,
            project=header.project,
            file_format=convert.format_of(header.format),
            file_size=header.file_size_bytes,
            visibility=convert.visibility_of(header.visibility, default=Visibility.PRIVATE),
            request_id=header.request_id,
        )
        try:
            for message in request_iterator:
                if message.WhichOneof("part") != "chunk":
                    raise InvalidArgument("only the first message of an upload may be a header")
                if len(message.chunk) > MAX_CHUNK_BYTES:
                    raise InvalidArgument(f"chunks may be at most {MAX_CHUNK_BYTES} bytes")
                upload.add(message.chunk)
            image = upload.finish()
        except BaseException:
            upload.abort()
            raise
        return convert.image_message(image, who)

    def CopyImage(self, request, context):
        who = self._who(context)
        image = self._images.copy(
            who,
            request.image,
            project=request.project,
            name=request.name,
            request_id=request.request_id,
        )
        return convert.image_message(image, who)

    def UpdateImage(self, request, context):
        who = self._who(context)
        image = self._images.update(
            who,
            request.image,
            name=request.name,
            visibility=convert.visibility_of(request.visibility, default=None),
            request_id=request.request_id,
        )
        return convert.image_message(image, who)

    def VerifyImage(self, request, context):
        return convert.verification_message(self._verify(self._who(context), request.image))

    def DeleteImage(self, request, context):
        self._images.delete(self._who(context), request.image, request_id=request.request_id)
        return images_pb2.DeleteImageResponse()
