"""HIL's answers -> domain errors, keeping HIL's own message.

HIL reports errors as ``{"msg": ..., "type": ...}`` (labelled text/html like everything
it sends); routes it does not have answer with an HTML page. Status codes:
400 BadArgumentError / ValidationError, 401 AuthorizationError (bad credentials, wrong
project and admin-only calls alike; never 403), 404 NotFoundError (also for an unknown
user name), 409 BlockedError / ProjectMismatchError / DuplicateError /
IllegalStateError, 5xx server errors.
"""

from __future__ import annotations

import json

from ...core import errors

MAX_MESSAGE = 300


def hil_type(exc: BaseException) -> str:
    """HIL's error type (e.g. ``BadArgumentError``) behind a mapped error, or ''."""
    return getattr(exc, "hil_type", "")


def error_for(status: int, body: str, request: str) -> errors.BmiError:
    """The domain error for a non-2xx answer to ``request`` ("GET /v0/...")."""
    message, kind = _parse(body)
    text = f"HIL: {message}" if message else f"HIL answered {status} to {request}"
    if status == 400:
        exc: errors.BmiError = errors.InvalidArgument(text)
    elif status in (401, 403):
        # HIL cannot say whether the credentials or the access were wrong; callers that
        # must know (the authenticator) ask HIL a second question.
        exc = errors.PermissionDenied(text)
    elif status == 404:
        exc = errors.NotFound(text)
    elif status == 409:
        exc = errors.FailedPrecondition(text)
    elif status >= 500:
        exc = errors.Unavailable(f"HIL failed {request} ({status}): {message or 'server error'}")
    else:
        exc = errors.FailedPrecondition(f"HIL answered {status} to {request}: {message or '-'}")
    exc.hil_type = kind  # type: ignore[attr-defined]
    return exc


def _parse(body: str) -> tuple[str, str]:
    try:
        data = json.loads(body)
    except ValueError:
        return "", ""  # an HTML error page: say nothing rather than echo markup
    if not isinstance(data, dict):
        return "", ""
    message = " ".join(str(data.get("msg") or "").split())[:MAX_MESSAGE]
    return message, str(data.get("type") or "")
