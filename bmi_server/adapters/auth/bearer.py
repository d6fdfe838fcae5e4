"""What the token files share: reading 'Bearer <token>' and matching it in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import TypeVar

from ...core.errors import Unauthenticated

T = TypeVar("T")


def bearer_token(credentials: str | None, required: str) -> bytes:
    """The token of ``credentials``; Unauthenticated with ``required`` when there are none."""
    if not credentials:
        raise Unauthenticated(required)
    scheme, _, token = credentials.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("unsupported credentials: expected 'Bearer <token>'")
    return token.strip().encode()


def match_token(known: Iterable[tuple[bytes, T]], presented: bytes) -> T | None:
    """What ``presented`` stands for, or None. Compares against every token so timing
    does not tell which one was close."""
    found = None
    for token, holder in known:
        if hmac.compare_digest(token, presented):
            found = holder
    return found
