"""The `bmi` CLI and BmiClient against an in-process gRPC server with fake services."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

import click
import grpc
import pytest
from bmi.v1 import disks_pb2_grpc, images_pb2, images_pb2_grpc, nodes_pb2, nodes_pb2_grpc
from bmi_client import client as client_mod
from bmi_client.cli import cli, human_size, short_enum
from bmi_client.client import BmiClient
from bmi_client.config import DEFAULT_SERVER, ConfigError, load_config
from cli_fakes import TOKEN, FakeDisks, FakeImages, MiB
from click.testing import CliRunner
from server_process import free_port

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def fake_server():
    """A gRPC server on a free port with fake image and disk services."""
    images, disks = FakeImages(), FakeDisks()
    srv = grpc.server(ThreadPoolExecutor(max_workers=4))
    images_pb2_grpc.add_ImageServiceServicer_to_server(images, srv)
    disks_pb2_grpc.add_DiskServiceServicer_to_server(disks, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield SimpleNamespace(address=f"127.0.0.1:{port}", images=images, disks=disks)
    srv.stop(None)


@pytest.fixture
def server():
    yield from fake_server()


@pytest.fixture
def sleeps(monkeypatch):
    """Backoff sleeps, recorded instead of slept."""
    recorded: list[float] = []
    monkeypatch.setattr(client_mod.time, "sleep", recorded.append)
    return recorded


@pytest.fixture
def env(tmp_path):
    # Isolate from the developer's own settings; a narrow COLUMNS must not wrap piped output.
    cfg = tmp_path / "client.toml"
    cfg.write_text("")
    return {"BMI_CONFIG": str(cfg), "BMI_SERVER": None, "BMI_TOKEN": None, "COLUMNS": "40"}


@pytest.fixture
def bmi(server, env, sleeps):
    runner = CliRunner()

    def run(*args: str, token: str | None = TOKEN, server_flag: bool = True, **extra_env):
        opts = ["--server", server.address] if server_flag else []
        opts += ["--token", token] if token else []
        # catch_exceptions=False: any traceback-worthy exception fails the test loudly.
        return runner.invoke(cli, [*opts, *args], env={**env, **extra_env},
                             catch_exceptions=False)

    return run


def ok(result):
    assert result.exit_code == 0, result.output
    return result


# -- output -----------------------------------------------------------------------


def test_image_ls_table_follows_pages(bmi, server):
    out = ok(bmi("image", "ls")).stdout
    for text in ("VISIBILITY", "ubuntu-22.04", "centos-9", "snap-1", "img-0000000000000003",
                 "64.0 MiB", "3.0 GiB", "public", "private", "golden", "snapshot", "ready"):
        assert text in out
    assert "VISIBILITY_" not in out and "RESOURCE_STATE" not in out
    assert any(line.split()[:2] == ["img-0000000000000002", "centos-9"]
               for line in out.splitlines())  # one line per image, even when piped
    tokens = [r.page_token for r in server.images.requests["ListImages"]]
    assert tokens == ["", "2"]


def test_image_ls_json(bmi, server):
    data = json.loads(ok(bmi("--json", "image", "ls", "--project", "proj-a")).stdout)
    assert isinstance(data, list)
    assert [d["name"] for d in data] == ["ubuntu-22.04", "centos-9", "snap-1"]
    assert data[0]["visibility"] == "VISIBILITY_PUBLIC"
    assert data[0]["size_bytes"] == str(64 * MiB)  # proto3 JSON: int64 as string
    assert data[0]["rbd_name"] == ""  # every field is present, even when empty
    assert server.images.requests["ListImages"][0].project == "proj-a"


def test_image_show_table_and_json(bmi):
    out = ok(bmi("image", "show", "snap-1")).stdout
    assert "img-0000000000000003" in out and "dsk-1" in out and "snapshot" in out
    assert "2023-11-14 22:13:20Z" in out
    data = json.loads(ok(bmi("--json", "image", "show", "centos-9")).stdout)
    assert data["id"] == "img-0000000000000002"
    assert data["kind"] == "IMAGE_KIND_GOLDEN"
    assert data["create_time"] == "2023-11-14T22:13:20Z"


def test_disk_ls_and_show(bmi, server):
    out = ok(bmi("disk", "ls", "--image", "ubuntu-22.04")).stdout
    assert "dsk-00000000000000a1" in out and "ubuntu-22.04" in out and "64.0 MiB" in out
    assert server.disks.requests["ListDisks"][0].image == "ubuntu-22.04"
    out = ok(bmi("disk", "show", "node-1")).stdout
    assert "3.0 MiB" in out  # used_bytes, only GetDisk has it
    data = json.loads(ok(bmi("--json", "disk", "show", "node-1")).stdout)
    assert data["used_bytes"] == str(3 * MiB)


def test_helpers():
    assert human_size(0) == "0 B"
    assert human_size(1023) == "1023 B"
    assert human_size(64 * MiB) == "64.0 MiB"
    assert human_size(1536 * 1024**3) == "1.5 TiB"
    img = images_pb2.Image(visibility=images_pb2.VISIBILITY_PUBLIC,
                           state=images_pb2.RESOURCE_STATE_DELETING)
    assert short_enum(img, "visibility") == "public"
    assert short_enum(img, "state") == "deleting"
    assert short_enum(img, "kind") == "unspecified"


# -- mutations --------------------------------------------------------------------


def _uploaded(server, index: int = -1):
    messages = server.images.uploads[index]
    header = messages[0]
    assert header.WhichOneof("part") == "header"
    assert all(m.WhichOneof("part") == "chunk" for m in messages[1:])
    return header.header, [m.chunk for m in messages[1:]]


def test_upload_streams_header_then_chunks_qcow2(bmi, server, tmp_path):
    data = b"QFI\xfb" + bytes(range(256)) * (10 * 1024 + 7)  # ~2.5 MiB, not a chunk multiple
    path = tmp_path / "disk.qcow2"
    path.write_bytes(data)
    ok(bmi("image", "import", "fedora", "--file", str(path), "--project", "proj-b"))
    header, chunks = _uploaded(server)
    assert header.name == "fedora" and header.project == "proj-b"
    assert header.format == images_pb2.IMAGE_FORMAT_QCOW2
    assert header.file_size_bytes == len(data)
    assert header.visibility == images_pb2.VISIBILITY_PRIVATE
    uuid.UUID(header.request_id)
    assert [len(c) for c in chunks] == [MiB, MiB, len(data) - 2 * MiB]
    assert b"".join(chunks) == data


def test_upload_raw_guess_and_format_override(bmi, server, tmp_path):
    raw = tmp_path / "disk.img"
    raw.write_bytes(b"\0" * 1000)
    ok(bmi("image", "import", "r", "--file", str(raw), "--public"))
    header, _ = _uploaded(server)
    assert header.format == images_pb2.IMAGE_FORMAT_RAW
    assert header.visibility == images_pb2.VISIBILITY_PUBLIC
    qcow = tmp_path / "looks.qcow2"
    qcow.write_bytes(b"QFI\xfb" + b"\0" * 100)
    ok(bmi("image", "import", "q", "--file", str(qcow), "--format", "raw"))
    assert _uploaded(server)[0].format == images_pb2.IMAGE_FORMAT_RAW


def test_upload_progress_callback(server, tmp_path):
    path = tmp_path / "f.img"
    path.write_bytes(b"x" * (2 * MiB + 5))
    calls: list[tuple[int, int]] = []
    with BmiClient(server.address, TOKEN) as c:
        img = c.upload_image(path, "p", progress_callback=lambda s, t: calls.append((s, t)))
    assert img.size_bytes == 2 * MiB + 5
    assert calls == [(0, 2 * MiB + 5), (MiB, 2 * MiB + 5), (2 * MiB, 2 * MiB + 5),
                     (2 * MiB + 5, 2 * MiB + 5)]


def test_import_from_rbd(bmi, server):
    out = ok(bmi("--json", "image", "import", "golden", "--rbd", "staging-ubuntu")).stdout
    assert json.loads(out)["name"] == "golden"
    req = server.images.requests["ImportImage"][0]
    assert req.source_rbd_image == "staging-ubuntu"
    uuid.UUID(req.request_id)
    assert not server.images.uploads


def test_import_from_a_url_sends_the_digest(bmi, server):
    out = ok(bmi("--json", "image", "import", "deb", "--url", "https://m.example/d.qcow2",
                 "--sha512", "ab" * 64, "--format", "qcow2")).stdout
    assert json.loads(out)["name"] == "deb"
    req = server.images.requests["ImportImage"][0]
    assert (req.source_url, req.expected_digest) == ("https://m.example/d.qcow2",
                                                     "sha512:" + "ab" * 64)
    assert req.format == images_pb2.IMAGE_FORMAT_QCOW2 and not req.source_rbd_image
    uuid.UUID(req.request_id)


def test_verify_exits_1_on_a_mismatch(bmi, server):
    server.images.verify_matches = True
    assert "ok: the content is as recorded" in ok(bmi("image", "verify", "golden")).stdout
    server.images.verify_matches = False
    result = bmi("image", "verify", "golden")
    assert result.exit_code == 1 and "MISMATCH: changed" in result.stdout


@pytest.mark.parametrize("args", [
    ["image", "import", "x"],
    ["image", "import", "x", "--rbd", "a", "--file", __file__],
    ["image", "import", "x", "--rbd", "a", "--format", "raw"],
    ["image", "import", "x", "--url", "https://h/x"],  # no digest
    ["image", "import", "x", "--url", "https://h/x", "--sha256", "a", "--sha512", "b"],
    ["image", "import", "x", "--file", __file__, "--sha256", "a"],
    ["image", "import", "x", "--url", "https://h/x", "--rbd", "a", "--sha256", "a"],
    ["image", "set", "x"],
    ["image", "cp", "x"],
])
def test_usage_errors_exit_2(bmi, server, args):
    result = bmi(*args)
    assert result.exit_code == 2, result.output
    assert not server.images.requests


def test_cp_mv_set_snapshot_and_disk_create(bmi, server):
    ok(bmi("image", "cp", "centos-9", "--to-project", "proj-b", "--name", "c9"))
    cp = server.images.requests["CopyImage"][0]
    assert (cp.image, cp.project, cp.name) == ("centos-9", "proj-b", "c9") and cp.request_id
    assert "centos-stream-9" in ok(bmi("image", "mv", "centos-9", "centos-stream-9")).stdout
    ok(bmi("image", "set", "centos-9", "--public"))
    ok(bmi("image", "set", "centos-9", "--private"))
    mv, pub, priv = server.images.requests["UpdateImage"]
    assert (mv.name, mv.visibility) == ("centos-stream-9", images_pb2.VISIBILITY_UNSPECIFIED)
    assert (pub.name, pub.visibility) == ("", images_pb2.VISIBILITY_PUBLIC)
    assert priv.visibility == images_pb2.VISIBILITY_PRIVATE
    ok(bmi("snapshot", "create", "node-1", "node-1-snap"))
    snap = server.disks.requests["SnapshotDisk"][0]
    assert (snap.disk, snap.image_name) == ("node-1", "node-1-snap") and snap.request_id
    ok(bmi("disk", "create", "node-2", "--image", "ubuntu-22.04", "--project", "proj-a"))
    cd = server.disks.requests["CreateDisk"][0]
    assert (cd.name, cd.image, cd.project) == ("node-2", "ubuntu-22.04", "proj-a")
    assert "deleted disk node-2" in ok(bmi("disk", "rm", "node-2")).stdout
    assert "deleted image snap-1" in ok(bmi("image", "rm", "snap-1")).stdout


# -- errors -----------------------------------------------------------------------


def test_rpc_error_is_one_line_exit_1(bmi):
    result = bmi("image", "show", "foo")
    assert result.exit_code == 1
    assert result.stderr == 'error: NOT_FOUND: image "foo" not found\n'
    assert result.stdout == ""


def test_wrong_token_reaches_server_and_fails(bmi, server):
    result = bmi("image", "ls", token="wrong")
    assert result.exit_code == 1
    assert result.stderr == "error: UNAUTHENTICATED: bad token\n"
    assert server.images.tokens == ["Bearer wrong"]


def test_missing_token(bmi, server):
    result = bmi("image", "ls", token=None)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: no token")
    assert result.stderr.count("\n") == 1
    assert not server.images.requests


def test_bad_config_file_is_one_line(bmi, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("server = [")
    result = bmi("image", "ls", token=None, server_flag=False, BMI_CONFIG=str(bad))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot read config file")
    assert result.stderr.count("\n") == 1


# -- configuration ----------------------------------------------------------------


def test_config_precedence(tmp_path):
    cfg = tmp_path / "client.toml"
    cfg.write_text('server = "file:1"\ntoken = "file-token"\n')
    env = {"BMI_CONFIG": str(cfg)}
    assert load_config(env=env) == load_config(env=env)  # stable
    assert (load_config(env=env).server, load_config(env=env).token) == ("file:1", "file-token")
    assert "file-token" not in repr(load_config(env=env))  # never in a traceback or log
    env_set = {**env, "BMI_SERVER": "env:2", "BMI_TOKEN": "env-token"}
    c = load_config(env=env_set)
    assert (c.server, c.token) == ("env:2", "env-token")
    c = load_config("flag:3", "flag-token", env=env_set)
    assert (c.server, c.token) == ("flag:3", "flag-token")
    # Each setting resolves on its own: a flag for one, the file for the other.
    c = load_config(server="flag:3", env=env)
    assert (c.server, c.token) == ("flag:3", "file-token")


def test_config_defaults_and_token_file(tmp_path):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    c = load_config(env={"BMI_CONFIG": str(empty)})
    assert (c.server, c.token) == (DEFAULT_SERVER, None)
    (tmp_path / "tok").write_text("from-file\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text('token_file = "tok"\n')  # relative to the config file
    assert load_config(env={"BMI_CONFIG": str(cfg)}).token == "from-file"
    with pytest.raises(ConfigError):
        load_config(env={"BMI_CONFIG": str(tmp_path / "missing.toml")})


def test_tls_settings(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('ca_file = "tls/ca.pem"\ncert_file = "tls/me.pem"\nkey_file = "tls/me.key"\n')
    c = load_config(env={"BMI_CONFIG": str(cfg)})
    assert c.tls and c.ca_file == tmp_path / "tls/ca.pem"  # relative to the config file
    assert (c.cert_file, c.key_file) == (tmp_path / "tls/me.pem", tmp_path / "tls/me.key")
    c = load_config(env={"BMI_CONFIG": str(cfg), "BMI_CA_FILE": "/env/ca.pem"},
                    tls_files={"cert_file": "/flag/c.pem", "key_file": "/flag/c.key"})
    assert (str(c.ca_file), str(c.cert_file)) == ("/env/ca.pem", "/flag/c.pem")
    plain = tmp_path / "plain.toml"
    plain.write_text("")
    assert not load_config(env={"BMI_CONFIG": str(plain)}).tls
    assert load_config(env={"BMI_CONFIG": str(plain), "BMI_TLS": "1"}).tls
    assert load_config(env={"BMI_CONFIG": str(plain)}, tls=True).ca_file is None
    with pytest.raises(ConfigError, match="go together"):
        load_config(env={"BMI_CONFIG": str(plain), "BMI_CERT_FILE": "/c.pem"})


def test_cli_half_a_client_certificate_is_one_line(bmi):
    result = bmi("--cert-file", "/c.pem", "image", "ls")
    assert result.exit_code == 1
    assert result.stderr == "error: cert_file and key_file go together: give both or neither\n"


def test_default_config_path_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".config/bmi").mkdir(parents=True)
    (tmp_path / ".config/bmi/client.toml").write_text('token = "home-token"\n')
    assert load_config(env={}).token == "home-token"


@pytest.mark.parametrize(("flag", "env_token", "file_token", "expected"), [
    ("flag-t", "env-t", "file-t", "flag-t"),
    (None, "env-t", "file-t", "env-t"),
    (None, None, "file-t", "file-t"),
])
def test_cli_token_precedence(bmi, server, tmp_path, flag, env_token, file_token, expected):
    cfg = tmp_path / "prec.toml"
    cfg.write_text(f'token = "{file_token}"\nserver = "127.0.0.1:1"\n')
    extra = {"BMI_CONFIG": str(cfg), "BMI_SERVER": server.address}
    if env_token:
        extra["BMI_TOKEN"] = env_token
    result = bmi("image", "ls", token=flag, server_flag=False, **extra)
    assert result.exit_code == 1  # the fake only accepts TOKEN
    assert server.images.tokens == [f"Bearer {expected}"]


# -- retries ----------------------------------------------------------------------


def test_read_retried_on_unavailable(bmi, server, sleeps):
    server.images.fail["ListImages"] = [UNAVAILABLE]
    assert "snap-1" in ok(bmi("image", "ls")).stdout
    assert [r.page_token for r in server.images.requests["ListImages"]] == ["", "", "2"]
    assert len(sleeps) == 1


def test_read_gives_up_after_max_attempts(bmi, server, sleeps):
    server.images.fail["GetImage"] = [UNAVAILABLE] * 10
    result = bmi("image", "show", "centos-9")
    assert result.exit_code == 1
    assert result.stderr == "error: UNAVAILABLE: GetImage failed on purpose\n"
    assert len(server.images.requests["GetImage"]) == 4
    assert len(sleeps) == 3


def test_one_deadline_bounds_a_call_with_its_retries():
    """A server that answers UNAVAILABLE slowly (HIL hung behind it): the client's timeout
    bounds the whole call, each try getting what is left, not timeout x max_attempts."""
    left: list[float] = []

    class Nodes(nodes_pb2_grpc.NodeServiceServicer):
        def GetNode(self, request, context):
            left.append(context.time_remaining())
            time.sleep(0.5)
            context.abort(UNAVAILABLE, "HIL did not answer GET /v0/node/n1 within 10s")

    srv = grpc.server(ThreadPoolExecutor(max_workers=4))
    nodes_pb2_grpc.add_NodeServiceServicer_to_server(Nodes(), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        with BmiClient(f"127.0.0.1:{port}", TOKEN, timeout=1.2, max_attempts=4,
                       backoff_initial=0) as client:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError):
                client.get_node("n1")
            took = time.monotonic() - started
    finally:
        srv.stop(None)
    assert took < 1.6  # 4 tries of 0.5 s each would be 2 s
    assert 2 <= len(left) <= 3 and left[0] <= 1.2  # each try gets only what is left
    assert all(later < earlier - 0.4 for earlier, later in pairwise(left))


def test_url_imports_and_verifications_have_their_own_long_deadline():
    """They last as long as the server's download or read: URL_IMPORT_TIMEOUT unless the
    caller gives one, never the client's short default."""
    left: list[tuple[str, float]] = []

    class Images:
        def ImportImage(self, request, timeout, metadata):
            left.append(("import", timeout))
            return images_pb2.Image(name=request.name)

        def VerifyImage(self, request, timeout, metadata):
            left.append(("verify", timeout))
            return images_pb2.VerifyImageResponse(matches=True)

    with BmiClient("127.0.0.1:9", TOKEN, timeout=5) as client:
        client._images = Images()
        client.import_image_from_url("x", "https://h/x", "sha256:" + "a" * 64)
        client.verify_image("x")
        client.import_image_from_url("x", "https://h/x", "sha256:" + "a" * 64, timeout=7)
        client.verify_image("x", timeout=7)
    long = client_mod.URL_IMPORT_TIMEOUT
    assert [what for what, _ in left] == ["import", "verify"] * 2
    assert all(long - 5 < t <= long for _, t in left[:2])
    assert all(6 < t <= 7 for _, t in left[2:])


