"""Hostile input, property-based: whatever a caller sends, the answer is a clear error
with the right code (never INTERNAL / 5xx, never a traceback) and a rejected request
changes nothing."""

from __future__ import annotations

import http.client
import threading
from concurrent import futures

import grpc
import pytest
from bmi.v1 import disks_pb2, disks_pb2_grpc, images_pb2, images_pb2_grpc, nodes_pb2, nodes_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from principals import ADMIN
from test_catalogue import upload

from bmi_server.api.http_boot import BootHttpServer
from bmi_server.core.errors import BmiError
from bmi_server.core.models import Principal, Visibility
from bmi_server.server import build_grpc_server

CASES = settings(max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])
CLEAR_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}
hostile_text = st.one_of(
    st.text(max_size=300),
    st.sampled_from(["", "../../etc/passwd", "img-0000000000000000", "${net0/mac}", "a" * 5000,
                     "\x00", "name with spaces", "ünïcödé", "-leading-dash", "x/y", "%00"]),
)
hostile_int = st.one_of(st.integers(min_value=-(2**31), max_value=2**31 - 1),
                        st.sampled_from([0, -1, 1000, 1001, 2**31 - 1]))


class _Tokens:
    def authenticate(self, credentials, *_):
        from bmi_server.core.errors import Unauthenticated

        if credentials == "Bearer admin":
            return ADMIN
        if credentials == "Bearer alice":
            return Principal(name="alice", project="alice")
        raise Unauthenticated("invalid token")


@pytest.fixture
def grpc_stubs(core, inspector, store, tmp_path):
    upload(core, store, inspector, tmp_path, ADMIN, "golden", project="ops",
           visibility=Visibility.PUBLIC)
    core.registry.enrol(ADMIN, name="n1", project="alice", macs=["52:54:00:00:00:01"])
    server = build_grpc_server(core, inspector, _Tokens(), tmp_path / "spool", workers=4)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield (images_pb2_grpc.ImageServiceStub(channel), disks_pb2_grpc.DiskServiceStub(channel),
           nodes_pb2_grpc.NodeServiceStub(channel))
    channel.close()
    server.stop(0)


def world(core, store, targets):
    return (sorted((i.id, i.name, i.state, i.visibility) for i in core.state.all_images()),
            sorted((d.id, d.name, d.state) for d in core.state.all_disks()),
            sorted((n.id, n.name, n.state, n.project) for n in core.state.all_nodes()),
            sorted(store.volumes), sorted(targets.targets))


def call_is_clear(call) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as exc:
        assert exc.code() in CLEAR_CODES, (exc.code(), exc.details())
        assert "Traceback" not in (exc.details() or "")
        return exc.code()
    return None


@CASES
@given(name=hostile_text, ref=hostile_text, project=hostile_text, size=hostile_int,
       token=hostile_text, who=st.sampled_from(["admin", "alice", "nobody"]))
