"""The image catalogue: golden images, copies and visibility."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from . import access, image_digests, tracked, volume_metadata
from .errors import (
    AlreadyExists,
    BmiError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
)
from .models import Disk, Image, ImageKind, Page, Principal, ResourceState, Visibility
from .naming import (
    IMAGE_ID_PREFIX,
    NOT_IMPORTABLE,
    check_name,
    check_request_id,
    check_source_volume,
    is_bmi_volume_name,
    new_id,
    volume_name,
)
from .paging import decode_token, encode_token, page_size
from .ports import ImageStore, StateStore
from .quotas import QuotaBook
from .request_log import RequestLog, scoped_request_id

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_LISTED_DEPENDENTS = 10
# Actions recorded in the request log (core/request_log.py).
UPDATE, DELETE = "image.update", "image.delete"


class ImageCatalogue:
    def __init__(self, state: StateStore, store: ImageStore, quotas: QuotaBook) -> None:
        self._state = state
        self._store = store
        self.quotas = quotas
        # Every new image record is inserted through the quota check (uploads too).
        self.ops = tracked.RecordOps(
            kind="image", add=quotas.add_image, update=state.update_image,
            delete=state.delete_image,
        )
        self.requests = RequestLog(state)

    # -- reading -----------------------------------------------------------------------

    def list(
        self, principal: Principal, *, project: str = "", size: int = 0, token: str = ""
    ) -> Page[Image]:
        limit = page_size(size)
        projects = access.listing_projects(principal, project)
        images = self._state.list_images(
            projects=projects,
            include_public=not principal.is_admin and not project,
            after=decode_token(token),
            limit=limit + 1,
        )
        more = len(images) > limit
        images = images[:limit]
        next_token = encode_token(images[-1].project, images[-1].name) if more else ""
        return Page(images, next_token)

    def get(self, principal: Principal, ref: str) -> Image:
        return access.resolve_image(self._state, principal, ref)

    # -- creating ----------------------------------------------------------------------

    def new_image(
        self,
        principal: Principal,
        *,
        name: str,
        project: str,
        kind: ImageKind,
        visibility: Visibility,
        size_bytes: int = 0,
        source: str = "",
        request_id: str = "",
    ) -> Image:
        """Validate a would-be image and build its record (nothing is written yet)."""
        check_name(name, "image")
        owner = access.target_project(principal, project)
        if visibility is Visibility.PUBLIC and not principal.is_admin:
            raise PermissionDenied("only admins may create public images")
        if self._state.find_images_by_name(name, [owner]):
            raise AlreadyExists(f"image {name!r} already exists in project {owner!r}")
        image_id = new_id(IMAGE_ID_PREFIX)
        return Image(
            id=image_id,
            name=name,
            project=owner,
            kind=kind,
            size_bytes=size_bytes,
            volume=volume_name(image_id),
            visibility=visibility,
            source=source,
            request_id=scoped_request_id(principal, request_id),
        )

    def replay(self, principal: Principal, request_id: str, name: str) -> Image | None:
        """The image an earlier call with this request_id made, if any (idempotent retry)."""
        return replayed(
            self._state.find_image_by_request, principal, request_id, name or None,
            undo=lambda image: tracked.undo_if_pending(self.ops, self._store, image),
        )

    def import_volume(
        self,
        principal: Principal,
        *,
        name: str,
        project: str,
        source_volume: str,
        visibility: Visibility,
        request_id: str = "",
    ) -> Image:
        return first_or_replayed(
            lambda: self._import_volume(
                principal, name, project, source_volume, visibility, request_id
            ),
            lambda: self.replay(principal, request_id, name),
        )

    def _import_volume(
        self,
        principal: Principal,
        name: str,
        project: str,
        source_volume: str,
        visibility: Visibility,
        request_id: str,
    ) -> Image:
        if earlier := self.replay(principal, request_id, name):
            return earlier
        if not principal.is_admin:
            raise PermissionDenied("only admins may import from the pool directly")
        check_source_volume(source_volume)
        # BMI's own volumes are tenants' images and disks: never imported, whoever asks.
        # Refused by name before anything is looked up, so the answer is the same
        # whether such a volume exists; by the store's marker for any other name.
        if is_bmi_volume_name(source_volume):
            raise PermissionDenied(NOT_IMPORTABLE)
        image = self.new_image(
            principal,
            name=name,
            project=project,
            kind=ImageKind.GOLDEN,
            visibility=visibility,
            source=source_volume,
            request_id=request_id,
        )
        source = self._store.external_volume(source_volume)
        if source.from_bmi:
            raise PermissionDenied(NOT_IMPORTABLE)
        image.size_bytes = source.size_bytes

        def build() -> None:
            # The store names the volumes it works on; the caller's image is told by id.
            with _told_as(image.volume, f"image {image.id}"):
                self._store.copy_external(
                    source_volume, image.volume, volume_metadata.for_image(image)
                )
                self._store.seal(image.volume)

        return tracked.create(self.ops, self._store, image, build)

    def copy(
        self,
        principal: Principal,
        ref: str,
        *,
        project: str,
        name: str = "",
        request_id: str = "",
    ) -> Image:
        return first_or_replayed(
            lambda: self._copy(principal, ref, project, name, request_id),
            lambda: self.replay(principal, request_id, name),
        )

    def _copy(
        self, principal: Principal, ref: str, project: str, name: str, request_id: str
    ) -> Image:
        if earlier := self.replay(principal, request_id, name):
            return earlier
        source = access.resolve_image(self._state, principal, ref)
        require_ready(source, "image")
        image = self.new_image(
            principal,
            name=name or source.name,
            project=project,
            kind=ImageKind.COPY,
            visibility=Visibility.PRIVATE,
            size_bytes=source.size_bytes,
            source=source.id,
            request_id=request_id,
        )

        def build() -> None:
            self._store.copy_flattened(
                source.volume, image.volume, volume_metadata.for_image(image)
            )
            # A copy has its source's content: its digest, unless none was recorded.
            image_digests.record(self._store, image, source.content_sha256 or None)
            self._store.seal(image.volume)

        return tracked.create(self.ops, self._store, image, build)

    # -- changing ----------------------------------------------------------------------

    def update(
        self,
        principal: Principal,
        ref: str,
        *,
        name: str = "",
        visibility: Visibility | None,
        request_id: str = "",
    ) -> Image:
        """Set the name and/or visibility. A retry (same ``request_id``) sets the same
        values on the same image, even after a rename, and changes nothing more."""
        earlier = self.requests.earlier(principal, request_id, UPDATE)
        image = access.resolve_image(self._state, principal, earlier or ref)
        access.require_owner(principal, image.project, f"image {image.name!r}")
        require_ready(image, "image")
        if earlier is None:
            self.requests.record(principal, request_id, UPDATE, image.id)
        before = (image.name, image.visibility)
        if name and name != image.name:
            check_name(name, "image")
            image.name = name
        if visibility is not None and visibility is not image.visibility:
            if visibility is Visibility.PUBLIC and not principal.is_admin:
                raise PermissionDenied("only admins may make an image public")
            image.visibility = visibility
        if (image.name, image.visibility) == before:
            return image
        self._state.update_image(image)  # raises AlreadyExists on a name clash
        try:
            self._store.set_metadata(image.volume, volume_metadata.for_image(image))
        except BaseException:
            image.name, image.visibility = before
            self._state.update_image(image)
            raise
        return image

    def delete(self, principal: Principal, ref: str, *, request_id: str = "") -> None:
        """A retry (same ``request_id``) finishes an interrupted delete, or finds the
        image gone and succeeds: the first call's result, no second effect."""
        earlier = self.requests.earlier(principal, request_id, DELETE)
        if earlier is not None and self._state.get_image(earlier) is None:
            return
        image = access.resolve_image(self._state, principal, earlier or ref)
        access.require_owner(principal, image.project, f"image {image.name!r}")
        if earlier is None:
            self.requests.record(principal, request_id, DELETE, image.id)
        if image.state is ResourceState.CREATING:
            raise FailedPrecondition(f"image {image.name!r} is still being created")
        disks = self._state.disks_of_image(image.id)
        if disks:
            raise FailedPrecondition(
                f"image {image.name!r} still has disks: {describe_dependents(principal, disks)}"
            )
        tracked.delete(self.ops, self._store, image)