def test_the_cli_timeout_is_the_clients(bmi, server, monkeypatch):
    made = []
    monkeypatch.setattr("bmi_client.cli.BmiClient",
                        lambda *a, **kw: made.append(kw) or BmiClient(*a, **kw))
    ok(bmi("--timeout", "7.5", "image", "ls"))
    ok(bmi("image", "ls", BMI_TIMEOUT="4"))
    ok(bmi("image", "ls"))
    assert [kw.get("timeout") for kw in made] == [7.5, 4.0, None]


def test_every_subcommand_takes_json_after_it_too(bmi, server):
    def leaves(group, path=()):
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from leaves(command, (*path, name))
            else:
                yield (*path, name), command

    missing = [" ".join(p) for p, c in leaves(cli) if "--json" not in
               [o for param in c.params for o in getattr(param, "opts", [])]]
    assert missing == []
    data = json.loads(ok(bmi("image", "ls", "--json")).stdout)
    assert [d["name"] for d in data] == ["ubuntu-22.04", "centos-9", "snap-1"]
    assert json.loads(ok(bmi("disk", "show", "node-1", "--json")).stdout)["name"] == "node-1"
    assert json.loads(ok(bmi("image", "rm", "snap-1", "--json")).stdout) == {
        "deleted": "image", "name": "snap-1"}


