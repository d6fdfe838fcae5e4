"""Rate limits of the real HTTP boot endpoint: 429 with Retry-After, nothing recorded
for a refused request, recovery once the bucket refills, and a Prometheus counter."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest
from bmi_client.client import BmiClient
from server_process import ADMIN_TOKEN, ServerProcess, free_port

pytestmark = pytest.mark.ceph

NODE_MAC = "52:54:00:7a:00:01"


@pytest.fixture
def limited(ceph_cluster, tgtd, tmp_path_factory):
    metrics = f"127.0.0.1:{free_port()}"
    process = ServerProcess(
        tmp_path_factory.mktemp("rate-state"), str(ceph_cluster.conf_path), ceph_cluster.pool,
        tgtd=tgtd,
        extra_env={
            "BMI_BOOT_RATE_PER_SECOND": "2", "BMI_BOOT_BURST": "3",
            "BMI_DISCOVERY_RATE_PER_SECOND": "0.01", "BMI_DISCOVERY_BURST": "3",
            "BMI_METRICS_LISTEN": metrics,
        },
    )  # fmt: skip
    process.metrics_address = metrics
    process.start()
    yield process
    process.stop()


def fetch(server: ServerProcess, mac: str, serial: str = "") -> tuple[int, str, dict]:
    query = f"mac={mac}" + (f"&serial_hex={serial.encode().hex()}" if serial else "")
    try:
        with urllib.request.urlopen(f"http://{server.http_address}/boot.ipxe?{query}") as reply:
            return reply.status, reply.read().decode(), dict(reply.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)


def discovered(server: ServerProcess) -> dict[str, object]:
    with BmiClient(server.address, ADMIN_TOKEN) as admin:
        return {node.macs[0]: node for node in admin.list_nodes()}


def test_a_node_asking_too_often_gets_429_changes_nothing_and_recovers(limited):
    answers = [fetch(limited, NODE_MAC, serial="first")[0] for _ in range(3)]
    assert answers == [200, 200, 200]  # the burst; the first recorded the node
    before = discovered(limited)[NODE_MAC]
    status, body, headers = fetch(limited, NODE_MAC, serial="changed")
    assert status == 429
    assert headers["Retry-After"] == "1"  # a token is back within 0.5 s at 2 a second
    assert body.startswith("#!ipxe") and "too many requests" in body
    assert discovered(limited)[NODE_MAC] == before  # the new serial was not taken
    # Recovery: once a token is back the node is served again.
    refused, deadline = 1, time.monotonic() + 10
    while (status := fetch(limited, NODE_MAC)[0]) == 429 and time.monotonic() < deadline:
        refused += 1
        time.sleep(0.1)
    assert status == 200
    assert f'bmi_boot_rate_limited_total{{bucket="node"}} {refused:.1f}' in scrape(limited)


def test_a_source_asking_for_many_unknown_macs_is_limited_and_records_nothing(limited):
    macs = [f"52:54:00:7b:00:{i:02x}" for i in range(5)]
    assert [fetch(limited, mac)[0] for mac in macs] == [200, 200, 200, 429, 429]
    assert sorted(discovered(limited)) == macs[:3]
    assert fetch(limited, macs[0])[0] == 200  # a known node is not limited by its source
    assert 'bmi_boot_rate_limited_total{bucket="source"} 2.0' in scrape(limited)


def scrape(server: ServerProcess) -> str:
    with urllib.request.urlopen(f"http://{server.metrics_address}/metrics") as reply:
        return reply.read().decode()
