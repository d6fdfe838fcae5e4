"""Hostile image files against a real server: refused, nothing read from the host, nothing
left behind (pool, spool, catalogue); long copies stop when their caller gives up."""

from __future__ import annotations

import subprocess
import time

import grpc
import pytest
from bmi.v1 import images_pb2
from bmi_client.client import BmiClient
from hostile_images import corpus
from server_process import ADMIN_TOKEN

from bmi_server.adapters.sandbox import Sandbox
from bmi_server.core.naming import volume_name

pytestmark = pytest.mark.ceph
SECRET = b"root:$6$this-must-never-reach-an-image$\n" * 200


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    secret = tmp / "secret"
    secret.write_bytes(SECRET)
    return tmp, secret, corpus(tmp, secret)


def test_the_data_file_fixture_really_reads_the_host_without_the_guards(hostile, tmp_path):
    # Unguarded qemu-img copies the named file into the image: what the checks stop.
    _tmp, _secret, files = hostile
    out = tmp_path / "leak.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", files["data-file"], out],
                   check=True, capture_output=True)
    assert out.read_bytes().startswith(SECRET[:100])


def test_the_sandbox_alone_stops_the_data_file_and_sees_no_host_files(hostile, tmp_path):
    _tmp, secret, files = hostile
    out = tmp_path / "out.raw"
    out.touch()
    sandbox = Sandbox()
    converted = sandbox.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", "/in/x.qcow2", "/out/x.raw"],
        read_only={"/in/x.qcow2": files["data-file"]}, writable={"/out/x.raw": out}, timeout=60,
    )
    assert converted.returncode != 0
    assert SECRET[:20] not in out.read_bytes()
    listing = sandbox.run(["ls", "-A", "/"], timeout=30)
    assert set(listing.stdout.split()) == {"bin", "dev", "lib", "lib64", "proc", "sbin", "tmp",
                                           "usr"}
    for host_file in ("/etc/shadow", str(secret), "/proc/1/root/etc/passwd"):
        assert sandbox.run(["cat", host_file], timeout=30).returncode != 0
    assert sandbox.run(["id", "-u"], timeout=30).stdout.strip() == "65534"


def test_every_hostile_upload_is_refused_and_leaves_nothing(
    hostile, server, alice, volumes, server_state
):
    tmp, _secret, files = hostile
    before = (volumes(), server_state())
    spool = server.state_dir / "spool"
    for name, path in sorted(files.items()):
        with pytest.raises(grpc.RpcError) as failed:
            alice.upload_image(path, f"hostile-{name}", format=images_pb2.IMAGE_FORMAT_QCOW2)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, failed.value)
        details = failed.value.details()
        assert str(tmp) not in details and str(server.state_dir) not in details, details
        assert "bmi-img-" not in details and "/in/" not in details, details
        assert (volumes(), server_state()) == before, name
        assert not list(spool.glob("*")), name


def test_a_raw_upload_above_the_size_limit_is_refused_before_any_byte(server, alice, tmp_path):
    # The limit applies to the declared size; the file is never read.
    header_only = tmp_path / "sparse.raw"
    with header_only.open("wb") as f:
        f.truncate((2 << 40) + 512)
    with pytest.raises(grpc.RpcError) as failed:
        alice.upload_image(header_only, "too-big", format=images_pb2.IMAGE_FORMAT_RAW)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "above this server's limit" in failed.value.details()


def test_a_long_copy_stops_at_the_callers_deadline_and_rolls_back(
    server, admin, volumes, server_state, ceph_cluster, rbd_store
):
    # A 4 TiB sparse image: importing copies only its data, but a copy flattens every
    # object of a clone, which takes far longer than the caller waits.
    source = "hostile-test-sparse-source"
    subprocess.run(["rbd", "-c", str(ceph_cluster.conf_path), "-p", ceph_cluster.pool,
                    "create", "--size", "4T", source], check=True, capture_output=True)
    big = admin.import_image("big-sparse", source, project="alice")
    before = (volumes(), server_state())
    impatient = BmiClient(server.address, ADMIN_TOKEN, timeout=2)
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as failed:
            impatient.copy_image(big.id, project="alice", name="big-copy")
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        impatient.close()
    # The server stops too and removes what it made (a finished copy would take minutes).
    while (volumes(), server_state()) != before and time.monotonic() - started < 30:
        time.sleep(0.5)
    assert (volumes(), server_state()) == before
    assert rbd_store.get(volume_name(big.id)).temporary_snapshots == ()
    assert "deadline passed" in server.log_path.read_text()
    admin.delete_image(big.id)
