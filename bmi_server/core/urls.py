"""URLs as BMI shows them: never with the credentials or query a caller put in them."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from .errors import InvalidArgument

SCHEMES = ("http", "https")
MAX_URL_CHARS = 2048


def redact(url: str) -> str:
    """``url`` fit for records, logs and errors: no ``user:password@``, and the query
    (signed URLs carry their secrets there) shown as ``?…``. InvalidArgument if it is
    no http(s) URL with a host (the message never repeats the URL)."""
    if len(url) > MAX_URL_CHARS:
        raise InvalidArgument(f"source_url is longer than {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
        port = parts.port
    except ValueError:
        raise InvalidArgument("source_url is not a valid URL") from None
    if parts.scheme.lower() not in SCHEMES:
        raise InvalidArgument("source_url must be an http:// or https:// URL")
    if not host:
        raise InvalidArgument("source_url has no host")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return urlunsplit((parts.scheme.lower(), netloc, parts.path, "…" if parts.query else "", ""))
