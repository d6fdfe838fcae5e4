"""HIL (Hardware Isolation Layer) adapters: a client of HIL's v0 REST API, the Isolator
port on it, and an Authenticator checking callers' HIL credentials."""

from .auth import HilAuthenticator
from .client import HilClient
from .isolator import HilIsolator

__all__ = ["HilAuthenticator", "HilClient", "HilIsolator"]
