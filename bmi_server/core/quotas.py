"""Per-project quotas, so that no tenant can fill the cluster.

Three amounts are limited per project: the sum of the *virtual* sizes of its images and
disks (a thin clone costs nothing at first, but its node can fill it up to its virtual
size), the number of its images and the number of its disks. Records in every state
count, those being created or deleted too: a create claims its share with its record,
before any Ceph step.

A project's limits are the server's defaults (settings ``quota_bytes``, ``quota_images``,
``quota_disks``), each replaced by the project's own where an admin set one (SetQuota);
0 means no limit.

The check is atomic with the records. ``QuotaBook.add_image`` / ``add_disk`` (the
``add`` of the catalogue's and the disk service's RecordOps, through which every create
goes: uploads, imports, copies, snapshots, disk creates, provisioning clones) give the
state store an admission that it runs inside the transaction inserting the record, with
the project locked: two creates, on one server or on several sharing a database, never
both take the last slot. ``check`` is an early look for callers that want to refuse before
costly work (spooling an upload, touching a node); it decides nothing by itself.
"""

from __future__ import annotations

from dataclasses import fields

from .errors import InvalidArgument, PermissionDenied, QuotaExceeded
from .models import Disk, Image, Principal, ProjectQuota, QuotaAmounts, QuotaOverride
from .naming import check_project
from .ports import Admission, StateStore

TIB = 1 << 40
# Defaults a datacenter can live with (docs/operator-guide.md, "Quotas"): a project's
# OS images and snapshots, and a root disk for each node of a large project, each of up
# to ~100 GiB virtual (1000 x 100 GiB is ~98 TiB).
DEFAULT_LIMITS = QuotaAmounts(size_bytes=100 * TIB, images=50, disks=1000)
MAX_LIMIT = (1 << 63) - 1  # what the database (BIGINT) and the API (int64) hold

# (field of QuotaAmounts, name in messages and QuotaExceeded.kind, what it counts)
KINDS = (
    ("size_bytes", "bytes", "virtual bytes of images and disks"),
    ("images", "images", "images"),
    ("disks", "disks", "disks"),
)


def effective_limits(defaults: QuotaAmounts, override: QuotaOverride) -> QuotaAmounts:
    """Each of the project's own limits, else the default."""
    return QuotaAmounts(
        **{
            f.name: getattr(defaults, f.name) if (own := getattr(override, f.name)) is None
            else own
            for f in fields(QuotaAmounts)
        }
    )


def enforce(project: str, limits: QuotaAmounts, used: QuotaAmounts, asked: QuotaAmounts) -> None:
    """QuotaExceeded if adding ``asked`` to ``used`` passes a limit. Only the amounts the
    request adds to are checked: a project over a lowered limit can still delete, and
    make what does not add to that amount."""
    for name, kind, what in KINDS:
        limit, have, more = getattr(limits, name), getattr(used, name), getattr(asked, name)
        if more > 0 and limit and have + more > limit:
            show = format_bytes if kind == "bytes" else str
            raise QuotaExceeded(
                f"quota exceeded in project {project!r}: {what}: limit {show(limit)}, "
                f"in use {show(have)}, this request needs {show(more)} more; delete some, "
                "or ask an admin to raise the quota",
                project=project, kind=kind, limit=limit, used=have, asked=more,
            )


def format_bytes(n: int) -> str:
    """``100 TiB`` when exact, else ``1.5 GiB (1610612736 bytes)``."""
    if n < 1024:
        return f"{n} bytes"
    units = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    power = min(len(units), (n.bit_length() - 1) // 10)
    whole, rest = divmod(n, 1024**power)
    if not rest:
        return f"{whole} {units[power - 1]}"
    return f"{n / 1024**power:.1f} {units[power - 1]} ({n} bytes)"


def check_limits(limits: QuotaAmounts | QuotaOverride, what: str) -> None:
    for name, kind, _ in KINDS:
        value = getattr(limits, name)
        if value is not None and not 0 <= value <= MAX_LIMIT:
            raise InvalidArgument(f"{what}: the limit on {kind} must be 0 (no limit) or positive")


class QuotaBook:
    """The limits of every project and the checks against them."""

    def __init__(self, state: StateStore, defaults: QuotaAmounts = DEFAULT_LIMITS) -> None:
        check_limits(defaults, "default quota")
        self._state = state
        self.defaults = defaults

    # -- enforcing (every create of an image or disk record) ----------------------------

    def admission(self, project: str, asked: QuotaAmounts) -> Admission:
        """What the state store runs, under the project's lock, before inserting."""

        def admit(used: QuotaAmounts, override: QuotaOverride) -> None:
            enforce(project, effective_limits(self.defaults, override), used, asked)

        return admit

    def add_image(self, image: Image) -> None:
        """Insert the record if the project has room for it (one transaction)."""
        asked = QuotaAmounts(size_bytes=image.size_bytes, images=1)
        self._state.add_image(image, self.admission(image.project, asked))

    def add_disk(self, disk: Disk) -> None:
        asked = QuotaAmounts(size_bytes=disk.size_bytes, disks=1)
        self._state.add_disk(disk, self.admission(disk.project, asked))

    def check(
        self, project: str, *, add_bytes: int = 0, add_images: int = 0, add_disks: int = 0
    ) -> None:
        """QuotaExceeded if ``project`` has no room now for what a request would add. An
        early refusal only (a concurrent create may still take the room); the record's
        insert checks again, atomically."""
        asked = QuotaAmounts(size_bytes=add_bytes, images=add_images, disks=add_disks)
        enforce(project, self.limits(project), self._state.quota_usage(project), asked)

    def limits(self, project: str) -> QuotaAmounts:
        return effective_limits(self.defaults, self._state.get_quota_override(project))

    # -- the API -----------------------------------------------------------------------

    def show(self, project: str) -> ProjectQuota:
        override = self._state.get_quota_override(project)
        return ProjectQuota(
            project=project,
            limits=effective_limits(self.defaults, override),
            used=self._state.quota_usage(project),
            override=override,
        )

    def get(self, principal: Principal, project: str = "") -> ProjectQuota:
        """Tenants see their own project's quota; admins any project's (they must name
        it). Naming a project one is not in is PERMISSION_DENIED, whether it exists or not."""
        if project:
            check_project(project)
            if not principal.can_access_project(project):
                raise PermissionDenied(f"you may not see the quota of project {project!r}")
        elif principal.project is None:
            raise InvalidArgument("project is required for admin callers")
        else:
            project = principal.project
        return self.show(project)

    def set(
        self,
        principal: Principal,
        project: str,
        *,
        size_bytes: int | None = None,
        images: int | None = None,
        disks: int | None = None,
        reset: bool = False,
    ) -> ProjectQuota:
        """Admins only: make the given limits the project's own (0: no limit). The others
        are kept, or with ``reset`` go back to the server's defaults. Setting the same
        again changes nothing (safe to retry)."""
        if not principal.is_admin:
            raise PermissionDenied("only admins may set quotas")
        if not project:
            raise InvalidArgument("project is required")
        check_project(project)
        override = QuotaOverride(size_bytes=size_bytes, images=images, disks=disks)
        check_limits(override, f"quota of project {project!r}")
        if reset or not override.empty:
            self._state.set_quota_override(project, override, replace=reset)
        return self.show(project)
