"""Content digests of images: recorded as each image is made, checked on demand.

An image's content is its raw virtual disk bytes (holes as zeros): an uploaded or
fetched qcow2 file is hashed as the raw content it was converted to. The digest is kept
in the record and in the volume's metadata (``volume_metadata.CONTENT_SHA256``), so a
creation finished by reconcile, or a record rebuilt from Ceph, keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import access, volume_metadata
from .models import Image, Principal
from .ports import ImageStore, StateStore


def record(store: ImageStore, image: Image, sha256: str | None = None) -> None:
    """Give ``image`` (being made, not sealed yet) its content digest: ``sha256`` when the
    caller hashed the content as it wrote it, else read back from the store."""
    image.content_sha256 = sha256 or store.content_digest(image.volume)
    store.set_metadata(image.volume, {volume_metadata.CONTENT_SHA256: image.content_sha256})


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
    access.require_owner(principal, image.project, f"image {image.name!r}")
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