def test_every_rpc_answers_hostile_fields_clearly(grpc_stubs, core, store, targets, name, ref,
                                                  project, size, token, who):
    images, disks, nodes = grpc_stubs
    md = (("authorization", f"Bearer {who}"),)
    calls = [
        lambda: images.ListImages(images_pb2.ListImagesRequest(page_size=size, page_token=token,
                                                               project=project), metadata=md),
        lambda: images.GetImage(images_pb2.GetImageRequest(image=ref), metadata=md),
        lambda: images.UpdateImage(images_pb2.UpdateImageRequest(image=ref, name=name,
                                                                 visibility=size % 5),
                                   metadata=md),
        lambda: images.DeleteImage(images_pb2.DeleteImageRequest(image=ref), metadata=md),
        lambda: images.CopyImage(images_pb2.CopyImageRequest(image=ref, project=project,
                                                             name=name, request_id=token),
                                 metadata=md),
        lambda: images.ImportImage(images_pb2.ImportImageRequest(name=name, project=project,
                                                                 source_rbd_image=ref),
                                   metadata=md),
        lambda: disks.ListDisks(disks_pb2.ListDisksRequest(page_size=size, image=ref,
                                                           project=project), metadata=md),
        lambda: disks.GetDisk(disks_pb2.GetDiskRequest(disk=ref), metadata=md),
        lambda: disks.CreateDisk(disks_pb2.CreateDiskRequest(name=name, image=ref,
                                                             project=project), metadata=md),
        lambda: disks.SnapshotDisk(disks_pb2.SnapshotDiskRequest(disk=ref, image_name=name),
                                   metadata=md),
        lambda: nodes.GetNode(nodes_pb2.GetNodeRequest(node=ref), metadata=md),
        lambda: nodes.ListNodes(nodes_pb2.ListNodesRequest(page_size=size, page_token=token,
                                                           state=size % 12), metadata=md),
        lambda: nodes.EnrollNode(nodes_pb2.EnrollNodeRequest(name=name, project=project,
                                                             macs=[ref]), metadata=md),
        lambda: nodes.ProvisionNode(nodes_pb2.ProvisionNodeRequest(node=ref, image=name),
                                    metadata=md),
        lambda: nodes.DeprovisionNode(nodes_pb2.DeprovisionNodeRequest(node=ref), metadata=md),
    ]
    for call in calls:
        before = world(core, store, targets)
        if call_is_clear(call) is not None:
            assert world(core, store, targets) == before


@pytest.fixture
def boot_http(core):
    server = BootHttpServer(("127.0.0.1", 0), core.planner, "#!ipxe\nchain {{server}}\n")
    server.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.stop()


@CASES
@given(query=st.one_of(st.text(max_size=400), st.binary(max_size=200).map(lambda b: b.hex())),
       path=st.sampled_from(["/boot.ipxe", "/chain.ipxe", "/", "/../etc/passwd", "/boot.ipxe/x"]),
       host=st.one_of(st.text(max_size=60), st.just("10.0.2.2:8080")))
def test_boot_endpoint_never_fails_badly(boot_http, core, store, targets, query, path, host):
    # Any byte can arrive; http.server reads header bytes as latin-1.
    host_header = "".join(c for c in host if ord(c) < 256 and c not in "\r\n") or "x"
    target = path + "?" + "".join(c if 32 < ord(c) < 127 else "%20" for c in query)
    before = world(core, store, targets)
    conn = http.client.HTTPConnection(boot_http, timeout=10)
    conn.putrequest("GET", target, skip_host=True)
    conn.putheader("Host", host_header)
    conn.endheaders()
    reply = conn.getresponse()
    body = reply.read().decode()
    conn.close()
    assert reply.status < 500, (reply.status, body)
    assert body.startswith("#!ipxe")
    assert "Traceback" not in body
    if reply.status != 200:
        assert world(core, store, targets) == before
    # Nothing from the request can smuggle an iPXE expansion into the script.
    for line in body.splitlines():
        if line.startswith("echo"):
            assert "${" not in line


def test_hostile_macs_and_fields_never_register_a_node(core):
    from bmi_server.api.http_boot import parse_boot_query

    for query in ["mac=${net0/mac}", "mac=52:54:00:00:00:01%0aexit", "mac=52:54:00:00:00:01&mac=x",
                  "mac=52:54:00:00:00:01&serial_hex=" + "41" * 200]:
        with pytest.raises(BmiError):
            mac, fields = parse_boot_query(query)
            core.planner.action_for(mac, __import__("bmi_server.core.models",
                                                    fromlist=["Smbios"]).Smbios(**fields))
    assert core.state.all_nodes() == []


_ = (threading, futures)


@pytest.mark.parametrize(
    ("message", "public"),
    [
        ("cannot open /var/lib/bmi/spool/bmi-upload-1.qcow2", "cannot open <path>"),
        ("create bmi-dsk-0123456789abcdef: exists", "create dsk-0123456789abcdef: exists"),
        ("HIL at http://hil:5000/v0/node/n1 refused", "HIL at http://hil:5000/v0/node/n1 refused"),
        ("pool rbd/img, 1/2 done", "pool rbd/img, 1/2 done"),
    ],
)
def test_error_messages_name_no_host_path_and_no_volume(message, public):
    from bmi_server.api.errors import public_message

    assert public_message(message) == public


