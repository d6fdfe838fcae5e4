"""The zero-config server (no ceph_conf, no tgt_portal) keeps what it holds: its Ceph
cluster and tgtd live in state_dir, come back on restart (clean stop, kill -9 with the
daemons left running, stale pid files, a monitor port taken meanwhile), the images and
disks are still there and readable over iSCSI at the portal it logs, and the daemons stop
with the server. A cluster made afresh behind the catalogue's back leaves records that say
MISSING, never an internal volume name."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from bmi.v1 import images_pb2, nodes_pb2
from bmi_client.client import BmiClient
from server_process import ADMIN_TOKEN, ServerProcess, free_port

from bmi_server.embedded import EmbeddedServices
from bmi_server.embedded.processes import alive, cmdline

MAC = "52:54:00:7b:00:01"
DAEMONS = ("mon.a", "osd.0")


@pytest.fixture
def zero_config(tmp_path_factory):
    """A zero-config server on a fresh state_dir (short: Ceph's admin sockets live there).
    Whatever a test leaves running is stopped by the PIDs recorded in state_dir."""
    base = tmp_path_factory.mktemp("zc")
    server = ServerProcess(base / "state", "", "rbd", log_path=base / "server.log",
                           extra_env={"TMPDIR": str(base), "BMI_SESSION_SWEEP_SECONDS": "1"})
    yield server
    server.stop()
    with EmbeddedServices(server.state_dir) as embedded:
        embedded.stop_left_running()


def daemon_pids(state: Path) -> dict[str, int]:
    """The embedded daemons of ``state`` that run now, by name (their pid files, checked)."""
    running = {}
    for name in DAEMONS:
        pid_file = state / "ceph" / "run" / f"{name}.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text())
            if alive(pid) and str(state / "ceph" / "ceph.conf") in " ".join(cmdline(pid)):
                running[name] = pid
    tgtd = json.loads((state / "tgtd" / "tgtd.json").read_text())
    if alive(tgtd["pid"]) and cmdline(tgtd["pid"])[:1] == ["tgtd"]:
        running["tgtd"] = tgtd["pid"]
    return running


def logged_portal(server: ServerProcess, since: int) -> str:
    """The embedded tgtd's portal as this start logged it (the log after ``since``)."""
    log = server.log()[since:]
    found = re.search(r"embedded tgtd (?:started|adopted[^:]*): iSCSI portal (\S+)", log)
    assert found, log
    told = re.search(r"nodes are told to log in to their iSCSI targets at (\S+?)[ \n]", log)
    assert told and told.group(1) == found.group(1), log
    assert re.search(r"boot scripts on http://\S+/boot\.ipxe", log)
    return found.group(1)


def restart(server: ServerProcess, *, kill: bool = False) -> int:
    """Stop (or kill -9) and start again; the log's length before the new start."""
    if kill:
        server.kill()
    else:
        server.stop()
    mark = len(server.log())
    server.start(wait=False)
    server.wait_serving(timeout=120)
    return mark


def boot_credentials(server: ServerProcess, mac: str) -> dict[str, str]:
    with urllib.request.urlopen(f"http://{server.http_address}/boot.ipxe?mac={mac}") as reply:
        script = reply.read().decode()
    found = dict(re.findall(r"^set (initiator-iqn|username|password) (\S+)$", script, re.M))
    return {"initiator": found["initiator-iqn"], "user": found["username"],
            "password": found["password"]}


def iscsi_ls(portal: str, creds: dict[str, str]) -> str:
    url = f"iscsi://{creds['user']}%{creds['password']}@{portal}"
    done = subprocess.run(["iscsi-ls", "-s", "-i", creds["initiator"], url],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def read_lun(portal: str, iqn: str, creds: dict[str, str], folder: Path) -> bytes:
    secret, out = folder / "chap", folder / "lun.raw"
    secret.write_text(creds["password"])
    out.unlink(missing_ok=True)
    opts = (f"driver=iscsi,transport=tcp,portal={portal},target={iqn},lun=1,"
            f"user={creds['user']},password-secret=chap,initiator-name={creds['initiator']}")
    subprocess.run(["qemu-img", "convert", "-O", "raw", "--object",
                    f"secret,id=chap,file={secret}", "--image-opts", opts, str(out)],
                   check=True, capture_output=True, timeout=120)
    return out.read_bytes()


@pytest.mark.ceph
def test_images_disks_and_targets_survive_every_kind_of_restart(zero_config, raw_image,
                                                                tmp_path):
    server, state = zero_config, zero_config.state_dir
    server.start(wait=False)
    server.wait_serving(timeout=120)
    portal = logged_portal(server, 0)
    assert "embedded Ceph cluster made in" in server.log()
    with BmiClient(server.address, ADMIN_TOKEN, timeout=60) as admin:
        image = admin.upload_image(raw_image, "golden", project="ops")
        admin.enroll_node("zc-node", "ops", macs=[MAC])
        node = admin.provision_node("zc-node", image="golden")
    creds = boot_credentials(server, MAC)
    data = raw_image.read_bytes()
    assert read_lun(portal, node.target.iqn, creds, tmp_path) == data
    running = daemon_pids(state)
    assert set(running) == {"mon.a", "osd.0", "tgtd"}

    def still_all_there(mark: int) -> None:
        assert logged_portal(server, mark) == portal  # where nodes were told to log in
        with BmiClient(server.address, ADMIN_TOKEN, timeout=60) as admin:
            got = admin.get_image(image.id)
            assert got.state == images_pb2.RESOURCE_STATE_READY
            disk = admin.get_disk(node.disk_id)  # asks Ceph for its usage: it is there
            assert disk.state == images_pb2.RESOURCE_STATE_READY
            assert admin.get_node("zc-node").target.iqn == node.target.iqn
        assert node.target.iqn in iscsi_ls(portal, creds)  # the target is back in tgtd
        assert read_lun(portal, node.target.iqn, creds, tmp_path) == data

    # 1. A clean stop stops the daemons by PID; a start brings the data back.
    mark = restart(server)
    assert not any(alive(pid) for pid in running.values())  # they were stopped
    assert "embedded Ceph cluster in" in server.log()[mark:]
    assert "started again" in server.log()[mark:]
    still_all_there(mark)

    # 2. kill -9: the daemons run on, and the next start adopts them.
    running = daemon_pids(state)
    mark = restart(server, kill=True)
    assert daemon_pids(state) == running
    assert "adopted mon.a, osd.0" in server.log()[mark:]
    assert "embedded tgtd adopted" in server.log()[mark:]
    still_all_there(mark)

    # 3. Stale pid files naming live processes that are not the daemons, and the monitor's
    # port taken by another program meanwhile.
    server.stop()
    assert daemon_pids(state) == {}
    for name in DAEMONS:
        (state / "ceph" / "run" / f"{name}.pid").write_text(f"{os.getpid()}\n")
    recorded = json.loads((state / "tgtd" / "tgtd.json").read_text())
    (state / "tgtd" / "tgtd.json").write_text(json.dumps({**recorded, "pid": os.getpid()}))
    mon_port = json.loads((state / "ceph" / "cluster.json").read_text())["port"]
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", mon_port))
        squatter.listen()
        mark = len(server.log())
        server.start(wait=False)
        server.wait_serving(timeout=120)
        assert f"Ceph monitor port {mon_port} is taken by another program" in server.log()
        still_all_there(mark)
    assert json.loads((state / "ceph" / "cluster.json").read_text())["port"] != mon_port

    # The server's stop stops everything it ran.
    running = daemon_pids(state)
    server.stop()
    assert not any(alive(pid) for pid in running.values())


@pytest.mark.ceph
def test_a_second_server_on_the_same_state_dir_is_refused(zero_config, tmp_path):
    zero_config.start(wait=False)
    zero_config.wait_serving(timeout=120)
    second = ServerProcess(zero_config.state_dir, "", "rbd", log_path=tmp_path / "second.log")
    second.start(wait=False)
    assert second.wait_exit(60) != 0
    assert "another bmi-server serves from state_dir" in second.log()
    # An admin command uses the running cluster and leaves it running.
    before = daemon_pids(zero_config.state_dir)
    done = subprocess.run([sys.executable, "-m", "bmi_server.main", "admin", "reconcile"],
                          env=zero_config.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "catalogue and image store agree" in done.stdout
    assert daemon_pids(zero_config.state_dir) == before


@pytest.mark.ceph
def test_a_cluster_made_afresh_leaves_records_that_say_missing(zero_config, raw_image):
    """What a first user met: the cluster is new (here: its directory deleted while the
    server was stopped) and the catalogue is not. The records say MISSING; using them is
    refused in words that name the record, never its volume; they can be cleaned up."""
    server = zero_config
    server.start(wait=False)
    server.wait_serving(timeout=120)
    with BmiClient(server.address, ADMIN_TOKEN, timeout=60) as admin:
        admin.upload_image(raw_image, "golden", project="ops")
        admin.enroll_node("zc-node", "ops", macs=[MAC])
        node = admin.provision_node("zc-node", image="golden")
    server.stop()
    subprocess.run(["rm", "-rf", str(server.state_dir / "ceph")], check=True)
    server.start(wait=False)
    server.wait_serving(timeout=120)
    assert "is missing from the image store: marked missing" in server.log()
    with BmiClient(server.address, ADMIN_TOKEN, timeout=60) as admin:
        (image,) = admin.list_images()
        assert image.state == images_pb2.RESOURCE_STATE_MISSING
        disk = admin.get_disk(node.disk_id)  # no NOT_FOUND naming bmi-dsk-...
        assert disk.state == images_pb2.RESOURCE_STATE_MISSING and disk.used_bytes == 0
        admin.enroll_node("zc-other", "ops", macs=["52:54:00:7b:00:02"])
        with pytest.raises(grpc.RpcError) as refused:
            admin.provision_node("zc-other", image="golden")
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "image 'golden' is missing" in refused.value.details()
        assert "bmi-" not in refused.value.details()
        # Cleaning up works: the node's target and disk go, then the image.
        gone = admin.deprovision_node("zc-node")
        assert gone.state == nodes_pb2.NODE_STATE_AVAILABLE
        admin.delete_image(image.id)
        assert list(admin.list_images()) == [] and list(admin.list_disks()) == []


def _hold_session(portal: str, iqn: str, creds: dict[str, str], folder: Path):
    """qemu-io with the LUN open: an iSCSI session until its stdin closes."""
    secret = folder / "chap-hold"
    secret.write_text(creds["password"])
    opts = (f"driver=iscsi,transport=tcp,portal={portal},target={iqn},lun=1,"
            f"user={creds['user']},password-secret=chap,initiator-name={creds['initiator']}")
    return subprocess.Popen(["qemu-io", "--object", f"secret,id=chap,file={secret}",
                             "--image-opts", opts], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for(predicate, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.ceph
def test_a_nodes_session_is_recorded_seen_and_ended(zero_config, raw_image, tmp_path):
    """An initiator (qemu-io) logs in to a booting node's target: the node is ACTIVE with
    its session logged in; the initiator goes (a powered-off machine): the session is
    recorded ended, the node stays ACTIVE; it logs in again: seen again. In the metrics
    too."""
    metrics = f"127.0.0.1:{free_port()}"
    server = zero_config
    server.env["BMI_METRICS_LISTEN"] = metrics
    server.env["BMI_SESSION_POLL_SECONDS"] = "0.5"
    server.start(wait=False)
    server.wait_serving(timeout=120)
    portal = logged_portal(server, 0)
    with BmiClient(server.address, ADMIN_TOKEN, timeout=60) as admin:
        admin.upload_image(raw_image, "golden", project="ops")
        admin.enroll_node("zc-node", "ops", macs=[MAC])
        node = admin.provision_node("zc-node", image="golden")
        assert node.session.state == nodes_pb2.SESSION_STATE_NONE
        creds = boot_credentials(server, MAC)  # fetching its script: BOOTING
        holder = _hold_session(portal, node.target.iqn, creds, tmp_path)
        try:
            on = wait_for(lambda: (n := admin.get_node("zc-node")).state
                          == nodes_pb2.NODE_STATE_ACTIVE and n, "the node to become active")
            assert on.session.state == nodes_pb2.SESSION_STATE_LOGGED_IN
            assert 'bmi_node_sessions{session="logged_in"} 1.0' in scrape(metrics)
        finally:
            holder.stdin.close()
            holder.wait(30)
        off = wait_for(lambda: (n := admin.get_node("zc-node")).session.state
                       == nodes_pb2.SESSION_STATE_ENDED and n, "the session to be ended")
        assert off.state == nodes_pb2.NODE_STATE_ACTIVE  # no lifecycle move
        assert off.session.time.ToDatetime() >= on.session.time.ToDatetime()
        assert 'bmi_node_sessions{session="ended"} 1.0' in scrape(metrics)
        listed = next(n for n in admin.list_nodes() if n.name == "zc-node")
        assert listed.session.state == nodes_pb2.SESSION_STATE_ENDED
        holder = _hold_session(portal, node.target.iqn, creds, tmp_path)
        try:
            wait_for(lambda: admin.get_node("zc-node").session.state
                     == nodes_pb2.SESSION_STATE_LOGGED_IN, "the session to be seen again")
        finally:
            holder.stdin.close()
            holder.wait(30)


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        return reply.read().decode()
