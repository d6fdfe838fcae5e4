"""URL imports and content digests in the core, with a fake fetcher and image store."""

from __future__ import annotations

import hashlib
import struct

import pytest
from principals import ALICE

from bmi_server.adapters.spool import LocalSpool
from bmi_server.core import errors, image_digests
from bmi_server.core.models import ResourceState, Visibility
from bmi_server.core.uploads import begin_upload
from bmi_server.core.url_imports import UrlImports

URL = "https://u:pw@mirror.example.org/os.raw?sig=abc"


class FakeDownload:
    def __init__(self, body: bytes, total: int | None, cut: int | None = None):
        self.body, self.total_bytes, self.cut = body, total, cut
        self.closed = False

    def chunks(self):
        body = self.body[: self.cut] if self.cut is not None else self.body
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    def close(self):
        self.closed = True


class FakeFetcher:
    def __init__(self, download):
        self.download = download
        self.urls = []

    def open(self, url):
        self.urls.append(url)
        return self.download


def importer(core, store, inspector, tmp_path, download, **kw):
    fetcher = FakeFetcher(download) if download is not None else None
    return UrlImports(core.images, store, inspector, LocalSpool(tmp_path, 0), fetcher,
                      max_virtual_bytes=1 << 30, max_file_bytes=1 << 30, **kw)


def run(imports, digest, **kw):
    return imports.import_url(ALICE, name=kw.pop("name", "os"), project="", url=URL,
                              expected_digest=digest, file_format=kw.pop("fmt", None),
                              visibility=Visibility.PRIVATE, **kw)


BODY = bytes(8192) + b"\x05" * 4096 + bytes(4096)
SHA = hashlib.sha256(BODY).hexdigest()


def nothing_left(core, store):
    return core.state.all_images() == [] and store.volumes == {}


def test_a_raw_file_streams_in_and_records_both_digests(core, store, inspector, tmp_path):
    download = FakeDownload(BODY, len(BODY))
    image = run(importer(core, store, inspector, tmp_path, download), f"sha256:{SHA}")
    assert image.state is ResourceState.READY and image.size_bytes == len(BODY)
    assert image.content_sha256 == SHA and image.file_digest == f"sha256:{SHA}"
    assert image.source == "https://mirror.example.org/os.raw?…"  # no credentials, no query
    vol = store.volumes[image.volume]
    assert bytes(vol.data) == BODY and vol.complete
    assert vol.metadata["bmi.content_sha256"] == SHA
    stored = core.state.get_image(image.id)
    assert stored.content_sha256 == SHA and stored.fetched_bytes == 0 and download.closed


def _qcow2(content: bytes) -> bytes:
    """A file the fake inspector takes for a qcow2 of ``content`` (its virtual size in
    the header where qcow2 keeps it, offset 24)."""
    return b"QFI\xfb" + bytes(20) + struct.pack(">Q", len(content)) + content[28:]


def test_a_qcow2_file_is_spooled_checked_converted_and_its_spool_files_go(
        core, store, inspector, tmp_path):
    content = bytes(20) + struct.pack(">Q", 4096) + b"\x07" * (4096 - 28)
    qcow2 = _qcow2(content)
    spool = tmp_path / "spool"
    spool.mkdir()
    imports = UrlImports(core.images, store, inspector, LocalSpool(spool, 0),
                         FakeFetcher(FakeDownload(qcow2, len(qcow2))),
                         max_virtual_bytes=1 << 30, max_file_bytes=1 << 30)
    image = run(imports, f"sha256:{hashlib.sha256(qcow2).hexdigest()}")
    assert image.state is ResourceState.READY and image.size_bytes == 4096
    assert bytes(store.volumes[image.volume].data) == content
    assert image.content_sha256 == ""  # hashed later, from the converted content
    assert list(spool.iterdir()) == []  # neither the qcow2 nor the raw file is left