def test_upper_case_names_and_garbage_page_tokens_are_invalid_argument(grpc_stubs, core,
                                                                      store, targets):
    """Names are lower-case, as the API says, in every name field (images, disks, nodes,
    projects) and in references; every List call refuses a page token it did not make."""
    images, disks, nodes = grpc_stubs
    md = (("authorization", "Bearer admin"),)
    disk = core.disks.create(ADMIN, name="d1", image="golden", project="alice")
    upload_header = images_pb2.UploadImageHeader(
        name="Upper", project="ops", format=images_pb2.IMAGE_FORMAT_RAW, file_size_bytes=512)
    calls = {
        "UploadImage": lambda: images.UploadImage(
            iter([images_pb2.UploadImageRequest(header=upload_header)]), metadata=md),
        "ImportImage": lambda: images.ImportImage(images_pb2.ImportImageRequest(
            name="Golden2", project="ops", source_rbd_image="x"), metadata=md),
        "ImportImage project": lambda: images.ImportImage(images_pb2.ImportImageRequest(
            name="golden2", project="Ops", source_rbd_image="x"), metadata=md),
        "UpdateImage": lambda: images.UpdateImage(images_pb2.UpdateImageRequest(
            image="golden", name="Golden"), metadata=md),
        "CopyImage": lambda: images.CopyImage(images_pb2.CopyImageRequest(
            image="golden", project="alice", name="Copy"), metadata=md),
        "GetImage": lambda: images.GetImage(images_pb2.GetImageRequest(image="Golden"),
                                            metadata=md),
        "ListImages project": lambda: images.ListImages(images_pb2.ListImagesRequest(
            project="Alice"), metadata=md),
        "CreateDisk": lambda: disks.CreateDisk(disks_pb2.CreateDiskRequest(
            name="Disk", image="golden", project="alice"), metadata=md),
        "CreateDisk project": lambda: disks.CreateDisk(disks_pb2.CreateDiskRequest(
            name="disk", image="golden", project="Alice"), metadata=md),
        "GetDisk": lambda: disks.GetDisk(disks_pb2.GetDiskRequest(disk="D1"), metadata=md),
        "SnapshotDisk": lambda: disks.SnapshotDisk(disks_pb2.SnapshotDiskRequest(
            disk=disk.id, image_name="Snap"), metadata=md),
        "EnrollNode": lambda: nodes.EnrollNode(nodes_pb2.EnrollNodeRequest(
            name="N2", project="alice", macs=["52:54:00:00:00:02"]), metadata=md),
        "EnrollNode project": lambda: nodes.EnrollNode(nodes_pb2.EnrollNodeRequest(
            name="n2", project="Alice", macs=["52:54:00:00:00:02"]), metadata=md),
        "GetNode": lambda: nodes.GetNode(nodes_pb2.GetNodeRequest(node="N1"), metadata=md),
        "ListNodes project": lambda: nodes.ListNodes(nodes_pb2.ListNodesRequest(
            project="Alice"), metadata=md),
        "ListImages token": lambda: images.ListImages(images_pb2.ListImagesRequest(
            page_token="garbage"), metadata=md),
        "ListDisks token": lambda: disks.ListDisks(disks_pb2.ListDisksRequest(
            page_token="garbage"), metadata=md),
        "ListNodes token": lambda: nodes.ListNodes(nodes_pb2.ListNodesRequest(
            page_token="garbage"), metadata=md),
    }
    before = world(core, store, targets)
    codes = {what: call_is_clear(call) for what, call in calls.items()}
    assert codes == dict.fromkeys(calls, grpc.StatusCode.INVALID_ARGUMENT)
    assert world(core, store, targets) == before
    # The same requests in lower case are fine (a few, to show the refusal was the case).
    assert images.GetImage(images_pb2.GetImageRequest(image="golden"), metadata=md).name
    assert nodes.GetNode(nodes_pb2.GetNodeRequest(node="n1"), metadata=md).name == "n1"
