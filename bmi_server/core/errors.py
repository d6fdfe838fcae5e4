"""Domain errors. Raised by the core and the adapters, mapped to status codes at the edge."""


class BmiError(Exception):
    """Base of every error the API reports to a caller; the message is shown as is."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(BmiError):
    """The request itself is malformed, whatever the state of the system."""


class NotFound(BmiError):
    """The named resource does not exist, or the caller may not see it."""


class AlreadyExists(BmiError):
    """A resource with that name (or id) already exists."""


class FailedPrecondition(BmiError):
    """The system is not in a state where the request can be carried out."""


class PermissionDenied(BmiError):
    """The caller is known but not allowed to do this."""


class Unauthenticated(BmiError):
    """The caller presented no credentials, or wrong ones."""


class Unavailable(BmiError):
    """A backing system (Ceph, database, ...) cannot be reached; retrying may succeed."""


class DeadlineExceeded(BmiError):
    """Time ran out: the caller's deadline passed, or a backing system did not finish
    its part in time (HIL's network change). The message says which and what is left;
    repeating the call at once does not help, so clients do not retry it blindly."""


class ResourceExhausted(BmiError):
    """The caller asked too often (it may ask again after ``retry_after`` seconds), or
    asked for more than its project's quota allows (QuotaExceeded)."""

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QuotaExceeded(ResourceExhausted):
    """A create would take a project past one of its limits (core/quotas.py); nothing was
    made. ``kind`` is the limited amount ("bytes", "images" or "disks")."""

    def __init__(
        self, message: str, *, project: str, kind: str, limit: int, used: int, asked: int
    ) -> None:
        super().__init__(message)
        self.project = project
        self.kind = kind
        self.limit = limit
        self.used = used
        self.asked = asked