@contextlib.contextmanager
def _told_as(volume: str, instead: str) -> Iterator[None]:
    """Store errors raised inside, with ``volume`` (an internal name) told as ``instead``."""
    try:
        yield
    except BmiError as exc:
        if volume not in exc.message:
            raise
        raise type(exc)(exc.message.replace(volume, instead)) from None


MISSING_DATA = "its data is no longer in the image store (an admin may restore it; else delete it)"


def require_ready(record: Image | Disk, what: str) -> None:
    if record.state is ResourceState.MISSING:
        raise FailedPrecondition(f"{what} {record.name!r} is missing: {MISSING_DATA}")
    if record.state is not ResourceState.READY:
        raise FailedPrecondition(f"{what} {record.name!r} is {record.state.value}, not ready")


def replayed(
    find,
    principal: Principal,
    request_id: str,
    name: str | None,
    undo: Callable[[Any], bool] | None = None,
):
    """What an earlier call with this request_id made (``find`` looks it up by scoped
    id), or None. ``name``: the name the retry asks for, checked unless None. ``undo``
    rolls back an earlier attempt that failed and could not be rolled back then (True:
    done, the retry starts afresh)."""
    if not request_id:
        return None
    check_request_id(request_id)
    earlier = find(scoped_request_id(principal, request_id))
    if earlier is None:
        return None
    if name is not None and earlier.name != name:
        raise InvalidArgument(f"request_id {request_id!r} was used for another request")
    if earlier.state is ResourceState.CREATING and undo is not None and undo(earlier):
        return None  # a rollback that had failed is done now: the retry starts afresh
    _require_finished(earlier, request_id)
    return earlier


def _require_finished(record, request_id: str) -> None:
    if record.state not in (ResourceState.READY, ResourceState.MISSING):
        # Under way on this or another replica, or orphaned by a crashed one until
        # reconcile rolls it back: either way a retry gets the answer.
        raise Unavailable(f"request {request_id!r} is still in progress; retry")


def first_or_replayed(make: Callable[[], T], earlier: Callable[[], T | None]) -> T:
    """``make()``; if it loses a race to a call with the same request id (on another
    replica: the database's unique names and request ids decide), that call's result.
    ``earlier`` is the replay lookup (None without a request id)."""
    try:
        return make()
    except AlreadyExists:
        if (winner := earlier()) is None:
            raise
        return winner


def describe_dependents(principal: Principal, disks: list[Disk]) -> str:
    """Name the caller's own disks; only count other projects' (names would leak)."""
    if principal.is_admin:
        visible = sorted(f"{d.project}/{d.name}" for d in disks)
    else:
        visible = sorted(d.name for d in disks if principal.can_access_project(d.project))
    hidden = len(disks) - len(visible)
    parts = visible[:MAX_LISTED_DEPENDENTS]
    if len(visible) > MAX_LISTED_DEPENDENTS:
        parts.append(f"and {len(visible) - MAX_LISTED_DEPENDENTS} more")
    if hidden:
        parts.append(f"{hidden} in other projects")
    return ", ".join(parts)
