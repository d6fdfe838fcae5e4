"""Images fetched by the server from a URL, checked against the digest the caller expects.

The record is written (CREATING) as soon as the file's first bytes say what it is, so
quotas are settled before the bulk of the download and its progress (bytes fetched) is
visible in the record. A raw file streams straight into its volume while it is hashed;
a qcow2 file is spooled, and once its digest is checked it goes through exactly the
pipeline of an uploaded qcow2 (inspected, converted in the sandbox, copied in). The
image turns READY only after the digest matched; any failure removes the volume and the
record. A server stopped mid-download leaves a CREATING record that reconcile rolls back
at the next start (a download is never resumed: a retry fetches the file again).
"""

from __future__ import annotations

import itertools
import logging
import struct
import time
from collections.abc import Iterator

from . import deadlines, digests, image_digests, tracked, volume_metadata
from .errors import FailedPrecondition, InvalidArgument, Unavailable
from .faults import crash_point
from .images import ImageCatalogue, first_or_replayed
from .models import Image, ImageKind, Principal, ResourceState, Visibility
from .ports import Download, ImageFileInspector, ImageStore, SpoolFile, UploadSpool, UrlFetcher
from .uploads import FORMATS, copy_in_qcow2
from .urls import redact

log = logging.getLogger(__name__)

QCOW2_MAGIC = b"QFI\xfb"
_HEAD_BYTES = 512  # enough for the qcow2 signature and its virtual size
_PIECE = 4 << 20  # raw data is written in object-sized pieces, all-zero ones skipped
PROGRESS_SECONDS = 1.0  # how often the record's bytes-fetched count is written
OFF = (
    "importing from a URL is off on this server (an operator enables it for chosen "
    "hosts with the setting url_import_allowed_hosts)"
)


class UrlImports:
    def __init__(
        self,
        catalogue: ImageCatalogue,
        store: ImageStore,
        inspector: ImageFileInspector,
        spool: UploadSpool,
        fetcher: UrlFetcher | None,
        *,
        max_virtual_bytes: int,
        max_file_bytes: int,
        timeout: float | None = None,
    ) -> None:
        """``fetcher`` None: URL import is off. ``max_file_bytes``: the largest file
        fetched (a qcow2 file may be larger than its virtual size says nothing of);
        ``timeout``: the longest one import may take, the caller's deadline aside."""
        self._catalogue = catalogue
        self._store = store
        self._inspector = inspector
        self._spool = spool
        self._fetcher = fetcher
        self._max_virtual = max_virtual_bytes
        self._max_file = max_file_bytes
        self._timeout = timeout

    def import_url(
        self,
        principal: Principal,
        *,
        name: str,
        project: str,
        url: str,
        expected_digest: str,
        file_format: str | None,
        visibility: Visibility,
        request_id: str = "",
    ) -> Image:
        return first_or_replayed(
            lambda: self._import(principal, name, project, url, expected_digest,
                                 file_format, visibility, request_id),
            lambda: self._catalogue.replay(principal, request_id, name),
        )

    def _import(
        self,
        principal: Principal,
        name: str,
        project: str,
        url: str,
        expected_digest: str,
        file_format: str | None,
        visibility: Visibility,
        request_id: str,
    ) -> Image:
        if earlier := self._catalogue.replay(principal, request_id, name):
            return earlier
        if self._fetcher is None:
            raise FailedPrecondition(OFF)
        shown = redact(url)
        if not expected_digest:
            raise InvalidArgument("expected_digest is required with source_url")
        expected = digests.parse(expected_digest)
        if file_format is not None and file_format not in FORMATS:
            raise InvalidArgument(f"format must be one of {', '.join(FORMATS)}")
        image = self._catalogue.new_image(
            principal, name=name, project=project, kind=ImageKind.GOLDEN,
            visibility=visibility, source=shown, request_id=request_id,
        )
        self._catalogue.quotas.check(image.project, add_images=1)  # before any fetch
        with deadlines.scope(self._timeout):
            download = self._fetcher.open(url)
            try:
                return _Fetch(self, image, download, expected, file_format).run()
            finally:
                download.close()


