"""Bring the catalogue and the image store back into agreement after a crash.

Records are the intents: a CREATING record whose volume is complete is finished, one
whose volume is incomplete or missing is rolled back; a DELETING record is deleted.
Volumes no record claims are removed when incomplete (an interrupted creation) and
only reported when complete: complete data is never destroyed automatically
(``rebuild_catalogue`` adopts it, or an operator removes it).

With several replicas on one database, a record in flight belongs to the replica working
on it: only records whose owner is ``orphaned`` (its lease expired) are repaired, and the
volumes and temporary snapshots of the others are left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import volume_metadata
from .errors import BmiError
from .models import Disk, Image, ResourceState, VolumeInfo
from .naming import copy_target
from .ports import ImageStore, StateStore
from .replicas import Orphaned, single_server

if TYPE_CHECKING:
    from .node_config import ConfigDrives

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    repaired: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    removed_volumes: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.repaired or self.problems)


def reconcile(
    state: StateStore,
    store: ImageStore,
    *,
    remove_unknown: bool = False,
    orphaned: Orphaned = single_server,
    drives: ConfigDrives | None = None,
) -> ReconcileReport:
    """``drives``: settle nodes' config drives too (without, they are left alone)."""
    report = ReconcileReport()
    listed = store.list_volumes()
    volumes = {v.name: v for v in listed}
    # Config drives are no catalogue entries: the records of nodes claim them.
    config_drives = {n: v for n, v in volumes.items() if volume_metadata.is_config_drive(v)}
    for name in config_drives:
        del volumes[name]
    busy: set[str] = set()  # volumes a live replica is creating or deleting right now
    # Disks first: an image volume cannot go while clones of it remain.
    for disk in state.all_disks():
        if _in_flight_elsewhere(disk, orphaned):
            volumes.pop(disk.volume, None)
            busy.add(disk.volume)
            continue
        with _item(report, f"disk {disk.id}"):
            _settle(
                report,
                store,
                volumes.pop(disk.volume, None),
                disk,
                "disk",
                state.update_disk,
                state.delete_disk,
            )
    for image in state.all_images():
        if _in_flight_elsewhere(image, orphaned):
            volumes.pop(image.volume, None)
            busy.add(image.volume)
            continue
        with _item(report, f"image {image.id}"):
            _settle(
                report,
                store,
                volumes.pop(image.volume, None),
                image,
                "image",
                state.update_image,
                state.delete_image,
            )
    for volume in sorted(volumes.values(), key=_clones_first):
        with _item(report, f"volume {volume.name}"):
            _unclaimed(report, store, volume, remove_unknown)
    if drives is not None:
        drives.settle(config_drives, report, remove_unknown=remove_unknown)
    # Last: a temporary snapshot is pinned by the half-made copy removed above.
    for volume in listed:
        if volume.name in report.removed_volumes:
            continue
        for snap in volume.temporary_snapshots:
            if copy_target(snap) in busy:
                continue  # pinned by a copy a live replica is making
            with _item(report, f"snapshot {volume.name}@{snap}"):
                store.remove_temporary_snapshot(volume.name, snap)
                report.repaired.append(f"removed temporary snapshot {snap} of {volume.name}")
    for line in report.repaired:
        log.warning("reconcile repaired: %s", line)
    for line in report.problems:
        log.error("reconcile found: %s", line)
    return report


def has_orphans(state: StateStore, orphaned: Orphaned) -> bool:
    """Whether some image or disk was left in flight by a replica that is gone (reads the
    database only: the cheap test before a periodic reconcile lists every volume)."""
    records = [*state.all_disks(), *state.all_images()]
    in_flight = (ResourceState.CREATING, ResourceState.DELETING)
    return any(r.state in in_flight and orphaned(r.owner) for r in records)


def _in_flight_elsewhere(record: Image | Disk, orphaned: Orphaned) -> bool:
    in_flight = record.state in (ResourceState.CREATING, ResourceState.DELETING)
    return in_flight and not orphaned(record.owner)


@contextmanager
def _item(report: ReconcileReport, label: str) -> Iterator[None]:
    """One item's failure is reported and the rest still reconciled (next start retries)."""
    try:
        yield
    except BmiError as exc:
        report.problems.append(f"could not repair {label}: {exc.message}")


