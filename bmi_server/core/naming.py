"""Validation of user-chosen names and generation of stable ids."""

from __future__ import annotations

import re
import secrets

from .errors import InvalidArgument

MAX_NAME_LENGTH = 63
# Lower-case, as the API says (proto/bmi/v1): "Ubuntu" and "ubuntu" are never two names.
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_PROJECT = re.compile(r"[a-z0-9][a-z0-9._@-]{0,63}")
IMAGE_ID_PREFIX = "img-"
DISK_ID_PREFIX = "dsk-"
_ID = re.compile(r"(img|dsk)-[0-9a-f]{16}")


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(8)


def is_id(ref: str, prefix: str) -> bool:
    return ref.startswith(prefix) and _ID.fullmatch(ref) is not None


# Every volume BMI makes is named VOLUME_PREFIX + id, whatever its kind (the names of its
# snapshots start so too); no import source may be named so.
VOLUME_PREFIX = "bmi-"


def volume_name(resource_id: str) -> str:
    """Store names derive from ids, never from user names, so renames are metadata-only."""
    return VOLUME_PREFIX + resource_id


def is_bmi_volume_name(volume: str) -> bool:
    """Whether ``volume`` is named as BMI names its own volumes (in any case: refusing a
    look-alike costs nothing, missing one of BMI's would copy a tenant's data)."""
    return volume[: len(VOLUME_PREFIX)].lower() == VOLUME_PREFIX


# RBD images an admin may import from the pool: 1 to 255 ASCII letters, digits, '.', '_'
# and '-', starting with a letter, digit or '_'. Narrower than librbd on purpose: no '/'
# or '@' (pool and snapshot separators of the rbd CLI and qemu), no NUL or control
# characters (librbd takes C strings), nothing that needs quoting in a log or a shell.
MAX_SOURCE_VOLUME_LENGTH = 255
_SOURCE_VOLUME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
# The one answer for any source BMI manages, by name or by the store's marker: it names
# neither the source nor its owner, and reads the same whether such a volume exists.
NOT_IMPORTABLE = (
    "source_rbd_image is refused: BMI never imports the volumes it manages (named bmi-..., "
    "carrying bmi.* metadata, or cloned from such a volume); copy an image with CopyImage "
    "or snapshot a disk with SnapshotDisk instead"
)


def check_source_volume(source: str) -> str:
    """An import source's name, checked before it reaches the store (never echoed back:
    it may be anything)."""
    if not source:
        raise InvalidArgument("source_rbd_image is required")
    if len(source) > MAX_SOURCE_VOLUME_LENGTH or not _SOURCE_VOLUME.fullmatch(source):
        raise InvalidArgument(
            f"source_rbd_image must be 1 to {MAX_SOURCE_VOLUME_LENGTH} letters, digits, "
            "'.', '_' and '-', starting with a letter, digit or '_'"
        )
    return source


# ImageStore.copy_flattened copies through a temporary snapshot of the source named after
# the new volume, so reconcile can tell whose copy a leftover snapshot belonged to.
TEMP_SNAPSHOT_PREFIX = "bmi-tmp-"


def temporary_snapshot(target_volume: str) -> str:
    return TEMP_SNAPSHOT_PREFIX + target_volume


def copy_target(snapshot: str) -> str:
    """The volume a temporary snapshot was taken to copy into."""
    return snapshot.removeprefix(TEMP_SNAPSHOT_PREFIX)


def check_name(name: str, what: str) -> str:
    if not name:
        raise InvalidArgument(f"{what} name is required")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"{what} name is longer than {MAX_NAME_LENGTH} characters")
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"{what} name {name!r} is invalid: use lower-case letters, digits, '.', '_' "
            "and '-', starting with a letter or digit"
        )
    if _ID.fullmatch(name):
        raise InvalidArgument(f"{what} name {name!r} looks like an id; choose another")
    return name


def check_project(project: str) -> str:
    if not _PROJECT.fullmatch(project):
        raise InvalidArgument(
            f"project name {project[:80]!r} is invalid: use lower-case letters, digits, "
            "'.', '_', '@' and '-', starting with a letter or digit"
        )
    return project


def check_ref(ref: str, what: str) -> str:
    """A reference is an id or a name; reject garbage before it reaches a lookup."""
    if not ref:
        raise InvalidArgument(f"{what} is required (an id or a name)")
    if len(ref) > MAX_NAME_LENGTH or not _NAME.fullmatch(ref):
        raise InvalidArgument(
            f"{what} {ref[:80]!r} is not a valid id or name (names are lower-case)"
        )
    return ref


def check_request_id(request_id: str) -> str:
    if len(request_id) > 128 or not request_id.isprintable():
        raise InvalidArgument("request_id must be at most 128 printable characters")
    return request_id