def test_other_errors_not_retried(bmi, server, sleeps):
    server.images.fail["GetImage"] = [grpc.StatusCode.INTERNAL]
    assert bmi("image", "show", "centos-9").exit_code == 1
    assert len(server.images.requests["GetImage"]) == 1
    assert sleeps == []


def test_create_retry_reuses_request_id(bmi, server):
    server.disks.fail["CreateDisk"] = [UNAVAILABLE]
    ok(bmi("disk", "create", "node-2", "--image", "ubuntu-22.04"))
    first, second = server.disks.requests["CreateDisk"]
    assert first.request_id and first.request_id == second.request_id


def test_upload_retry_resends_whole_file_same_request_id(bmi, server, tmp_path):
    data = b"y" * (MiB + 1)
    path = tmp_path / "f.img"
    path.write_bytes(data)
    server.images.fail["UploadImage"] = [UNAVAILABLE]
    ok(bmi("image", "import", "up", "--file", str(path)))
    (h1, c1), (h2, c2) = _uploaded(server, 0), _uploaded(server, 1)
    assert h1.request_id == h2.request_id
    assert b"".join(c1) == b"".join(c2) == data


def test_update_and_delete_retries_reuse_request_id(bmi, server, sleeps):
    server.disks.fail["DeleteDisk"] = [UNAVAILABLE]
    server.images.fail["UpdateImage"] = [UNAVAILABLE]
    ok(bmi("disk", "rm", "node-1"))
    ok(bmi("image", "mv", "centos-9", "c9"))
    for requests in (server.disks.requests["DeleteDisk"], server.images.requests["UpdateImage"]):
        first, second = requests
        assert first.request_id and first.request_id == second.request_id
    assert len(sleeps) == 2


