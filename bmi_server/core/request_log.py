"""Idempotency keys for calls that change or remove an existing resource.

A create call keeps its key on the record it makes (``images.replayed``). An update or
a delete makes no record to hold it, so the first call writes its key with the id of
the resource it resolved, before acting; a retry with the same key acts on that same
resource again, by id, even if its name changed or it is gone. The actions are
idempotent by id -- an update sets fields to the values asked for, a delete finishes an
interrupted delete or finds nothing left to do -- so a retry either finishes an
interrupted call or gives the first call's result, with no second effect.
"""

from __future__ import annotations

from datetime import timedelta

from .errors import AlreadyExists, InvalidArgument
from .models import Principal, utcnow
from .naming import check_request_id
from .ports import StateStore


def scoped_request_id(principal: Principal, request_id: str) -> str:
    """Request ids are per caller, so one caller can never replay another's result."""
    return f"{principal.name}/{request_id}" if request_id else ""


# Retries come seconds or minutes after the call; a week of keys is plenty, and the log
# must not grow for ever.
KEEP = timedelta(days=7)


class RequestLog:
    def __init__(self, state: StateStore) -> None:
        self._state = state

    def prune(self) -> int:
        """Forget keys older than KEEP (run at start, with reconcile)."""
        return self._state.forget_requests(utcnow() - KEEP)

    def earlier(self, principal: Principal, request_id: str, action: str) -> str | None:
        """Id of the resource an earlier call with this key acted on, or None."""
        if not request_id:
            return None
        check_request_id(request_id)
        found = self._state.recall_request(scoped_request_id(principal, request_id))
        if found is None:
            return None
        if found[0] != action:
            raise InvalidArgument(f"request_id {request_id!r} was used for another request")
        return found[1]

    def record(self, principal: Principal, request_id: str, action: str, resource: str) -> None:
        """Remember that this call acts on ``resource`` (nothing without a key)."""
        if not request_id:
            return
        try:
            self._state.record_request(scoped_request_id(principal, request_id), action, resource)
        except AlreadyExists:
            # The same key raced in from a second connection: it must name the same thing.
            if self.earlier(principal, request_id, action) != resource:
                raise InvalidArgument(
                    f"request_id {request_id!r} was used for another request"
                ) from None
