"""Multi-step creation and deletion that either completes or is undone.

The record is written first, in state CREATING: it is the intent that reconcile finds
after a crash. Store steps follow; the record turns READY last. Any failure removes the
volume and then the record. Deletion marks the record DELETING first, so that a crash
leaves an intent that reconcile finishes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import FailedPrecondition
from .faults import crash_point
from .models import ResourceState
from .ports import ImageStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordOps:
    """How to write one kind of record (image or disk) in the state store."""

    kind: str
    add: Callable[[Any], None]
    update: Callable[[Any], None]
    delete: Callable[[str], None]


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


def undo_create(ops: RecordOps, store: ImageStore, record: Any) -> None:
    try:
        store.remove(record.volume)
    except Exception as exc:  # keep the CREATING record: reconcile retries the removal
        log.warning("could not roll back %s %s: %s", ops.kind, record.id, exc)
        return
    ops.delete(record.id)


def delete(ops: RecordOps, store: ImageStore, record: Any) -> None:
    """Mark DELETING, remove the volume, then the record. Safe to repeat."""
    if record.state is not ResourceState.DELETING:
        record.state = ResourceState.DELETING
        ops.update(record)
    crash_point(f"{ops.kind}.delete.after_mark")
    try:
        store.remove(record.volume)
    except FailedPrecondition:
        # Nothing was removed (something still depends on the volume): undo the mark.
        record.state = ResourceState.READY
        ops.update(record)
        raise
    crash_point(f"{ops.kind}.delete.after_remove")
    ops.delete(record.id)
