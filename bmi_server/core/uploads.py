"""Images streamed in by a client: raw straight into the store, qcow2 via a spool file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from . import tracked, volume_metadata
from .errors import InvalidArgument
from .faults import crash_point
from .images import ImageCatalogue
from .models import Image, ImageKind, Principal, ResourceState, Visibility
from .ports import ImageFileInspector, ImageStore

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
        spool_dir: Path,
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
        self._spool: Path | None = None
        self._spool_file = None
        self._started = False
        if file_format == "qcow2" and replayed is None:
            fd, name = tempfile.mkstemp(prefix="bmi-upload-", suffix=".qcow2", dir=spool_dir)
            self._spool = Path(name)
            self._spool_file = os.fdopen(fd, "wb")

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
            self._store.seal(self.image.volume)
            return self._mark_ready()
        self._spool_file.close()
        assert self._spool is not None
        info = self._inspector.inspect(self._spool, self._format)
        self.image.size_bytes = info.virtual_size_bytes
        self._start(info.virtual_size_bytes)
        self._store.import_file(self.image.volume, self._spool, self._format)
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
        if self._spool_file is not None and not self._spool_file.closed:
            self._spool_file.close()
        if self._spool is not None:
            self._spool.unlink(missing_ok=True)


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
    spool_dir: Path,
    request_id: str = "",
) -> Upload:
    """Validate the header of an upload before a single byte is stored."""
    if earlier := catalogue.replay(principal, request_id, name):
        return Upload(
            catalogue, store, inspector, earlier, file_format, 0, spool_dir, replayed=earlier
        )
    if file_format not in FORMATS:
        raise InvalidArgument(f"format must be one of {', '.join(FORMATS)}")
    if file_size <= 0:
        raise InvalidArgument("file_size_bytes must be positive")
    if file_size > MAX_UPLOAD_BYTES:
        raise InvalidArgument(f"file_size_bytes is larger than {MAX_UPLOAD_BYTES} bytes")
    if file_format == "raw" and file_size % 512:
        raise InvalidArgument("a raw image's size must be a multiple of 512 bytes")
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
    return Upload(catalogue, store, inspector, image, file_format, file_size, spool_dir)
