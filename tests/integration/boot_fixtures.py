"""What the QEMU boot tests share: the server settings nodes boot against, and a module's
admin and tenant clients of its own server."""

from __future__ import annotations

import pytest
from bmi_client.client import BmiClient

# QEMU's user networking reaches the host's 127.0.0.1 at 10.0.2.2.
GUEST_HOST = "10.0.2.2"


def qemu_boot_env(tgtd, **extra: str) -> dict[str, str]:
    """Settings of a server QEMU nodes boot from (its portal as the guests see it, quick
    discovery retries and session polls), plus ``extra`` BMI_* settings."""
    return {
        "BMI_ADVERTISED_PORTALS": f"{GUEST_HOST}:{tgtd.port}",
        "BMI_DISCOVERY_RETRY_SECONDS": "2",
        "BMI_SESSION_POLL_SECONDS": "0.3",
        **extra,
    }


def module_client(server_fixture: str, token: str, timeout: float = 60):
    """A module-scoped fixture: a BmiClient with ``token`` on the module's server."""

    @pytest.fixture(scope="module")
    def client(request):
        server = request.getfixturevalue(server_fixture)
        with BmiClient(server.address, token, timeout=timeout) as made:
            yield made

    return client
