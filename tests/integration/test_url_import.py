"""Images imported from a URL by a real server, from a web server on 127.0.0.1, into the
real Ceph cluster: digests checked, nothing left behind by any failure, SSRF refusals,
a server killed mid-download, and `bmi image verify` against a volume changed behind
BMI's back."""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import rbd
from bmi.v1 import images_pb2
from bmi_client.client import BmiClient
from hostile_images import corpus
from server_process import ADMIN_TOKEN, TENANT_TOKENS, ServerProcess

pytestmark = pytest.mark.ceph
MIB = 1 << 20
RAW = b"".join(n.to_bytes(4, "big") * (MIB // 4) for n in range(8)) + bytes(4 * MIB)
RAW_SHA = hashlib.sha256(RAW).hexdigest()


class Files(http.server.ThreadingHTTPServer):
    """A web server of test files: path -> (body, how it is sent)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, tuple[bytes, str]] = {}
        self.redirects: dict[str, str] = {}
        self.requests: list[str] = []
        self.authorizations: list[str] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Files

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        self.server.requests.append(path)
        self.server.authorizations.append(self.headers.get("Authorization", ""))
        if path in self.server.redirects:
            self.send_response(302)
            self.send_header("Location", self.server.redirects[path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path not in self.server.files:
            self.send_error(404)
            return
        body, how = self.server.files[path]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            if how == "truncated":  # announces all of it, sends half, hangs up
                self.wfile.write(body[: len(body) // 2])
            elif how == "slow":
                for i in range(0, len(body), 64 << 10):
                    self.wfile.write(body[i : i + (64 << 10)])
                    self.wfile.flush()
                    time.sleep(0.2)
            else:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True


@pytest.fixture(scope="module")
def files():
    web = Files()
    thread = threading.Thread(target=web.serve_forever, daemon=True)
    thread.start()
    try:
        yield web
    finally:
        web.shutdown()
        web.server_close()


ALLOWED = {"BMI_URL_IMPORT_ALLOWED_HOSTS": "127.0.0.1", "BMI_URL_IMPORT_SCHEMES": "http"}


@pytest.fixture(scope="module")
def url_server(ceph_cluster, tgtd, tmp_path_factory):
    process = ServerProcess(
        tmp_path_factory.mktemp("bmi-url"), str(ceph_cluster.conf_path), ceph_cluster.pool,
        tgtd=tgtd, extra_env=dict(ALLOWED),
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


def client(server, token=TENANT_TOKENS["alice"]) -> BmiClient:
    # One attempt: these tests look at each answer (the client retries UNAVAILABLE).
    return BmiClient(server.address, token, timeout=120, max_attempts=1)


@pytest.fixture
def alice(url_server):
    with client(url_server) as c:
        yield c


@pytest.fixture
def admin(url_server):
    with client(url_server, ADMIN_TOKEN) as c:
        yield c


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as failed:
        call()
    return failed.value.code(), failed.value.details()


@pytest.fixture
def nothing_left(admin, rbd_store, url_server):
    """Asserts that the catalogue, the pool and the spool hold what they held before."""
    before = (sorted(i.id for i in admin.list_images()),
              sorted(v.name for v in rbd_store.list_volumes()))

    def check() -> None:
        assert (sorted(i.id for i in admin.list_images()),
                sorted(v.name for v in rbd_store.list_volumes())) == before
        assert list((url_server.state_dir / "spool").iterdir()) == []

    return check


def test_a_raw_file_is_fetched_checked_and_recorded(files, alice, admin, rbd_store):
    files.files["/os.raw"] = (RAW, "")
    files.redirects["/latest.raw"] = "/os.raw"  # a redirect within the allowed host
    image = alice.import_image_from_url("url-raw", files.base + "/latest.raw",
                                        f"sha256:{RAW_SHA}")
    assert image.state == images_pb2.RESOURCE_STATE_READY and image.size_bytes == len(RAW)
    assert image.content_sha256 == RAW_SHA and image.file_digest == f"sha256:{RAW_SHA}"
    assert image.source == files.base + "/latest.raw"
    shown = alice.get_image("url-raw")
    assert shown.content_sha256 == RAW_SHA and shown.fetched_bytes == 0
    # Trailing zeros were not written: the volume holds only the data.
    volume = admin.get_image(image.id).rbd_name
    assert rbd_store.used_bytes(volume) == 8 * MIB
    assert admin.verify_image(image.id).matches


def test_a_qcow2_file_is_converted_and_its_raw_content_recorded(files, alice, raw_and_qcow2):
    raw, qcow2 = raw_and_qcow2
    body = qcow2.read_bytes()
    files.files["/os.qcow2"] = (body, "")
    sha512 = hashlib.sha512(body).hexdigest()
    image = alice.import_image_from_url("url-qcow2", files.base + "/os.qcow2",
                                        f"sha512:{sha512}")
    assert image.state == images_pb2.RESOURCE_STATE_READY
    assert image.size_bytes == raw.stat().st_size
    assert image.file_digest == f"sha512:{sha512}"
    # The converted content is hashed by the server's digest thread once the image is ready.
    assert digest_of(alice, image.id) == hashlib.sha256(raw.read_bytes()).hexdigest()


def test_a_wrong_digest_leaves_nothing(files, alice, nothing_left):
    files.files["/os.raw"] = (RAW, "")
    code, details = code_of(lambda: alice.import_image_from_url(
        "url-wrong", files.base + "/os.raw", "sha256:" + "0" * 64))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "digest mismatch" in details
    assert RAW_SHA in details
    nothing_left()


def test_a_truncated_download_leaves_nothing(files, alice, nothing_left):
    files.files["/cut.raw"] = (RAW, "truncated")
    code, details = code_of(lambda: alice.import_image_from_url(
        "url-cut", files.base + "/cut.raw", f"sha256:{RAW_SHA}"))
    assert code == grpc.StatusCode.UNAVAILABLE and "broke off" in details
    nothing_left()


def test_a_missing_file_is_failed_precondition(files, alice, nothing_left):
    code, details = code_of(lambda: alice.import_image_from_url(
        "url-404", files.base + "/nope.raw", f"sha256:{RAW_SHA}"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "HTTP 404" in details
    nothing_left()


def test_redirects_and_hosts_outside_the_setting_are_refused(files, alice, nothing_left):
    port = files.server_address[1]
    files.redirects["/away.raw"] = f"http://127.0.0.2:{port}/os.raw"
    requests_before = len(files.requests)
    code, details = code_of(lambda: alice.import_image_from_url(
        "url-away", files.base + "/away.raw", f"sha256:{RAW_SHA}"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "redirects elsewhere" in details
    assert files.requests[requests_before:] == ["/away.raw"]  # the target never asked
    code, details = code_of(lambda: alice.import_image_from_url(
        "url-other", f"http://127.0.0.2:{port}/os.raw", f"sha256:{RAW_SHA}"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "not allowed" in details
    code, details = code_of(lambda: alice.import_image_from_url(
        "url-https", f"https://127.0.0.1:{port}/os.raw", f"sha256:{RAW_SHA}"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "scheme https" in details
    nothing_left()


def test_credentials_in_the_url_are_never_shown_or_stored(files, alice, url_server):
    files.files["/os.raw"] = (RAW, "")
    url = files.base.replace("http://", "http://joe:hunter2@") + "/os.raw?token=sekrit"
    image = alice.import_image_from_url("url-creds", url, f"sha256:{RAW_SHA}")
    assert image.source == files.base + "/os.raw?…"
    assert files.authorizations[-1].startswith("Basic ")  # used, for that host only
    _code, details = code_of(lambda: alice.import_image_from_url(
        "url-creds-bad", url, "sha256:" + "1" * 64))
    for secret in ("hunter2", "sekrit", "joe"):
        assert secret not in details and secret not in image.source
        assert secret not in url_server.log()
    db = (url_server.state_dir / "bmi.sqlite3").read_bytes()
    assert b"hunter2" not in db and b"sekrit" not in db


def test_a_qcow2_the_hostile_image_checks_refuse_leaves_nothing(
    files, alice, nothing_left, tmp_path
):
    secret = tmp_path / "secret"
    secret.write_bytes(b"never\n" * 100)
    hostile = corpus(tmp_path, secret)
    for name in ("data-file", "backing-file"):
        body = Path(hostile[name]).read_bytes()
        files.files[f"/{name}.qcow2"] = (body, "")
        code, details = code_of(lambda n=name, b=body: alice.import_image_from_url(
            f"url-{n}", f"{files.base}/{n}.qcow2", f"sha256:{hashlib.sha256(b).hexdigest()}",
            format=images_pb2.IMAGE_FORMAT_QCOW2))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, details)
    nothing_left()


def test_verify_catches_a_volume_changed_behind_bmis_back(files, alice, admin, ioctx):
    files.files["/os.raw"] = (RAW, "")
    image = alice.import_image_from_url("url-verify", files.base + "/os.raw",
                                        f"sha256:{RAW_SHA}")
    ok = alice.verify_image("url-verify")
    assert ok.matches and ok.computed_sha256 == ok.recorded_sha256 == RAW_SHA
    with rbd.Image(ioctx, admin.get_image(image.id).rbd_name) as volume:
        volume.write(b"tampered", 4096)
    bad = alice.verify_image("url-verify")
    assert not bad.matches and "written after" in bad.detail
    assert bad.recorded_sha256 == RAW_SHA
    cli = subprocess.run(
        [str(Path(sys.executable).parent / "bmi"), "--server", alice.server,
         "--token", TENANT_TOKENS["alice"], "image", "verify", "url-verify"],
        capture_output=True, text=True, timeout=120,
    )
    assert cli.returncode == 1 and "MISMATCH" in cli.stdout


def test_every_kind_of_image_records_its_content_digest(alice, raw_image):
    up = alice.upload_image(raw_image, "up-digest")
    want = hashlib.sha256(raw_image.read_bytes()).hexdigest()
    assert up.content_sha256 == want
    alice.create_disk("d-digest", "up-digest")
    snap = alice.snapshot_disk("d-digest", "snap-digest")
    assert snap.state == images_pb2.RESOURCE_STATE_READY
    assert digest_of(alice, snap.id) == want
    assert alice.verify_image("snap-digest").matches


def test_the_cli_imports_by_url_with_progress(files, url_server):
    files.files["/cli.raw"] = (RAW, "")
    cli = subprocess.run(
        [str(Path(sys.executable).parent / "bmi"), "--server", url_server.address,
         "--token", TENANT_TOKENS["alice"], "image", "import", "url-cli",
         "--url", files.base + "/cli.raw", "--sha256", RAW_SHA.upper()],
        capture_output=True, text=True, timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert RAW_SHA in cli.stdout and "ready" in cli.stdout


def test_a_server_killed_mid_download_is_rolled_back_at_restart(
    files, url_server, rbd_store, admin
):
    body = os.urandom(16 * MIB)  # ~50 s at the slow pace: killed long before the end
    files.files["/slow.raw"] = (body, "slow")
    digest = f"sha256:{hashlib.sha256(body).hexdigest()}"
    volumes_before = sorted(v.name for v in rbd_store.list_volumes())
    slow = client(url_server)
    outcome: list[BaseException] = []
    call = threading.Thread(target=lambda: _capture(outcome, lambda: slow.import_image_from_url(
        "url-slow", files.base + "/slow.raw", digest, request_id="slow-1")))
    call.start()
    deadline = time.monotonic() + 60
    while True:  # progress is visible while the import runs
        try:
            shown = _find(admin, "url-slow")
        except LookupError:
            shown = None
        if shown is not None and shown.fetched_bytes > 0:
            break
        assert time.monotonic() < deadline, "no progress seen"
        time.sleep(0.2)
    assert shown.state == images_pb2.RESOURCE_STATE_CREATING
    assert shown.fetch_total_bytes == len(body) and shown.fetched_bytes < len(body)
    url_server.kill()
    call.join(30)
    slow.close()
    assert outcome and isinstance(outcome[0], grpc.RpcError)
    assert outcome[0].code() == grpc.StatusCode.UNAVAILABLE
    url_server.start()
    with pytest.raises(LookupError):
        _find(admin, "url-slow")  # rolled back: never half-ready
    assert sorted(v.name for v in rbd_store.list_volumes()) == volumes_before
    assert list((url_server.state_dir / "spool").iterdir()) == []
    assert "import from" in url_server.log() and "was interrupted" in url_server.log()
    # A retry of the same request fetches the file again from its start.
    files.files["/slow.raw"] = (body, "")
    with client(url_server) as again:
        image = again.import_image_from_url("url-slow", files.base + "/slow.raw", digest,
                                            request_id="slow-1")
    assert image.state == images_pb2.RESOURCE_STATE_READY


def test_loopback_by_name_and_an_empty_setting_are_refused(files, url_server):
    port = files.server_address[1]
    try:
        # Listed by name only: the name resolves to loopback, which is not listed.
        url_server.stop()
        url_server.env.update({"BMI_URL_IMPORT_ALLOWED_HOSTS": "localhost"})
        url_server.start()
        with client(url_server) as c:
            code, details = code_of(lambda: c.import_image_from_url(
                "url-lo", f"http://localhost:{port}/os.raw", f"sha256:{RAW_SHA}"))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "loopback" in details
        url_server.stop()
        url_server.env.update({"BMI_URL_IMPORT_ALLOWED_HOSTS": ""})
        url_server.start()
        with client(url_server) as c:
            code, details = code_of(lambda: c.import_image_from_url(
                "url-off", files.base + "/os.raw", f"sha256:{RAW_SHA}"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "url_import_allowed_hosts" in details
    finally:
        url_server.stop()
        url_server.env.update(ALLOWED)
        url_server.start()


def _capture(outcome: list, call) -> None:
    try:
        call()
    except BaseException as e:  # handed to the test
        outcome.append(e)


def _find(admin: BmiClient, name: str) -> images_pb2.Image:
    for image in admin.list_images(project="alice"):
        if image.name == name:
            return image
    raise LookupError(name)


def test_the_go_example_imports_by_url_and_verifies(files, url_server):
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    built = subprocess.run(["make", "-s", "go"], cwd=repo, env=env, capture_output=True,
                           text=True, timeout=900, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    binary = repo / "build" / "go" / "bin" / "bmi-import-url"
    files.files["/go.raw"] = (RAW, "")
    common = ["-server", url_server.address, "-token", TENANT_TOKENS["alice"]]
    done = subprocess.run([binary, *common, "-url", files.base + "/go.raw", "-sha256", RAW_SHA,
                           "url-go"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[1:] == ["url-go", "ready", f"sha256:{RAW_SHA}"]
    done = subprocess.run([binary, *common, "-url", files.base + "/go.raw", "-sha256", "0" * 64,
                           "url-go-bad"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error: INVALID_ARGUMENT: digest")
    done = subprocess.run([binary, *common, "-verify", "url-go"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "ok:" in done.stdout, done.stdout + done.stderr


def digest_of(caller: BmiClient, image: str, timeout: float = 60) -> str:
    """The image's content digest, once the server's digest thread has recorded it."""
    deadline = time.monotonic() + timeout
    while not (found := caller.get_image(image).content_sha256):
        assert time.monotonic() < deadline, f"no digest recorded for {image}"
        time.sleep(0.5)
    return found