def _settle(
    report, store, volume: VolumeInfo | None, record: Image | Disk, kind: str, update, delete
) -> None:
    label = f"{kind} {record.project}/{record.name} ({record.id})"
    if record.state is ResourceState.DELETING:
        store.remove(record.volume)
        report.removed_volumes.add(record.volume)
        delete(record.id)
        report.repaired.append(f"finished deleting {label}")
    elif record.state is ResourceState.CREATING:
        if volume is not None and volume.complete:
            record.state = ResourceState.READY
            record.size_bytes = volume.size_bytes
            if isinstance(record, Image):  # the digest was written to the volume first
                record.content_sha256 = volume.metadata.get(
                    volume_metadata.CONTENT_SHA256, record.content_sha256)
                record.file_digest = volume.metadata.get(
                    volume_metadata.FILE_DIGEST, record.file_digest)
                record.fetched_bytes = record.fetch_total_bytes = 0
            update(record)
            report.repaired.append(f"finished creating {label}")
        else:
            store.remove(record.volume)
            report.removed_volumes.add(record.volume)
            delete(record.id)
            report.repaired.append(f"rolled back interrupted creation of {label}{_why(record)}")
    elif record.state is ResourceState.MISSING:
        if volume is not None and volume.complete:
            record.state = ResourceState.READY
            update(record)
            report.repaired.append(f"{label}: its data is back in the image store; ready again")
        else:
            report.problems.append(f"{label} is still missing from the image store")
    elif volume is None:
        # Complete data is never made up: the record says so until deleted (or restored).
        record.state = ResourceState.MISSING
        update(record)
        report.problems.append(
            f"{label} is missing from the image store: marked missing (delete it, or "
            "restore its volume and reconcile again)")
    elif not volume.complete:
        report.problems.append(f"{label} is ready but its volume {volume.name} is incomplete")


def _why(record: Image | Disk) -> str:
    if isinstance(record, Image) and record.source.startswith(("http://", "https://")):
        # Never resumed: the file is fetched again from its start by a retry.
        return (f": its import from {record.source} was interrupted after "
                f"{record.fetched_bytes} bytes (the server stopped); import it again")
    return ""


def _unclaimed(
    report: ReconcileReport, store: ImageStore, volume: VolumeInfo, remove_unknown: bool
) -> None:
    kind = volume.metadata.get(volume_metadata.KIND, "volume")
    if not volume.complete or remove_unknown:
        for snap in volume.temporary_snapshots:
            store.remove_temporary_snapshot(volume.name, snap)
        store.remove(volume.name)
        report.removed_volumes.add(volume.name)
        report.repaired.append(f"removed orphan {kind} volume {volume.name}")
    else:
        report.problems.append(
            f"{kind} volume {volume.name} is unknown to the database "
            "(`bmi-server admin rebuild-catalogue` adopts it)"
        )


def _clones_first(volume: VolumeInfo) -> tuple[int, str]:
    return (0 if volume.parent else 1, volume.name)


def rebuild_catalogue(state: StateStore, store: ImageStore) -> ReconcileReport:
    """Adopt every complete volume the database does not know, from its metadata alone."""
    report = ReconcileReport()
    known = {i.volume for i in state.all_images()} | {d.volume for d in state.all_disks()}
    volumes = [v for v in store.list_volumes() if v.complete and v.name not in known]
    # A node's config drive is no catalogue entry: kept as it is for the node whose record
    # names it (reconcile removes one no node names; nodes are not rebuilt from Ceph).
    volumes = [v for v in volumes if not volume_metadata.is_config_drive(v)]
    # Images before disks: a disk record names its image.
    for volume in sorted(volumes, key=lambda v: v.metadata.get(volume_metadata.KIND) != "image"):
        kind = volume.metadata.get(volume_metadata.KIND)
        try:
            if kind == "image":
                image = volume_metadata.image_from(volume)
                state.add_image(image)
                label = f"image {image.project}/{image.name} ({image.id})"
            elif kind == "disk":
                disk = volume_metadata.disk_from(volume)
                state.add_disk(disk)
                label = f"disk {disk.project}/{disk.name} ({disk.id})"
            else:
                report.problems.append(f"volume {volume.name} has unknown kind {kind!r}")
                continue
        except (KeyError, ValueError) as exc:
            report.problems.append(f"volume {volume.name} has unreadable metadata: {exc}")
            continue
        except Exception as exc:  # e.g. a name clash with an existing record
            report.problems.append(f"volume {volume.name} not adopted: {exc}")
            continue
        report.repaired.append(f"adopted {label} from volume {volume.name}")
    return report
