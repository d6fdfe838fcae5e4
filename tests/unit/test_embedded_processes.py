"""The process and port helpers the embedded Ceph cluster and tgtd share."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from bmi_server.embedded.processes import alive, cmdline, free_port, port_free


def test_a_running_process_is_alive_and_shows_its_command_line():
    assert alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "x y"])
    try:
        deadline = time.monotonic() + 10
        while cmdline(child.pid)[:1] != [sys.executable] and time.monotonic() < deadline:
            time.sleep(0.01)  # until the child has exec'd
        assert alive(child.pid)
        assert cmdline(child.pid) == [sys.executable, "-c", "import time; time.sleep(30)",
                                      "x y", ""]
    finally:
        child.kill()
        child.wait()


def test_a_zombie_or_a_gone_process_is_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    try:
        assert not alive(child.pid)
    finally:
        child.wait()
    assert not alive(child.pid) and cmdline(child.pid) == []


def test_a_free_port_is_free_until_someone_listens_on_it():
    port = free_port()
    assert port_free("127.0.0.1", port)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        assert not port_free("127.0.0.1", port)
