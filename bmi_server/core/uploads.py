"""Images streamed in by a client: raw straight into the store, qcow2 via spool files.

A qcow2 upload is spooled, inspected (the inspector refuses anything that could read
other files or expand beyond what it holds), converted to a sparse raw spool file, and
copied into its volume. Both spool files are checked against the free space before they
are made, and the conversion and copy stop at the caller's deadline.
"""

from __future__ import annotations

from pathlib import Path

from . import deadlines, digests, image_digests, tracked, volume_metadata
from .errors import InvalidArgument
from .faults import crash_point
from .images import ImageCatalogue
from .models import Image, ImageFormatInfo, ImageKind, Principal, ResourceState, Visibility
from .ports import ImageFileInspector, ImageStore, SpoolFile, UploadSpool

MAX_UPLOAD_BYTES = 4 << 40  # 4 TiB: far above any OS image, below int64 games
FORMATS = ("raw", "qcow2")


class Upload:
    """One upload in progress. ``add`` each chunk, then ``finish``; ``abort`` on failure.

    A raw image's record and volume exist from the first chunk on (CREATING), so an
    interrupted upload is found and removed by reconcile.
    """

    def __init__(
        self,
        catalogue: ImageCatalogue,
        store: ImageStore,
        inspector: ImageFileInspector,
        image: Image,
        file_format: str,
        file_size: int,
        spool: UploadSpool,
        replayed: Image | None = None,
    ) -> None:
        self._replayed = replayed
        self._catalogue = catalogue
        self._store = store
        self._inspector = inspector
        self.image = image
        self._format = file_format
        self._expected = file_size
        self._received = 0
        self._spool = spool
        self._spool_file: SpoolFile | None = None
        self._started = False
        # A raw file is the image's content: hashed as it streams in, never read back.
        self._content_hash = digests.new_hasher()
        if file_format == "qcow2" and replayed is None:
            self._spool_file = spool.new_file(file_size, ".qcow2")

    def add(self, chunk: bytes) -> None:
        if self._replayed is not None:  # a retry of a finished upload: result is known
            return
        if self._received + len(chunk) > self._expected:
            raise InvalidArgument(f"upload is longer than the declared {self._expected} bytes")
        if self._spool_file is not None:
            self._spool_file.write(chunk)
        else:
            self._start_raw()
            self._store.write(self.image.volume, self._received, chunk)
            self._content_hash.update(chunk)
        self._received += len(chunk)

    def finish(self) -> Image:
        if self._replayed is not None:
            return self._replayed
        if self._received != self._expected:
            raise InvalidArgument(
                f"upload ended after {self._received} of the declared {self._expected} bytes"
            )
        if self._spool_file is None:
            self._start_raw()
            image_digests.record(self._store, self.image, self._content_hash.hexdigest())
            self._store.seal(self.image.volume)
            return self._mark_ready()
        self._spool_file.close()
        info = self._inspector.inspect(self._spool_file.path, self._format)
        self.image.size_bytes = info.virtual_size_bytes
        self._start(info.virtual_size_bytes)  # the record first: quotas are checked here
        copy_in_qcow2(self._store, self._inspector, self._spool, self._spool_file.path,
                      info, self.image.volume)
        # Its content digest is taken once it is ready (image_digests.DigestBackfill).
        self._store.seal(self.image.volume)
        image = self._mark_ready()
        self._discard_spool()
        return image

    def abort(self) -> None:
        self._discard_spool()
        if self._started:
            tracked.undo_create(self._catalogue.ops, self._store, self.image)

    def _start_raw(self) -> None:
        if not self._started:
            self._start(self._expected)

    def _start(self, size: int) -> None:
        self._catalogue.ops.add(self.image)  # CREATING: the intent reconcile will find
        self._started = True
        crash_point("image.upload.after_record")
        self._store.create(self.image.volume, size, volume_metadata.for_image(self.image))

    def _mark_ready(self) -> Image:
        crash_point("image.upload.before_ready")
        self.image.state = ResourceState.READY
        self._catalogue.ops.update(self.image)
        return self.image

    def _discard_spool(self) -> None:
        if self._spool_file is not None:
            self._spool_file.discard()


def copy_in_qcow2(
    store: ImageStore,
    inspector: ImageFileInspector,
    spool: UploadSpool,
    qcow2: Path,
    info: ImageFormatInfo,
    volume: str,
) -> None:
    """The content of a qcow2 file the inspector checked (``info``) into ``volume``
    (made, empty): converted in the sandbox to a sparse raw spool file, which is copied
    in and discarded. Uploads and URL imports alike."""
    raw = spool.new_file(info.data_bytes_bound, ".raw")
    try:
        inspector.convert_to_raw(qcow2, raw.path, timeout=deadlines.remaining())
        store.import_raw_file(volume, raw.path)
    finally:
        raw.discard()


def begin_upload(
    catalogue: ImageCatalogue,
    store: ImageStore,
    inspector: ImageFileInspector,
    principal: Principal,
    *,
    name: str,
    project: str,
    file_format: str,
    file_size: int,
    visibility: Visibility,
    spool: UploadSpool,
    max_virtual_bytes: int,
    request_id: str = "",
) -> Upload:
    """Validate the header of an upload before a single byte is stored."""
    if earlier := catalogue.replay(principal, request_id, name):
        return Upload(
            catalogue, store, inspector, earlier, file_format, 0, spool, replayed=earlier
        )
    if file_format not in FORMATS:
        raise InvalidArgument(f"format must be one of {', '.join(FORMATS)}")
    if file_size <= 0:
        raise InvalidArgument("file_size_bytes must be positive")
    if file_size > MAX_UPLOAD_BYTES:
        raise InvalidArgument(f"file_size_bytes is larger than {MAX_UPLOAD_BYTES} bytes")
    if file_format == "raw" and file_size % 512:
        raise InvalidArgument("a raw image's size must be a multiple of 512 bytes")
    if file_format == "raw" and file_size > max_virtual_bytes:
        raise InvalidArgument(
            f"the image's size ({file_size} bytes) is above this server's limit "
            f"({max_virtual_bytes} bytes)"
        )
    image = catalogue.new_image(
        principal,
        name=name,
        project=project,
        kind=ImageKind.GOLDEN,
        visibility=visibility,
        size_bytes=file_size,
        source=f"upload ({file_format})",
        request_id=request_id,
    )
    # Refused before a byte is spooled or stored if the project is out of room (a qcow2
    # file's virtual size is known only once inspected; its record checks it then).
    catalogue.quotas.check(
        image.project, add_bytes=file_size if file_format == "raw" else 0, add_images=1
    )
    return Upload(catalogue, store, inspector, image, file_format, file_size, spool)
