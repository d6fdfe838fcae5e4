"""TgtdSocketRunner without tgtd: the bytes it sends (as tgtadm 1.0.85 sends them) and how it
answers for each kind of reply. tests/integration/test_tgt_driver.py runs it against tgtd."""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from bmi_server.adapters.tgt.control_socket import TgtdSocketRunner, parse

BASE = ["tgtadm", "--lld", "iscsi", "-C", "3"]

# What the installed tgtadm (tgt 1.0.85) wrote to tgtd's socket for these command lines,
# recorded with strace.
GOLDEN = {
    ("--op", "new", "--mode", "logicalunit", "--tid", "7", "--lun", "1", "--bstype", "rbd",
     "--backing-store", "rbd/vol", "--bsopts", "conf=/x.conf;id=admin"):
        "020000000000000069736373690000000000000000000000000000000000000000000000000000000000"
        "000000000000000000000000000000000000000000000000000000000000ad0000000700000000000000"
        "000000000100000000000000000000000000000000000000000000000000000000000000706174683d72"
        "62642f766f6c2c6273747970653d7262642c62736f7074733d636f6e663d2f782e636f6e663b69643d61"
        "646d696e00",
    ("--op", "delete", "--mode", "target", "--force", "--tid", "7"):
        "010000000100000069736373690000000000000000000000000000000000000000000000000000000000"
        "000000000000000000000000000000000000000000000000000000000000780000000700000000000000"
        "00000000ffffffffffffffff000000000000000000000000000000000000000001000000",
    ("--op", "new", "--mode", "account", "--user", "u1", "--password", "p1"):
        "070000000000000069736373690000000000000000000000000000000000000000000000000000000000"
        "0000000000000000000000000000000000000000000000000000000000008c000000ffffffff00000000"
        "00000000ffffffffffffffff000000000000000000000000000000000000000000000000757365723d75"
        "312c70617373776f72643d703100",
}  # fmt: skip


@pytest.mark.parametrize("args", list(GOLDEN))
def test_requests_are_byte_for_byte_what_tgtadm_sends(args):
    assert parse([*BASE, *args]).encode().hex() == GOLDEN[args]


class FakeTgtd:
    """Listens on socket.3 in a temporary directory and answers each request from a script."""

    def __init__(self, directory) -> None:
        self.path = directory / "socket.3"
        self.replies: list[bytes] = []
        self.requests: list[bytes] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(self.path))
        self._server.listen(4)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with conn:
                header = conn.recv(120, socket.MSG_WAITALL)
                (length,) = struct.unpack_from("<I", header, 72)
                rest = conn.recv(length - 120, socket.MSG_WAITALL) if length > 120 else b""
                self.requests.append(header + rest)
                conn.sendall(self.replies.pop(0))

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def tgtd(tmp_path):
    fake = FakeTgtd(tmp_path)
    yield fake
    fake.close()


def reply(err: int, text: bytes = b"") -> bytes:
    return struct.pack("<II", err, 8 + len(text)) + text


def test_show_returns_the_text_tgtd_sends(tgtd, tmp_path):
    listing = b"Target 1: iqn.x:a\n    System information:\n" * 300  # longer than one read
    tgtd.replies.append(reply(0, listing + b"\0"))  # tgtd ends its text with a NUL
    run = TgtdSocketRunner(socket_dir=tmp_path)
    assert run([*BASE, "--op", "show", "--mode", "target"]) == (0, listing.decode(), "")
    assert len(tgtd.requests[0]) == 120


def test_refusals_carry_tgtadm_s_exit_code_and_message(tgtd, tmp_path):
    run = TgtdSocketRunner(socket_dir=tmp_path)
    for code, message in ((9, "this target already exists"), (4, "can't find the target"),
                          (15, "can't find the account"), (99, "(unknown tgtadm_errno)")):
        tgtd.replies.append(reply(code))
        assert run([*BASE, "--op", "new", "--mode", "target", "--tid", "1", "-T", "iqn.x:a"]) \
            == (22, "", f"tgtadm: {message}\n")


def test_no_daemon_is_an_unreachable_tgt_daemon(tmp_path):
    rc, out, err = TgtdSocketRunner(socket_dir=tmp_path)([*BASE, "--op", "show", "--mode", "sys"])
    assert rc < 0 and out == "" and "can't connect to the tgt daemon" in err


def test_a_daemon_that_hangs_up_mid_answer_is_unreachable(tgtd, tmp_path):
    tgtd.replies.append(struct.pack("<II", 0, 500) + b"partial")
    rc, _, err = TgtdSocketRunner(socket_dir=tmp_path)([*BASE, "--op", "show", "--mode", "sys"])
    assert rc < 0 and "closed the connection" in err


@pytest.mark.parametrize("args", [("--op", "frob", "--mode", "target"),
                                  ("--op", "show"), ("--op", "show", "--mode", "target", "--tid"),
                                  ("--op", "show", "--mode", "target", "--tid", "x"),
                                  ("--op", "show", "--mode", "target", "--bogus", "1")])
def test_command_lines_it_cannot_translate_are_refused_without_contacting_tgtd(args, tmp_path):
    rc, out, err = TgtdSocketRunner(socket_dir=tmp_path)([*BASE, *args])
    assert rc == 22 and out == "" and err.startswith("tgtadm: ")