def test_backoff_grows_and_is_capped():
    c = BmiClient("127.0.0.1:1", "t", backoff_initial=0.5, backoff_max=2.0)
    try:
        for attempt, cap in [(0, 0.5), (1, 1.0), (2, 2.0), (6, 2.0)]:
            values = [c._backoff(attempt) for _ in range(200)]
            assert all(0 <= v <= cap for v in values)
            assert max(values) > cap / 2  # jittered across the range, not a constant
    finally:
        c.close()


def test_client_requires_token():
    with pytest.raises(ValueError):
        BmiClient("127.0.0.1:1", "")


def test_upload_format_guess(tmp_path: Path):
    q = tmp_path / "q"
    q.write_bytes(b"QFI\xfbrest")
    r = tmp_path / "r"
    r.write_bytes(b"QF")
    assert client_mod.guess_format(q) == images_pb2.IMAGE_FORMAT_QCOW2
    assert client_mod.guess_format(r) == images_pb2.IMAGE_FORMAT_RAW


# -- several servers (replicas of one service) ----------------------------------------


@pytest.fixture
def second_server():
    yield from fake_server()


def test_unavailable_server_fails_over_to_the_next_with_the_same_request_id(
    server, second_server, sleeps
):
    server.disks.fail["CreateDisk"] = [UNAVAILABLE]
    with BmiClient([server.address, second_server.address], TOKEN) as client:
        client.create_disk("node-2", "ubuntu-22.04")
        assert client.server == second_server.address  # stays on the one that answered
        client.get_image("centos-9")
    (first,) = server.disks.requests["CreateDisk"]
    (second,) = second_server.disks.requests["CreateDisk"]
    assert first.request_id and first.request_id == second.request_id
    assert sleeps == []  # the next server is tried at once
    assert len(second_server.images.requests["GetImage"]) == 1
    assert "GetImage" not in server.images.requests


