"""Disks: copy-on-write clones of images, and snapshots of disks into new images."""

from __future__ import annotations

from . import access, tracked, volume_metadata
from .errors import AlreadyExists, FailedPrecondition, NotFound
from .images import (
    ImageCatalogue,
    first_or_replayed,
    replayed,
    require_ready,
    scoped_request_id,
)
from .models import Disk, Image, ImageKind, Page, Principal, ResourceState, Visibility
from .naming import DISK_ID_PREFIX, check_name, new_id, volume_name
from .paging import decode_token, encode_token, page_size
from .ports import ImageStore, NodeStateStore, StateStore

DELETE = "disk.delete"  # the action recorded in the request log


class DiskService:
    def __init__(
        self,
        state: StateStore,
        store: ImageStore,
        images: ImageCatalogue,
        nodes: NodeStateStore,
    ) -> None:
        self._state = state
        self._nodes = nodes
        self._store = store
        self._images = images
        # Every new disk record is inserted through the quota check (provisioning's too).
        self.ops = tracked.RecordOps(
            kind="disk", add=images.quotas.add_disk, update=state.update_disk,
            delete=state.delete_disk,
        )

    def list(
        self,
        principal: Principal,
        *,
        project: str = "",
        image: str = "",
        size: int = 0,
        token: str = "",
    ) -> Page[Disk]:
        limit = page_size(size)
        projects = access.listing_projects(principal, project)
        image_id = access.resolve_image(self._state, principal, image).id if image else None
        disks = self._state.list_disks(
            projects=projects, image_id=image_id, after=decode_token(token), limit=limit + 1
        )
        more = len(disks) > limit
        disks = disks[:limit]
        next_token = encode_token(disks[-1].project, disks[-1].name) if more else ""
        return Page(disks, next_token)

    def get(self, principal: Principal, ref: str) -> Disk:
        return access.resolve_disk(self._state, principal, ref)

    def used_bytes(self, disk: Disk) -> int:
        """What the disk's volume holds. A ready disk whose volume is gone (the store was
        emptied behind BMI's back) is told as MISSING (``disk.state``) from here on, as
        reconcile marks it at the next start."""
        # A disk being created or deleted may have no volume to measure.
        if disk.state is not ResourceState.READY:
            return 0
        try:
            return self._store.used_bytes(disk.volume)
        except NotFound:
            disk.state = ResourceState.MISSING
            return 0

    def create(
        self,
        principal: Principal,
        *,
        name: str,
        image: str,
        project: str = "",
        request_id: str = "",
    ) -> Disk:
        return first_or_replayed(
            lambda: self._create(principal, name, image, project, request_id),
            lambda: self._replay(principal, request_id, name),
        )

    def _create(
        self, principal: Principal, name: str, image: str, project: str, request_id: str
    ) -> Disk:
        if earlier := self._replay(principal, request_id, name):
            return earlier
        check_name(name, "disk")
        owner = access.target_project(principal, project)
        parent = access.resolve_image(self._state, principal, image)
        if not parent.visible_to(Principal(name=principal.name, project=owner)):
            # An admin may not hand one project's private image to another project.
            raise FailedPrecondition(
                f"image {parent.name!r} is private to project {parent.project!r}"
            )
        require_ready(parent, "image")
        if self._state.find_disks_by_name(name, [owner]):
            raise AlreadyExists(f"disk {name!r} already exists in project {owner!r}")
        disk_id = new_id(DISK_ID_PREFIX)
        disk = Disk(
            id=disk_id,
            name=name,
            project=owner,
            image_id=parent.id,
            image_name=parent.name,
            size_bytes=parent.size_bytes,
            volume=volume_name(disk_id),
            request_id=scoped_request_id(principal, request_id),
        )

        def build() -> None:
            self._store.clone(parent.volume, disk.volume, volume_metadata.for_disk(disk))

        return tracked.create(self.ops, self._store, disk, build)

    def delete(self, principal: Principal, ref: str, *, request_id: str = "") -> None:
        """A retry (same ``request_id``) finishes an interrupted delete, or finds the
        disk gone and succeeds: the first call's result, no second effect."""
        requests = self._images.requests
        earlier = requests.earlier(principal, request_id, DELETE)
        if earlier is not None and self._state.get_disk(earlier) is None:
            return
        disk = access.resolve_disk(self._state, principal, earlier or ref)
        if earlier is None:
            requests.record(principal, request_id, DELETE, disk.id)
        if (node := self._nodes.node_of_disk(disk.id)) is not None:
            raise FailedPrecondition(
                f"disk {disk.name!r} is the disk of node {node.name!r}; deprovision it first"
            )
        self._delete(disk)

    def delete_for_node(self, disk_id: str) -> None:
        """Deprovisioning deletes the disk it cloned, while the node still names it."""
        disk = self._state.get_disk(disk_id)
        if disk is None:
            raise NotFound(f"disk {disk_id!r} not found")
        self._delete(disk)

    def _delete(self, disk: Disk) -> None:
        if disk.state is ResourceState.CREATING:
            raise FailedPrecondition(f"disk {disk.name!r} is still being created")
        tracked.delete(self.ops, self._store, disk)

    def snapshot(
        self, principal: Principal, ref: str, *, image_name: str, request_id: str = ""
    ) -> Image:
        """A new image with the disk's current content, flattened: independent of the disk."""
        return first_or_replayed(
            lambda: self._snapshot(principal, ref, image_name, request_id),
            lambda: self._images.replay(principal, request_id, image_name),
        )

    def _snapshot(self, principal: Principal, ref: str, image_name: str, request_id: str) -> Image:
        if earlier := self._images.replay(principal, request_id, image_name):
            return earlier
        disk = access.resolve_disk(self._state, principal, ref)
        require_ready(disk, "disk")
        image = self._images.new_image(
            principal,
            name=image_name,
            project=disk.project,
            kind=ImageKind.SNAPSHOT,
            visibility=Visibility.PRIVATE,
            size_bytes=disk.size_bytes,
            source=disk.id,
            request_id=request_id,
        )

        def build() -> None:
            self._store.copy_flattened(disk.volume, image.volume, volume_metadata.for_image(image))
            self._store.seal(image.volume)

        return tracked.create(self._images.ops, self._store, image, build)

    def _replay(self, principal: Principal, request_id: str, name: str) -> Disk | None:
        return replayed(
            self._state.find_disk_by_request, principal, request_id, name,
            undo=lambda disk: tracked.undo_if_pending(self.ops, self._store, disk),
        )