def test_a_qcow2_whose_copy_fails_leaves_nothing(core, store, inspector, tmp_path):
    content = bytes(20) + struct.pack(">Q", 4096) + b"\x07" * (4096 - 28)
    qcow2 = _qcow2(content)
    spool = tmp_path / "spool"
    spool.mkdir()
    store.fail["import_raw_file"] = errors.Unavailable("ceph went away")
    imports = UrlImports(core.images, store, inspector, LocalSpool(spool, 0),
                         FakeFetcher(FakeDownload(qcow2, len(qcow2))),
                         max_virtual_bytes=1 << 30, max_file_bytes=1 << 30)
    with pytest.raises(errors.Unavailable, match="ceph went away"):
        run(imports, f"sha256:{hashlib.sha256(qcow2).hexdigest()}")
    del store.fail["import_raw_file"]
    assert nothing_left(core, store) and list(spool.iterdir()) == []


def test_sha512_is_checked_and_content_is_still_sha256(core, store, inspector, tmp_path):
    sha512 = hashlib.sha512(BODY).hexdigest()
    image = run(importer(core, store, inspector, tmp_path, FakeDownload(BODY, len(BODY))),
                f"sha512:{sha512}")
    assert image.file_digest == f"sha512:{sha512}" and image.content_sha256 == SHA


def test_a_wrong_digest_leaves_nothing(core, store, inspector, tmp_path):
    with pytest.raises(errors.InvalidArgument, match="digest mismatch") as refused:
        run(importer(core, store, inspector, tmp_path, FakeDownload(BODY, len(BODY))),
            "sha256:" + "0" * 64)
    assert "pw" not in refused.value.message
    assert nothing_left(core, store)


def test_a_truncated_download_leaves_nothing(core, store, inspector, tmp_path):
    with pytest.raises(errors.Unavailable, match="broke off after 10000 of 16384"):
        run(importer(core, store, inspector, tmp_path,
                     FakeDownload(BODY, len(BODY), cut=10000)), f"sha256:{SHA}")
    assert nothing_left(core, store)


def test_raw_needs_a_length_and_a_whole_number_of_sectors(core, store, inspector, tmp_path):
    with pytest.raises(errors.FailedPrecondition, match="Content-Length"):
        run(importer(core, store, inspector, tmp_path, FakeDownload(BODY, None)),
            f"sha256:{SHA}")
    odd = BODY[:1000]
    with pytest.raises(errors.InvalidArgument, match="multiple of 512"):
        run(importer(core, store, inspector, tmp_path, FakeDownload(odd, len(odd))),
            f"sha256:{hashlib.sha256(odd).hexdigest()}")
    assert nothing_left(core, store)


def test_off_without_a_fetcher_and_digest_required(core, store, inspector, tmp_path):
    with pytest.raises(errors.FailedPrecondition, match="url_import_allowed_hosts"):
        run(importer(core, store, inspector, tmp_path, None), f"sha256:{SHA}")
    imports = importer(core, store, inspector, tmp_path, FakeDownload(BODY, len(BODY)))
    with pytest.raises(errors.InvalidArgument, match="expected_digest is required"):
        run(imports, "")
    with pytest.raises(errors.InvalidArgument):
        run(imports, f"md5:{'a' * 32}")
    assert imports._fetcher.urls == []  # refused before anything was fetched


def test_a_retry_with_the_request_id_returns_the_first_image(core, store, inspector, tmp_path):
    imports = importer(core, store, inspector, tmp_path, FakeDownload(BODY, len(BODY)))
    first = run(imports, f"sha256:{SHA}", request_id="r1")
    assert run(imports, f"sha256:{SHA}", request_id="r1").id == first.id
    assert len(imports._fetcher.urls) == 1


