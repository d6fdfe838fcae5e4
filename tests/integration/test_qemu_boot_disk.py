"""Boot tests on QEMU (TCG): the test disk's boot sector, and chain.ipxe from the NIC's iPXE.

No BMI server, Ceph or tgtd: (a) boots the test disk as a local IDE drive, (b) lets iPXE
run chain.ipxe against a throwaway HTTP server that records what the node reported.
"""

from __future__ import annotations

import http.server
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from bmi_server.devenv.qemu_node import HOST_FROM_GUEST, QemuNode, write_chain_script
from bmi_server.devenv.test_disk import MARKER_RE, build_test_disk, read_boot_count

MARKER_TIMEOUT = 30.0  # the marker comes in well under 1 s from a local disk under TCG
IPXE_TIMEOUT = 45.0  # iPXE: ~8.5 s to its first HTTP request, plus the retry's 1 s sleep


def _marker(node: QemuNode) -> tuple[str, int, float]:
    """Wait for the boot marker; return (label, boot count, seconds since power-on)."""
    line = node.wait_for_serial(MARKER_RE.pattern, MARKER_TIMEOUT)
    elapsed = time.monotonic() - (node.powered_on_at or 0.0)
    match = MARKER_RE.fullmatch(line)
    assert match, line
    return match["label"], int(match["boot"]), elapsed


@pytest.fixture
def disk_node(tmp_path: Path) -> Iterator[tuple[QemuNode, str]]:
    """A node that boots a fresh test disk as its local drive, and that disk's label."""
    label = f"T-{uuid.uuid4().hex[:8]}"  # unique, so a stale log or disk cannot pass
    disk = build_test_disk(tmp_path / "disk.raw", label=label)
    node = QemuNode(
        "disk-node", "52:54:00:00:00:01", tmp_path / "tftp", tmp_path / "work",
        disk=disk, boot="c",
    )  # fmt: skip
    try:
        yield node, label
    finally:
        node.power_off()


def test_local_disk_boot_counts_and_persists_writes(
    disk_node: tuple[QemuNode, str],
) -> None:
    node, label = disk_node
    assert node.disk is not None
    for expected in (1, 2):
        node.power_on()
        seen_label, boot, elapsed = _marker(node)
        node.power_off()
        print(f"local disk boot {expected}: power-on to marker {elapsed:.2f} s")
        assert (seen_label, boot) == (label, expected)
        # The boot sector's write reached the image file, not just a cache in the guest.
        assert read_boot_count(node.disk) == expected
        assert "BMI-BOOT-ERROR" not in node.serial_text()


def test_reset_reboots_the_same_disk(disk_node: tuple[QemuNode, str]) -> None:
    node, _ = disk_node
    node.power_on()
    assert _marker(node)[1] == 1
    node.reset()
    # The serial log spans the reset: the second marker follows the first.
    node.wait_for_serial(r"boot=2\b", MARKER_TIMEOUT)
    assert [m["boot"] for m in MARKER_RE.finditer(node.serial_text())] == ["1", "2"]


class _BootHandler(http.server.BaseHTTPRequestHandler):
    """Fails the first /boot.ipxe with 503 (to exercise the retry), then answers a script."""

    requests: list[tuple[str, int]]  # (path with query, status sent); set per server
    answered: threading.Event
    port: int

    def do_GET(self) -> None:
        status = 503 if not self.requests else 200
        body = b"#!ipxe\necho hello from the test\nexit\n" if status == 200 else b""
        self.requests.append((self.path, status))
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if status == 200:
            self.answered.set()

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep pytest output clean


@pytest.fixture
def boot_server() -> Iterator[type[_BootHandler]]:
    """The handler class (its ``requests`` and ``answered``) of a server on a free port."""
    handler = type(
        "Handler", (_BootHandler,), {"requests": [], "answered": threading.Event(), "port": 0}
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


def test_chain_script_reports_node_identity(
    tmp_path: Path, boot_server: type[_BootHandler]
) -> None:
    tftp = tmp_path / "tftp"
    write_chain_script(tftp, f"{HOST_FROM_GUEST}:{boot_server.port}")
    # A serial with every character that breaks a query string or a QEMU option.
    serial = "SN 7/&x=y+1#%,é"
    node = QemuNode(
        "pxe-node", "52:54:00:ab:cd:ef", tftp, tmp_path / "work",
        serial=serial, uuid=str(uuid.uuid4()), manufacturer="Acme, Inc.", product="R&D Box",
    )  # fmt: skip
    try:
        node.power_on()
        assert boot_server.answered.wait(IPXE_TIMEOUT), (
            f"no successful /boot.ipxe within {IPXE_TIMEOUT} s; got {boot_server.requests}"
        )
        elapsed = time.monotonic() - (node.powered_on_at or 0.0)
        print(f"iPXE: power-on to answered /boot.ipxe (after one 503) {elapsed:.2f} s")
        screen = node.screendump(tmp_path / "screen")
        # After the script's "exit" chain.ipxe must stop, not retry (next retry would be 2 s).
        time.sleep(4)
    finally:
        node.power_off()

    assert [status for _, status in boot_server.requests] == [503, 200]
    first, second = (urlsplit(path) for path, _ in boot_server.requests)
    assert first == second  # the retry asks the same question
    assert second.path == "/boot.ipxe"
    query = parse_qs(second.query, keep_blank_values=True, strict_parsing=True)
    assert set(query) == {"mac", "uuid", "serial_hex", "manufacturer_hex", "product_hex"}
    reported = {key: values[0] for key, values in query.items() if len(values) == 1}
    assert reported["mac"] == node.mac
    assert reported["uuid"] == node.uuid
    assert bytes.fromhex(reported["serial_hex"]).decode() == serial
    assert bytes.fromhex(reported["manufacturer_hex"]).decode() == "Acme, Inc."
    assert bytes.fromhex(reported["product_hex"]).decode() == "R&D Box"
    assert screen.stat().st_size > 0
