"""The current call's deadline, so long work stops when its caller has given up.

The API edge opens a scope with the caller's remaining time; long loops deep in the
adapters (copies into Ceph, conversions) ask ``remaining()`` or ``check()`` between steps,
without every signature in between carrying a deadline. Outside any scope (background
work, admin commands) there is no deadline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from .errors import DeadlineExceeded

_DEADLINE: ContextVar[float | None] = ContextVar("bmi_deadline", default=None)


@contextmanager
def scope(seconds: float | None) -> Iterator[None]:
    """Run the block with a deadline ``seconds`` from now (None: no deadline). A scope
    inside another never extends it."""
    outer = _DEADLINE.get()
    deadline = None if seconds is None else time.monotonic() + max(seconds, 0.0)
    if outer is not None and (deadline is None or outer < deadline):
        deadline = outer
    token = _DEADLINE.set(deadline)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


@contextmanager
def unbounded() -> Iterator[None]:
    """Run the block with no deadline: clean-up that must finish even though the caller
    has given up (a rollback)."""
    token = _DEADLINE.set(None)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def remaining() -> float | None:
    """Seconds left (never negative), or None without a deadline."""
    deadline = _DEADLINE.get()
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


def expired() -> bool:
    left = remaining()
    return left is not None and left <= 0


def check(what: str) -> None:
    """DeadlineExceeded if the caller's deadline has passed."""
    if expired():
        raise DeadlineExceeded(f"{what}: the caller's deadline passed; nothing was kept")