def test_every_kind_of_image_records_its_content_digest(core, store, inspector, tmp_path):
    data = b"\x01" * 4096
    up = begin_upload(core.images, store, inspector, ALICE, name="up", project="",
                      file_format="raw", file_size=len(data), visibility=Visibility.PRIVATE,
                      spool=LocalSpool(tmp_path, 0), max_virtual_bytes=1 << 30)
    up.add(data)
    image = up.finish()
    want = hashlib.sha256(data).hexdigest()
    assert image.content_sha256 == want
    qcow = b"QFI\xfb" + data
    up = begin_upload(core.images, store, inspector, ALICE, name="q", project="",
                      file_format="qcow2", file_size=len(qcow), visibility=Visibility.PRIVATE,
                      spool=LocalSpool(tmp_path, 0), max_virtual_bytes=1 << 30)
    up.add(qcow)
    qcow_image = up.finish()
    disk = core.disks.create(ALICE, name="d", image="up")
    snap = core.disks.snapshot(ALICE, disk.name, image_name="snap")
    # Streamed content is hashed on the way in; the rest once ready, by the digest job.
    assert (qcow_image.content_sha256, snap.content_sha256) == ("", "")
    copy = core.images.copy(ALICE, "up", project="alice", name="copy")
    assert copy.content_sha256 == want  # its source's
    backfill = image_digests.DigestBackfill(core.state, store)
    assert backfill.run() == 2
    assert backfill.run() == 0
    for made in (qcow_image, snap):  # the converted raw content; the disk's content
        assert core.state.get_image(made.id).content_sha256 == want
        assert store.volumes[made.volume].metadata["bmi.content_sha256"] == want


def test_verify_catches_a_changed_volume(core, store, inspector, tmp_path):
    image = run(importer(core, store, inspector, tmp_path, FakeDownload(BODY, len(BODY))),
                f"sha256:{SHA}")
    ok = image_digests.verify(core.state, store, ALICE, "os")
    assert ok.matches and ok.computed_sha256 == SHA and not ok.detail
    store.volumes[image.volume].data[0:4] = b"evil"
    bad = image_digests.verify(core.state, store, ALICE, "os")
    assert not bad.matches and "written after" in bad.detail


class _AliceOnly:
    def authenticate(self, credentials, *_):
        if credentials != "Bearer alice":
            raise errors.Unauthenticated("invalid token")
        return ALICE


@pytest.fixture
def images_stub(core, inspector, tmp_path):
    """ImageService over gRPC, its URL imports fetching BODY; and one with them off."""
    import grpc
    from bmi.v1 import images_pb2_grpc

    from bmi_server.server import build_grpc_server

    channels, servers = [], []
    for fetcher in (FakeFetcher(FakeDownload(BODY, len(BODY))), None):
        server = build_grpc_server(core, inspector, _AliceOnly(), tmp_path / "spool",
                                   workers=2, url_fetcher=fetcher)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        channels.append(grpc.insecure_channel(f"127.0.0.1:{port}"))
    yield [images_pb2_grpc.ImageServiceStub(c) for c in channels]
    for channel, server in zip(channels, servers, strict=True):
        channel.close()
        server.stop(0)


def test_the_image_service_imports_by_url_and_verifies(core, store, images_stub):
    import grpc
    from bmi.v1 import images_pb2

    on, off = images_stub
    auth = (("authorization", "Bearer alice"),)

    def refused(stub, **fields):
        with pytest.raises(grpc.RpcError) as caught:
            stub.ImportImage(images_pb2.ImportImageRequest(name="x", **fields),
                             metadata=auth, timeout=10)
        return caught.value

    digest = f"sha256:{SHA}"
    gone = refused(off, source_url=URL, expected_digest=digest)
    assert gone.code() == grpc.StatusCode.FAILED_PRECONDITION and "is off" in gone.details()
    both = refused(on, source_url=URL, source_rbd_image="pool-img", expected_digest=digest)
    assert both.code() == grpc.StatusCode.INVALID_ARGUMENT and "not both" in both.details()
    stray = refused(on, source_rbd_image="pool-img", expected_digest=digest)
    assert stray.code() == grpc.StatusCode.INVALID_ARGUMENT and "source_url" in stray.details()
    assert nothing_left(core, store)

    image = on.ImportImage(images_pb2.ImportImageRequest(
        name="os", source_url=URL, expected_digest=digest), metadata=auth, timeout=10)
    assert image.state == images_pb2.RESOURCE_STATE_READY and image.content_sha256 == SHA
    assert "pw" not in image.source and "sig" not in image.source
    result = on.VerifyImage(images_pb2.VerifyImageRequest(image="os"), metadata=auth,
                            timeout=10)
    assert (result.image_id, result.matches, result.computed_sha256) == (image.id, True, SHA)
    assert result.recorded_sha256 == SHA and not result.detail
