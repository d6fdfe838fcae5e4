"""Content digests of images: recorded as each image is made, checked on demand.

An image's content is its raw virtual disk bytes (holes as zeros): an uploaded or
fetched qcow2 file is hashed as the raw content it was converted to. SHA-256 has to see
every byte, holes too, so hashing costs time in proportion to the virtual size (about
1-2 GB/s per core: half an hour for an empty 4 TiB volume). Hence two ways in:

- Content that streams through the server (raw uploads, raw URL imports) is hashed as
  it is written, for free, and recorded before the image is sealed; a copy takes its
  source's digest.
- Everything else (qcow2 files, pool imports, snapshots, copies of images without one)
  becomes READY at once and is hashed afterwards by ``DigestBackfill``, which the server's
  digest thread runs: from the sealed snapshot, which nothing changes, so the digest is
  that of the content as made. Images made before digests existed get one the same way.

The digest is kept in the record and in the volume's metadata
(``volume_metadata.CONTENT_SHA256``), so a creation finished by reconcile, or a record
rebuilt from Ceph, keeps it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import access, volume_metadata
from .errors import BmiError
from .models import Image, Principal
from .ports import ImageStore, StateStore

log = logging.getLogger(__name__)


def record(store: ImageStore, image: Image, sha256: str | None) -> None:
    """Give ``image`` (being made, not sealed yet) the content digest the caller computed
    as it wrote the content; None leaves it to ``DigestBackfill``."""
    if not sha256:
        return
    image.content_sha256 = sha256
    store.set_metadata(image.volume, {volume_metadata.CONTENT_SHA256: sha256})


class DigestBackfill:
    """Hashes READY images that have no digest yet, oldest first. An image that cannot be
    hashed now (store unreachable, deleted meanwhile) waits before it is tried again,
    doubling from ``retry_seconds`` up to ``max_retry_seconds``, and the images behind it
    go first: a few that keep failing never hold back the rest, nor flood the log."""

    def __init__(
        self,
        state: StateStore,
        store: ImageStore,
        *,
        limit: int = 10,
        retry_seconds: float = 60,
        max_retry_seconds: float = 3600,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._state, self._store, self._limit, self._clock = state, store, limit, clock
        self._retry, self._max_retry = retry_seconds, max_retry_seconds
        self._deferred: dict[str, tuple[float, float]] = {}  # id: (not before, last wait)

    def run(self) -> int:
        """Hash up to ``limit`` images not waiting out a failure; how many got a digest."""
        wanted = self._limit + len(self._deferred)  # the deferred ones cannot crowd out
        missing = self._state.images_missing_digest(wanted)
        if len(missing) < wanted:  # every image without a digest is in hand: forget the rest
            still = {image.id for image in missing}
            self._deferred = {k: v for k, v in self._deferred.items() if k in still}
        now = self._clock()
        due = [i for i in missing if self._deferred.get(i.id, (now, 0))[0] <= now]
        done = 0
        for image in due[: self._limit]:
            try:
                sha256 = self._store.content_digest(image.volume)
                self._store.set_metadata(image.volume, {volume_metadata.CONTENT_SHA256: sha256})
            except BmiError as exc:
                self._defer(image.id, now, exc)
                continue
            self._deferred.pop(image.id, None)
            if self._state.record_image_digest(image.id, sha256):
                log.info("recorded the content digest of image %s", image.id)
                done += 1
        return done

    def _defer(self, image_id: str, now: float, exc: BmiError) -> None:
        _, waited = self._deferred.get(image_id, (now, 0.0))
        wait = min(waited * 2, self._max_retry) if waited else self._retry
        self._deferred[image_id] = (now + wait, wait)
        # Once a failure, then quietly while it lasts (it is retried for as long).
        level = logging.WARNING if not waited else logging.DEBUG
        log.log(level, "could not hash image %s yet (trying again in %.0f s): %s",
                image_id, wait, exc.message)


@dataclass(frozen=True)
class Verification:
    image_id: str
    recorded_sha256: str
    computed_sha256: str
    matches: bool
    detail: str = ""


def verify(
    state: StateStore, store: ImageStore, principal: Principal, ref: str
) -> Verification:
    """Hash the image's content in the store again and compare it with the record.
    Owners and admins only: it reads the whole image."""
    from .images import require_ready  # images.py records digests through this module
    image = access.resolve_image(state, principal, ref)
    access.require_owner(principal, image.project, f"image {image.name!r}", "verify")
    require_ready(image, "image")
    computed = store.content_digest(image.volume)
    problems = []
    if not image.content_sha256:
        problems.append("no digest was recorded when the image was made")
    elif computed != image.content_sha256:
        problems.append("the content differs from what was recorded when it was made")
    if store.modified_since_sealed(image.volume):
        problems.append("its volume was written after the image was sealed")
    return Verification(
        image_id=image.id,
        recorded_sha256=image.content_sha256,
        computed_sha256=computed,
        matches=not problems,
        detail="; ".join(problems),
    )
