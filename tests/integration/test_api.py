"""The bmi.v1 API through real gRPC, a real bmi-server process and a real Ceph cluster."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import rbd
from bmi.v1 import images_pb2, images_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_process import ADMIN_TOKEN, TENANT_TOKENS

MIB = 1 << 20


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as failed:
        call()
    return failed.value.code()


def details_of(call) -> str:
    with pytest.raises(grpc.RpcError) as failed:
        call()
    return failed.value.details()


def read_volume(ioctx, name: str, length: int, offset: int = 0) -> bytes:
    with rbd.Image(ioctx, name, read_only=True) as image:
        return image.read(offset, length)


def test_health_and_reflection_are_served(server):
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service="bmi.v1.ImageService"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),),
        )
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert {"bmi.v1.ImageService", "bmi.v1.DiskService"} <= names
        # Without credentials, only health is served.
        anonymous = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        assert code_of(lambda: list(anonymous)) == grpc.StatusCode.UNAUTHENTICATED


def test_every_rpc_needs_credentials(server, client_for):
    anonymous = client_for("nonsense-token")
    assert code_of(lambda: list(anonymous.list_images())) == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(server.address) as channel:
        bare = images_pb2_grpc.ImageServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            bare.ListImages(images_pb2.ListImagesRequest(), timeout=5)
        assert failed.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_upload_qcow2_clone_and_read_back(alice, raw_and_qcow2, ioctx):
    raw, qcow2 = raw_and_qcow2
    image = alice.upload_image(qcow2, "guest")
    assert image.state == images_pb2.RESOURCE_STATE_READY
    assert image.size_bytes == raw.stat().st_size
    assert image.rbd_name == ""  # pool names are for admins only
    disk = alice.create_disk("node-1", "guest")
    volume = "bmi-" + disk.id
    head = raw.read_bytes()[: MIB]
    assert read_volume(ioctx, volume, MIB) == head
    shown = alice.get_disk("node-1")
    assert shown.image_id == image.id and shown.size_bytes == image.size_bytes
    assert shown.used_bytes == 0  # a fresh clone owns no data of its own
    with rbd.Image(ioctx, volume) as vol:
        vol.write(b"\xab" * 4096, 0)
    assert alice.get_disk("node-1").used_bytes > 0
    alice.delete_disk("node-1")
    alice.delete_image("guest")


def test_snapshot_is_flattened_and_outlives_its_disk(alice, raw_image, ioctx):
    alice.upload_image(raw_image, "base")
    disk = alice.create_disk("d1", "base")
    with rbd.Image(ioctx, "bmi-" + disk.id) as vol:
        vol.write(b"node wrote this", 0)
    snap = alice.snapshot_disk("d1", "d1-snap")
    assert snap.kind == images_pb2.IMAGE_KIND_SNAPSHOT and snap.source == disk.id
    with rbd.Image(ioctx, "bmi-" + snap.id, read_only=True) as vol, pytest.raises(
        rbd.ImageNotFound
    ):
        vol.parent_info()  # flattened: no parent
    alice.delete_disk("d1")
    assert read_volume(ioctx, "bmi-" + snap.id, 15) == b"node wrote this"
    clone = alice.create_disk("from-snap", "d1-snap")
    assert read_volume(ioctx, "bmi-" + clone.id, 15) == b"node wrote this"
    alice.delete_disk("from-snap")
    alice.delete_image("d1-snap")
    alice.delete_image("base")


def test_deleting_an_image_with_disks_names_them(alice, raw_image):
    alice.upload_image(raw_image, "busy")
    alice.create_disk("n1", "busy")
    alice.create_disk("n2", "busy")
    message = details_of(lambda: alice.delete_image("busy"))
    assert "n1" in message and "n2" in message
    assert code_of(lambda: alice.delete_image("busy")) == grpc.StatusCode.FAILED_PRECONDITION
    assert alice.get_image("busy").state == images_pb2.RESOURCE_STATE_READY
    alice.delete_disk("n1")
    alice.delete_disk("n2")
    alice.delete_image("busy")


def test_tenants_are_isolated(alice, bob, admin, raw_image):
    alice.upload_image(raw_image, "secret")
    secret = alice.get_image("secret")
    assert "secret" not in [i.name for i in bob.list_images()]
    assert code_of(lambda: bob.get_image(secret.id)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: bob.create_disk("steal", secret.id)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: bob.delete_image(secret.id)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: list(bob.list_images(project="alice"))) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    admin.upload_image(raw_image, "golden", project="ops",
                       visibility=images_pb2.VISIBILITY_PUBLIC)
    assert "golden" in [i.name for i in bob.list_images()]
    disk = bob.create_disk("mine", "golden")
    assert disk.project == "bob"
    assert code_of(lambda: alice.get_disk(disk.id)) == grpc.StatusCode.NOT_FOUND
    assert admin.get_image(secret.id).rbd_name == "bmi-" + secret.id
    bob.delete_disk("mine")
    admin.delete_image("golden")
    alice.delete_image("secret")


def test_bad_input_gets_the_right_code_and_changes_nothing(alice, admin, raw_image, tmp_path,
                                                            volumes):
    alice.upload_image(raw_image, "exists")
    before = volumes()
    corrupt = tmp_path / "corrupt.qcow2"
    corrupt.write_bytes(b"QFI\xfb" + b"\xff" * 4092)
    cases = {
        grpc.StatusCode.INVALID_ARGUMENT: [
            lambda: alice.upload_image(corrupt, "broken"),
            lambda: alice.upload_image(raw_image, ""),
            lambda: alice.upload_image(raw_image, "x" * 300),
            lambda: alice.upload_image(raw_image, "bad/name"),
            lambda: alice.create_disk("", "exists"),
            lambda: alice.get_image("../../etc/passwd"),
            lambda: alice.list_images_page(page_token="garbage"),
        ],
        grpc.StatusCode.ALREADY_EXISTS: [lambda: alice.upload_image(raw_image, "exists")],
        grpc.StatusCode.NOT_FOUND: [
            lambda: alice.get_image("img-0000000000000000"),
            lambda: alice.get_disk("nope"),
            lambda: alice.create_disk("d", "no-such-image"),
            lambda: admin.import_image("imp", "no-such-rbd-image", project="ops"),
        ],
        grpc.StatusCode.PERMISSION_DENIED: [
            lambda: alice.upload_image(raw_image, "p", visibility=images_pb2.VISIBILITY_PUBLIC),
            lambda: alice.import_image("imp", "anything"),
            lambda: alice.upload_image(raw_image, "x", project="bob"),
        ],
    }
    for expected, calls in cases.items():
        for call in calls:
            assert code_of(call) == expected
    assert volumes() == before
    assert [i.name for i in alice.list_images()] == ["exists"]
    alice.delete_image("exists")


def test_import_from_pool_copy_and_rename(admin, alice, ioctx, ceph_cluster):
    rbd.RBD().create(ioctx, "site-golden", 8 * MIB)
    with rbd.Image(ioctx, "site-golden") as src:
        src.write(b"golden bytes", 0)
    image = admin.import_image("site", "site-golden", project="ops",
                               visibility=images_pb2.VISIBILITY_PUBLIC)
    assert image.size_bytes == 8 * MIB
    assert read_volume(ioctx, "bmi-" + image.id, 12) == b"golden bytes"
    assert "site-golden" in rbd.RBD().list(ioctx)  # the source is copied, not taken
    copy = alice.copy_image("site", name="my-site")
    assert (copy.project, copy.kind) == ("alice", images_pb2.IMAGE_KIND_COPY)
    assert read_volume(ioctx, "bmi-" + copy.id, 12) == b"golden bytes"
    admin.delete_image(image.id)  # the copy is independent
    renamed = alice.update_image("my-site", name="renamed")
    assert renamed.id == copy.id and alice.get_image("renamed").id == copy.id
    assert code_of(lambda: alice.get_image("my-site")) == grpc.StatusCode.NOT_FOUND
    alice.delete_image("renamed")
    rbd.RBD().remove(ioctx, "site-golden")


def test_import_never_copies_a_volume_bmi_manages(server, admin, alice, bob, raw_image, ioctx,
                                                   ceph_cluster, server_state, tmp_path):
    secret = alice.upload_image(raw_image, "alices-os")
    bobs_os = bob.upload_image(raw_image, "bobs-os")
    disk = bob.create_disk("bobs-disk", bobs_os.id)
    # Under other names, as a pool admin could make them with librbd: a copy of Bob's
    # disk (its bmi.* keys come along), and a clone of Alice's image stripped of them.
    with rbd.Image(ioctx, "bmi-" + disk.id, read_only=True) as source:
        source.copy(ioctx, "copied-disk")
    rbd.RBD().clone(ioctx, "bmi-" + secret.id, "bmi-golden", ioctx, "stripped-clone")
    with rbd.Image(ioctx, "stripped-clone") as clone:
        for key, _ in list(clone.metadata_list()):
            clone.metadata_remove(key)
    pool_before, catalogue_before = set(rbd.RBD().list(ioctx)), server_state()

    refusals = set()
    for source in ("bmi-" + disk.id, "bmi-" + secret.id, "bmi-dsk-0000000000000000",
                   "copied-disk", "stripped-clone"):  # fmt: skip
        with pytest.raises(grpc.RpcError) as refused:
            admin.import_image("x", source, project="other")
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, refused.value.details()
        refusals.add(refused.value.details())
    (message,) = refusals  # one answer: whether it exists, and whose, stays unsaid
    for unsaid in (disk.id, secret.id, "bob", "alice", "copied", "stripped", "bmi-img", "bmi-dsk",
                   str(ceph_cluster.conf_path), str(server.state_dir)):  # fmt: skip
        assert unsaid not in message
    # Names librbd would choke on, or never take, are refused before they reach it.
    for source in ("a" * 5000, "a\x00b", "pool/image", "image@snap", "tab\there"):
        assert details_of(lambda s=source: admin.import_image("x", s, project="other")) == (
            "source_rbd_image must be 1 to 255 letters, digits, '.', '_' and '-', starting "
            "with a letter, digit or '_'")
        assert code_of(lambda s=source: admin.import_image("x", s, project="other")) == (
            grpc.StatusCode.INVALID_ARGUMENT)
    missing = details_of(lambda: admin.import_image("x", "no-such-volume", project="other"))
    assert str(ceph_cluster.conf_path) not in missing and "bmi-" not in missing
    assert set(rbd.RBD().list(ioctx)) == pool_before and server_state() == catalogue_before

    # The bmi CLI, as an admin would type it.
    env = {"BMI_SERVER": server.address, "BMI_TOKEN": ADMIN_TOKEN, "PATH": os.environ["PATH"],
           "HOME": str(tmp_path)}
    cli = subprocess.run([str(Path(sys.executable).parent / "bmi"), "image", "import", "x",
                          "--rbd", "bmi-" + disk.id, "--project", "other"],
                         env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert cli.returncode == 1 and "PERMISSION_DENIED" in cli.stderr and disk.id not in cli.stderr
    assert set(rbd.RBD().list(ioctx)) == pool_before and server_state() == catalogue_before

    rbd.RBD().remove(ioctx, "stripped-clone")
    rbd.RBD().remove(ioctx, "copied-disk")
    bob.delete_disk(disk.id)
    bob.delete_image(bobs_os.id)
    alice.delete_image(secret.id)


def test_paging_through_grpc(alice, raw_image):
    for n in range(5):
        alice.upload_image(raw_image, f"p{n}")
    page = alice.list_images_page(page_size=2)
    assert len(page.images) == 2 and page.next_page_token
    assert [i.name for i in alice.list_images(page_size=2)] == [f"p{n}" for n in range(5)]
    for n in range(5):
        alice.delete_image(f"p{n}")


def test_64mib_import_100_clones_snapshot_and_delete_leaves_nothing(
    admin, raw_and_qcow2, volumes, server_state
):
    before = volumes()
    _, qcow2 = raw_and_qcow2
    image = admin.upload_image(qcow2, "golden64", project="ops")
    assert image.size_bytes == 64 * MIB
    disks = [admin.create_disk(f"node-{n:03d}", image.id, project="ops") for n in range(100)]
    assert len({d.id for d in disks}) == 100
    snap = admin.snapshot_disk(disks[0].id, "node-000-snap")
    assert len(volumes()) == len(before) + 102
    for disk in disks:
        admin.delete_disk(disk.id)
    admin.delete_image(snap.id)
    admin.delete_image(image.id)
    assert volumes() == before
    assert server_state() == ([], [])


def test_cli_against_the_server(server, raw_image, tmp_path):
    env = {"BMI_SERVER": server.address, "BMI_TOKEN": TENANT_TOKENS["alice"],
           "PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    bmi_command = str(Path(sys.executable).parent / "bmi")

    def bmi(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([bmi_command, *args], env=env, capture_output=True, text=True,
                              timeout=60)

    assert bmi("image", "import", "cli-img", "--file", str(raw_image)).returncode == 0
    assert bmi("disk", "create", "cli-disk", "--image", "cli-img").returncode == 0
    listed = bmi("disk", "ls")
    assert "cli-disk" in listed.stdout and "cli-img" in listed.stdout
    failed = bmi("image", "rm", "cli-img")
    assert failed.returncode == 1
    assert failed.stderr.count("\n") == 1 and "FAILED_PRECONDITION" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert bmi("disk", "rm", "cli-disk").returncode == 0
    assert bmi("image", "rm", "cli-img").returncode == 0


def test_prometheus_metrics_are_served(ceph_cluster, tgtd, tmp_path):
    import urllib.request

    from bmi_client.client import BmiClient
    from server_process import ADMIN_TOKEN, ServerProcess, free_port

    metrics = f"127.0.0.1:{free_port()}"
    process = ServerProcess(tmp_path / "state", str(ceph_cluster.conf_path), ceph_cluster.pool,
                            tgtd=tgtd, extra_env={"BMI_METRICS_LISTEN": metrics})
    process.start()
    try:
        with BmiClient(process.address, ADMIN_TOKEN) as admin:
            list(admin.list_images())
            with pytest.raises(grpc.RpcError):
                admin.get_image("img-0000000000000000")
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    finally:
        process.stop()
    assert 'bmi_rpc_total{code="OK",method="/bmi.v1.ImageService/ListImages"} 1.0' in text
    assert 'bmi_rpc_total{code="NOT_FOUND",method="/bmi.v1.ImageService/GetImage"} 1.0' in text
    assert "bmi_nodes{" in text
    assert 'bmi_ceph_op_seconds_count{op="list_volumes"}' in text  # reconcile at start
    assert "bmi_tgt_targets " in text


def test_sigterm_lets_in_flight_calls_finish(ceph_cluster, tgtd, tmp_path, raw_and_qcow2):
    """Graceful shutdown: an upload under way when SIGTERM arrives still completes."""
    import signal
    import threading

    from bmi_client.client import BmiClient
    from server_process import ADMIN_TOKEN, ServerProcess

    raw, _ = raw_and_qcow2
    process = ServerProcess(tmp_path / "state", str(ceph_cluster.conf_path), ceph_cluster.pool,
                            tgtd=tgtd)
    process.start()
    signalled = threading.Event()

    def progress(sent: int, total: int) -> None:
        if sent > total // 4 and not signalled.is_set():
            signalled.set()
            process.proc.send_signal(signal.SIGTERM)

    try:
        with BmiClient(process.address, ADMIN_TOKEN, max_attempts=1) as admin:
            image = admin.upload_image(raw, "in-flight", project="ops",
                                       progress_callback=progress)
        assert signalled.is_set() and image.state == images_pb2.RESOURCE_STATE_READY
        assert process.wait_exit(30) == 0
    finally:
        process.kill()
    process.start()  # the image it finished is there after the restart
    try:
        with BmiClient(process.address, ADMIN_TOKEN) as admin:
            assert admin.get_image(image.id).state == images_pb2.RESOURCE_STATE_READY
            admin.delete_image(image.id)
    finally:
        process.stop()