def test_comma_separated_servers_and_a_dead_one(server, sleeps):
    dead = f"127.0.0.1:{free_port()}"
    with BmiClient(f"{dead},{server.address}", TOKEN) as client:
        assert client.servers == [dead, server.address]
        client.get_image("centos-9")
    assert len(server.images.requests["GetImage"]) == 1


def test_attempts_are_rounds_over_every_server(server, second_server, sleeps):
    server.images.fail["GetImage"] = [UNAVAILABLE] * 10
    second_server.images.fail["GetImage"] = [UNAVAILABLE] * 10
    client = BmiClient([server.address, second_server.address], TOKEN, max_attempts=3)
    with client, pytest.raises(grpc.RpcError) as err:
        client.get_image("centos-9")
    assert err.value.code() == UNAVAILABLE
    assert len(server.images.requests["GetImage"]) == 3
    assert len(second_server.images.requests["GetImage"]) == 3
    assert len(sleeps) == 2  # one pause after each full round but the last


def test_deprovision_is_retried_with_its_request_id():
    requests = []

    class Nodes(nodes_pb2_grpc.NodeServiceServicer):
        def DeprovisionNode(self, request, context):
            requests.append(request)
            if len(requests) == 1:
                context.abort(UNAVAILABLE, "replica going away")
            return nodes_pb2.Node(name=request.node)

    srv = grpc.server(ThreadPoolExecutor(max_workers=2))
    nodes_pb2_grpc.add_NodeServiceServicer_to_server(Nodes(), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    try:
        with BmiClient(f"127.0.0.1:{port}", TOKEN, backoff_initial=0) as client:
            assert client.deprovision_node("n1").name == "n1"
    finally:
        srv.stop(None)
    first, second = requests
    assert first.request_id and first.request_id == second.request_id
