"""Multi-step creation and deletion that either completes or is undone.

The record is written first, in state CREATING: it is the intent that reconcile finds
after a crash. Store steps follow; the record turns READY last. Any failure removes the
volume and then the record. Deletion marks the record DELETING first, so that a crash
leaves an intent that reconcile finishes.

When the undo itself fails (the store became unreachable mid-way), the CREATING record
is kept as the intent and queued in ``RecordOps.pending_undos``; the server's background
loop retries it (``retry_undos``) until the volume and the record are gone, so an outage
does not leave a half-made resource behind until the next restart.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import FailedPrecondition
from .faults import crash_point
from .models import ResourceState
from .ports import ImageStore

log = logging.getLogger(__name__)


class PendingUndos:
    """Records whose creation failed and could not be undone yet (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, Any] = {}

    def add(self, record: Any) -> None:
        with self._lock:
            self._records[record.id] = record

    def discard(self, record_id: str) -> None:
        with self._lock:
            self._records.pop(record_id, None)

    def snapshot(self) -> list[Any]:
        with self._lock:
            return list(self._records.values())

    def __contains__(self, record_id: object) -> bool:
        with self._lock:
            return record_id in self._records

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)


@dataclass(frozen=True)
class RecordOps:
    """How to write one kind of record (image or disk) in the state store."""

    kind: str
    add: Callable[[Any], None]
    update: Callable[[Any], None]
    delete: Callable[[str], None]
    pending_undos: PendingUndos = field(default_factory=PendingUndos)


def create(ops: RecordOps, store: ImageStore, record: Any, build: Callable[[], None]) -> Any:
    """Add ``record`` (CREATING), run ``build`` (the store steps), then mark it READY."""
    record.state = ResourceState.CREATING
    ops.add(record)
    crash_point(f"{ops.kind}.create.after_record")
    try:
        build()
        crash_point(f"{ops.kind}.create.before_ready")
        record.state = ResourceState.READY
        ops.update(record)
    except BaseException:
        undo_create(ops, store, record)
        raise
    return record


def undo_create(ops: RecordOps, store: ImageStore, record: Any) -> bool:
    """Remove the volume, then the record. False (and queued for ``retry_undos``) when
    either step failed: the CREATING record stays as the intent."""
    try:
        store.remove(record.volume)
        ops.delete(record.id)
    except Exception as exc:
        log.warning("could not roll back %s %s (retried later): %s", ops.kind, record.id, exc)
        ops.pending_undos.add(record)
        return False
    ops.pending_undos.discard(record.id)
    return True


def undo_if_pending(ops: RecordOps, store: ImageStore, record: Any) -> bool:
    """For a retry of a failed creation: True when ``record`` was a failed creation
    whose rollback has now been done, so the retry may start afresh."""
    return record.id in ops.pending_undos and undo_create(ops, store, record)


def retry_undos(ops: RecordOps, store: ImageStore) -> int:
    """Retry the rollbacks that failed; returns how many are still pending."""
    for record in ops.pending_undos.snapshot():
        if undo_create(ops, store, record):
            log.info("rolled back %s %s after an earlier failure", ops.kind, record.id)
    return len(ops.pending_undos)


def delete(ops: RecordOps, store: ImageStore, record: Any) -> None:
    """Mark DELETING, remove the volume, then the record. Safe to repeat."""
    before = ResourceState.READY
    if record.state is not ResourceState.DELETING:
        before = record.state  # READY, or MISSING (nothing left to remove but the record)
        record.state = ResourceState.DELETING
        ops.update(record)
    crash_point(f"{ops.kind}.delete.after_mark")
    try:
        store.remove(record.volume)
    except FailedPrecondition:
        # Nothing was removed (something still depends on the volume): undo the mark.
        record.state = before
        ops.update(record)
        raise
    crash_point(f"{ops.kind}.delete.after_remove")
    ops.delete(record.id)
