"""Secrets at rest: what bmi-server keeps in its state directory (the SQLite database with
the CHAP secrets, its -wal and -shm, the token file, the Ceph client record, the upload
spool) is its user's alone, whether the server makes it or finds it left by a looser run;
secret files the operator keeps elsewhere are reported, not changed. bmi-gateway runs with
the same umask and reports a token file other users can read."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bmi.v1 import nodes_pb2
from bmi_client.client import BmiClient
from server_process import ADMIN_TOKEN, ServerProcess, free_port, write_tokens

from bmi_server.devenv.tgtd import _free_control

# What the server makes in its state directory, at least (a test's own files kept out; the
# spool appears with the first upload that needs a spool file, a qcow2 one).
STATE_FILES = {"bmi.sqlite3", "bmi.sqlite3-wal", "bmi.sqlite3-shm", "tokens", "ceph-client"}
# ...and a zero-config server besides: its own Ceph cluster and tgtd, kept there.
EMBEDDED_FILES = {"ceph", "tgtd", "embedded.lock"}


def not_private(root: Path) -> dict[str, str]:
    """The paths under ``root`` (``root`` itself as ".") whose mode is not the private one,
    0700 for a directory and 0600 for anything else (a socket: nothing for group and others),
    with their modes."""
    found = {}
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        mode = stat.S_IMODE(info.st_mode)
        if stat.S_ISSOCK(info.st_mode):
            if mode & 0o077:
                found[str(path.relative_to(root))] = f"{mode:04o}"
        elif mode != (0o700 if path.is_dir() else 0o600):
            found[str(path.relative_to(root))] = f"{mode:04o}"
    return found


def umask_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError(f"no Umask line in /proc/{pid}/status")


def wait_for_log(log_path: Path, proc: subprocess.Popen, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = log_path.read_text() if log_path.exists() else ""
        if text in log:
            return log
        if proc.poll() is not None:
            raise AssertionError(f"exited before logging {text!r}:\n{log}")
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not logged in {timeout} s")


@pytest.mark.ceph
def test_zero_config_server_makes_its_state_private(tmp_path_factory, raw_image):
    """A server started by hand with no settings, so with its own Ceph cluster (cephx) and
    tgtd in its state directory: everything it makes is private, the cluster's data and keys
    included, and tgtd opens disks as the cluster's least-privileged client."""
    base = tmp_path_factory.mktemp("zc")  # short: Ceph's admin sockets go under TMPDIR
    state = base / "state"
    server = ServerProcess(state, "", "rbd", log_path=base / "server.log", test_tokens=False,
                           extra_env={"TMPDIR": str(base)})
    server.start()
    try:
        assert umask_of(server.proc.pid) == 0o077
        token = next(line.split()[0] for line in (state / "tokens").read_text().splitlines()
                     if line and not line.startswith("#"))
        with BmiClient(server.address, token, timeout=60) as admin:
            admin.upload_image(raw_image, "private", project="ops")
            admin.enroll_node("zc-node", "ops", macs=["52:54:00:7a:00:01"])
            node = admin.provision_node("zc-node", image="private")
            assert node.state == nodes_pb2.NODE_STATE_PROVISIONED
        assert {p.name for p in state.iterdir()} >= STATE_FILES | EMBEDDED_FILES
        assert not_private(state) == {}
        assert "clientid bmi-tgt" in (state / "tgtd" / "tgtd.log").read_text()
    finally:
        server.stop()


@pytest.mark.ceph
def test_loose_state_files_are_tightened_and_an_outside_token_file_reported(
    ceph_cluster, tgtd, tmp_path
):
    state = tmp_path / "state"
    tokens = tmp_path / "etc" / "tokens"  # the operator's, outside the state directory
    tokens.parent.mkdir()
    write_tokens(tokens)
    tokens.chmod(0o644)
    server = ServerProcess(state, str(ceph_cluster.conf_path), ceph_cluster.pool, tgtd=tgtd,
                           log_path=tmp_path / "server.log", test_tokens=False,
                           extra_env={"BMI_TOKEN_FILE": str(tokens)})
    server.start()
    server.kill()  # as a crash does: the database's -wal and -shm stay behind
    (state / "spool").mkdir(exist_ok=True)  # as a qcow2 upload makes it
    (state / "spool" / "bmi-upload-left.qcow2").write_bytes(b"part of an upload")
    for path in [state, *state.rglob("*")]:  # as a looser run (or a cp) leaves them
        path.chmod(0o755 if path.is_dir() else 0o644)
    assert {"bmi.sqlite3-wal", "bmi.sqlite3-shm"} <= {p.name for p in state.iterdir()}
    assert len(not_private(state)) >= 6

    server.start()
    try:
        assert not_private(state) == {}
        log = wait_for_log(server.log_path, server.proc, f"token_file {tokens} is mode 0644")
        assert f"{state / 'bmi.sqlite3'} was mode 0644" in log
        assert stat.S_IMODE(tokens.stat().st_mode) == 0o644  # the operator's to change
        with BmiClient(server.address, ADMIN_TOKEN, timeout=60) as admin:
            assert list(admin.list_images()) == []  # the tightened database still works
    finally:
        server.stop()


def test_gateway_runs_with_a_private_umask_and_reports_a_shared_token_file(tmp_path):
    token = tmp_path / "gateway-token"
    token.write_text("a-gateway-token\n")
    token.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BMI_GATEWAY_")}
    env.update({
        "BMI_GATEWAY_NAME": "gw-modes",
        "BMI_GATEWAY_TOKEN_FILE": str(token),
        "BMI_GATEWAY_SERVER": f"127.0.0.1:{free_port()}",  # nobody there: it keeps retrying
        "BMI_GATEWAY_TGT_PORTAL": f"127.0.0.1:{free_port()}",
        "BMI_GATEWAY_TGT_CONTROL": str(_free_control()),  # no tgtd: nothing to change
    })  # fmt: skip
    log_path = tmp_path / "gateway.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bmi_gateway.main"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        log = wait_for_log(log_path, proc, "bmi-gateway gw-modes following")
        assert f"token_file {token} is mode 0644" in log
        assert umask_of(proc.pid) == 0o077
        assert stat.S_IMODE(token.stat().st_mode) == 0o644
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
