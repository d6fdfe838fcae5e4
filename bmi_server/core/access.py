"""Who may see and touch what. Another project's resources are reported as not found,
so their existence never leaks."""

from __future__ import annotations

from .errors import InvalidArgument, NotFound, PermissionDenied
from .models import Disk, Image, Principal
from .naming import DISK_ID_PREFIX, IMAGE_ID_PREFIX, check_project, check_ref, is_id
from .ports import StateStore


def target_project(principal: Principal, requested: str) -> str:
    """The project a new resource goes into: the caller's own unless an admin names one."""
    if requested:
        check_project(requested)
        if not principal.can_access_project(requested):
            raise PermissionDenied(f"you may not create resources in project {requested!r}")
        return requested
    if principal.project is None:
        raise InvalidArgument("project is required for admin callers")
    return principal.project


def listing_projects(principal: Principal, requested: str) -> list[str] | None:
    """Projects a List call covers; None means every project (admins only)."""
    if requested:
        check_project(requested)
        if not principal.can_access_project(requested):
            raise PermissionDenied(f"you may not list project {requested!r}")
        return [requested]
    if principal.is_admin:
        return None
    assert principal.project is not None
    return [principal.project]


def resolve_image(state: StateStore, principal: Principal, ref: str) -> Image:
    check_ref(ref, "image")
    if is_id(ref, IMAGE_ID_PREFIX):
        image = state.get_image(ref)
        if image is None or not image.visible_to(principal):
            raise NotFound(f"image {ref!r} not found")
        return image
    # A name means the caller's own image first, then a public one (names are unique per
    # project, so one read of every image with that name decides).
    named = state.find_images_by_name(ref, None)
    own = [i for i in named if principal.project is not None and i.project == principal.project]
    if own:
        return own[0]
    candidates = [i for i in named if i.visible_to(principal)]
    if not candidates:
        raise NotFound(f"image {ref!r} not found")
    if len(candidates) > 1:
        ids = ", ".join(sorted(i.id for i in candidates))
        raise InvalidArgument(f"image name {ref!r} is ambiguous ({ids}); use the id")
    return candidates[0]


def resolve_disk(state: StateStore, principal: Principal, ref: str) -> Disk:
    check_ref(ref, "disk")
    if is_id(ref, DISK_ID_PREFIX):
        disk = state.get_disk(ref)
        if disk is None or not principal.can_access_project(disk.project):
            raise NotFound(f"disk {ref!r} not found")
        return disk
    projects = None if principal.is_admin else [principal.project or ""]
    named = state.find_disks_by_name(ref, projects)
    if not named:
        raise NotFound(f"disk {ref!r} not found")
    if len(named) > 1:
        ids = ", ".join(sorted(d.id for d in named))
        raise InvalidArgument(f"disk name {ref!r} is ambiguous ({ids}); use the id")
    return named[0]


def require_owner(
    principal: Principal, project: str, what: str, action: str = "change"
) -> None:
    """Public images are visible to all but changed (or verified: a read of the whole
    image) only by their project or an admin."""
    if not principal.can_access_project(project):
        raise PermissionDenied(f"only project {project!r} or an admin may {action} {what}")