class _Fetch:
    """One import from its first byte to READY (or to nothing)."""

    def __init__(
        self,
        imports: UrlImports,
        image: Image,
        download: Download,
        expected: digests.Digest,
        file_format: str | None,
    ) -> None:
        self._x = imports
        self.image = image
        self._download = download
        self._expected = expected
        self._format = file_format
        self._started = False
        self._spooled: SpoolFile | None = None  # qcow2: the file, until it is copied in
        self._pending = bytearray()  # raw: bytes not yet written (less than a piece)
        self._written = 0  # raw: offset of ``_pending`` in the volume
        self._last_progress = 0.0

    @property
    def _ops(self):
        return self._x._catalogue.ops

    def run(self) -> Image:
        try:
            return self._run()
        except BaseException:
            if self._started:
                with deadlines.unbounded():  # the rollback must finish all the same
                    tracked.undo_create(self._ops, self._x._store, self.image)
            raise
        finally:
            if self._spooled is not None:
                self._spooled.discard()

    def _run(self) -> Image:
        chunks = self._download.chunks()
        head, chunks = _head(chunks)
        total = self._download.total_bytes
        fmt = self._format or ("qcow2" if head.startswith(QCOW2_MAGIC) else "raw")
        if total is not None and total > self._x._max_file:
            raise InvalidArgument(
                f"the file ({total} bytes) is larger than this server's limit for URL "
                f"imports ({self._x._max_file} bytes)"
            )
        size = self._raw_size(total) if fmt == "raw" else self._qcow2_size(head)
        self.image.size_bytes = size
        self.image.fetch_total_bytes = total or 0
        self._ops.add(self.image)  # CREATING, quota admitted: the intent reconcile finds
        self._started = True
        crash_point("image.url.after_record")
        store, volume = self._x._store, self.image.volume
        if fmt == "raw":
            store.create(volume, size, volume_metadata.for_image(self.image))
            spool = None
        else:
            spool = self._spooled = self._x._spool.new_file(total or self._x._max_file, ".qcow2")
        file_hash = self._expected.hasher()
        content_hash = None  # a raw file is the content: its SHA-256 is the content's
        if fmt == "raw":
            same = self._expected.algorithm == digests.CONTENT_ALGORITHM
            content_hash = file_hash if same else digests.new_hasher()
        fetched = 0
        for chunk in itertools.chain([head], chunks):
            fetched += len(chunk)
            if fetched > (total if total is not None else self._x._max_file):
                raise Unavailable(
                    "the download is longer than the web server announced or than this "
                    "server's limit; nothing was kept"
                )
            file_hash.update(chunk)
            if spool is not None:
                spool.write(chunk)
            else:
                if content_hash is not file_hash:
                    content_hash.update(chunk)
                self._write_raw(chunk)
            self._progress(fetched)
        if total is not None and fetched != total:
            raise Unavailable(
                f"the download broke off after {fetched} of {total} bytes; nothing was kept"
            )
        self._flush_raw(final=True)
        got = file_hash.hexdigest()
        if got != self._expected.hex:
            raise InvalidArgument(
                f"digest mismatch: expected {self._expected}, the file fetched has "
                f"{self._expected.algorithm}:{got}; nothing was kept"
            )
        self.image.file_digest = str(self._expected)
        self._ops.update(self.image)  # the record says what was checked from now on
        if spool is not None:
            self._convert(spool, size)
        image_digests.record(
            store, self.image, content_hash.hexdigest() if content_hash else None
        )
        store.set_metadata(volume, {volume_metadata.FILE_DIGEST: self.image.file_digest})
        store.seal(volume)
        crash_point("image.url.before_ready")
        self.image.state = ResourceState.READY
        self.image.fetched_bytes = self.image.fetch_total_bytes = 0
        self._ops.update(self.image)
        log.info("imported image %s (%d bytes) from %s", self.image.id, fetched,
                 self.image.source)
        return self.image

    def _raw_size(self, total: int | None) -> int:
        if total is None:
            raise FailedPrecondition(
                "the web server did not announce the file's length (Content-Length), "
                "which a raw import needs"
            )
        if total <= 0 or total % 512:
            raise InvalidArgument(
                f"a raw image's size must be a positive multiple of 512 bytes, not {total}"
            )
        return self._check_virtual(total)

    def _qcow2_size(self, head: bytes) -> int:
        """The virtual size the header declares, for the record and its quota; the
        inspector checks the whole file before anything is converted."""
        if len(head) < 32 or not head.startswith(QCOW2_MAGIC):
            raise InvalidArgument("not a qcow2 image (the file lacks the qcow2 signature)")
        (size,) = struct.unpack_from(">Q", head, 24)
        if size <= 0:
            raise InvalidArgument("the qcow2 image has no virtual size")
        return self._check_virtual(size)

    def _check_virtual(self, size: int) -> int:
        if size > self._x._max_virtual:
            raise InvalidArgument(
                f"the image's virtual size ({size} bytes) is above this server's limit "
                f"({self._x._max_virtual} bytes)"
            )
        return size

    def _convert(self, spool: SpoolFile, size: int) -> None:
        """As for an uploaded qcow2 file (core/uploads.py): inspect, convert, copy in."""
        x = self._x
        spool.close()
        info = x._inspector.inspect(spool.path, "qcow2")
        if info.virtual_size_bytes != size:
            raise InvalidArgument("the qcow2 image's virtual size is inconsistent")
        x._store.create(self.image.volume, size, volume_metadata.for_image(self.image))
        copy_in_qcow2(x._store, x._inspector, x._spool, spool.path, info, self.image.volume)

    def _write_raw(self, chunk: bytes) -> None:
        self._pending += chunk
        if len(self._pending) >= _PIECE:
            self._flush_raw(final=False)

    def _flush_raw(self, *, final: bool) -> None:
        """Write whole pieces (all of it when ``final``); all-zero pieces stay holes (the
        volume is fresh)."""
        done = 0
        while len(self._pending) - done >= _PIECE or (final and done < len(self._pending)):
            piece = bytes(self._pending[done : done + _PIECE])
            if piece.count(0) != len(piece):
                self._x._store.write(self.image.volume, self._written, piece)
            self._written += len(piece)
            done += len(piece)
        del self._pending[:done]

    def _progress(self, fetched: int) -> None:
        self.image.fetched_bytes = fetched
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_SECONDS:
            self._last_progress = now
            self._ops.update(self.image)


def _head(chunks: Iterator[bytes]) -> tuple[bytes, Iterator[bytes]]:
    """The first bytes of the file (at least ``_HEAD_BYTES`` unless it is shorter), and
    the rest of the chunks."""
    head = bytearray()
    for chunk in chunks:
        head += chunk
        if len(head) >= _HEAD_BYTES:
            break
    return bytes(head), chunks
