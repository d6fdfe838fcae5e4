"""Content digests of images: recorded as each image is made, checked on demand.

An image's content is its raw virtual disk bytes (holes as zeros): an uploaded or
fetched qcow2 file is hashed as the raw content it was converted to. SHA-256 has to see
every byte, holes too, so hashing costs time in proportion to the virtual size (about
1-2 GB/s per core: half an hour for an empty 4 TiB volume). Hence two ways in:

- Content that streams through the server (raw uploads, raw URL imports) is hashed as
  it is written, for free, and recorded before the image is sealed; a copy takes its
  source's digest.
- Everything else (qcow2 files, pool imports, snapshots, copies of images without one)
  becomes READY at once and is hashed afterwards by ``fill_missing``, which the server's
  digest thread runs: from the sealed snapshot, which nothing changes, so the digest is
  that of the content as made. Images made before digests existed get one the same way.

The digest is kept in the record and in the volume's metadata
(``volume_metadata.CONTENT_SHA256``), so a creation finished by reconcile, or a record
rebuilt from Ceph, keeps it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from . import access, volume_metadata
from .errors import BmiError
from .models import Image, Principal
from .ports import ImageStore, StateStore

log = logging.getLogger(__name__)


def record(store: ImageStore, image: Image, sha256: str | None) -> None:
    """Give ``image`` (being made, not sealed yet) the content digest the caller computed
    as it wrote the content; None leaves it to ``fill_missing``."""
    if not sha256:
        return
    image.content_sha256 = sha256
    store.set_metadata(image.volume, {volume_metadata.CONTENT_SHA256: sha256})


def fill_missing(state: StateStore, store: ImageStore, limit: int = 10) -> int:
    """Hash up to ``limit`` READY images that have no digest yet; how many got one. An
    image that cannot be hashed now (store unreachable, deleted meanwhile) is retried on
    a later call."""
    done = 0
    for image in state.images_missing_digest(limit):
        try:
            sha256 = store.content_digest(image.volume)
            store.set_metadata(image.volume, {volume_metadata.CONTENT_SHA256: sha256})
        except BmiError as exc:
            log.warning("could not hash image %s yet: %s", image.id, exc.message)
            continue
        if state.record_image_digest(image.id, sha256):
            log.info("recorded the content digest of image %s", image.id)
            done += 1
    return done


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
