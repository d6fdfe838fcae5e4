"""Opaque page tokens for List calls (keyset pagination on (project, name))."""

from __future__ import annotations

import base64
import binascii
import json

from .errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_token(project: str, name: str) -> str:
    raw = json.dumps([project, name], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_token(token: str) -> tuple[str, str] | None:
    if not token:
        return None
    try:
        project, name = json.loads(base64.urlsafe_b64decode(token.encode()))
        if isinstance(project, str) and isinstance(name, str):
            return project, name
    except (ValueError, TypeError, binascii.Error):
        pass
    raise InvalidArgument("page_token is invalid; pass next_page_token from a previous response")
