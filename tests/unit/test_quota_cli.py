"""`bmi quota show|set` and BmiClient's quota calls against an in-process fake
QuotaService that records what it was sent."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from bmi.v1 import quotas_pb2, quotas_pb2_grpc
from bmi_client.cli import cli
from click.testing import CliRunner

TIB = 1 << 40


class FakeQuotas(quotas_pb2_grpc.QuotaServiceServicer):
    def __init__(self) -> None:
        self.seen: list[tuple[str, object]] = []
        self.quota = quotas_pb2.Quota(
            project="alice",
            virtual_bytes=quotas_pb2.QuotaLimit(limit=100 * TIB, used=3 * TIB),
            images=quotas_pb2.QuotaLimit(limit=5, used=7, overridden=True),
            disks=quotas_pb2.QuotaLimit(limit=0, used=12, overridden=True),
        )

    def GetQuota(self, request, context):
        self.seen.append(("GetQuota", request))
        return self.quota

    def SetQuota(self, request, context):
        self.seen.append(("SetQuota", request))
        if request.project == "full":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "only admins may set quotas")
        return self.quota


@pytest.fixture
def quotas():
    fake = FakeQuotas()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    quotas_pb2_grpc.add_QuotaServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    fake.address = f"127.0.0.1:{port}"
    yield fake
    server.stop(None)


@pytest.fixture
def bmi(quotas, tmp_path):
    config = tmp_path / "client.toml"
    config.write_text("")
    env = {"BMI_CONFIG": str(config), "BMI_SERVER": quotas.address, "BMI_TOKEN": "t",
           "COLUMNS": "40"}

    def run(*args: str):
        return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)

    return run


def test_show_is_a_table_of_limit_used_and_free(bmi, quotas):
    out = bmi("quota", "show")
    assert out.exit_code == 0, out.output
    lines = [line.split() for line in out.output.splitlines()]
    assert lines[0] == ["quota", "of", "project", "alice"]
    assert lines[1] == ["LIMIT", "USED", "FREE", "SET", "BY"]
    assert lines[2] == ["bytes", "100.0", "TiB", "3.0", "TiB", "97.0", "TiB", "default"]
    # An admin lowered the limit below what the project holds: nothing free.
    assert lines[3] == ["images", "5", "7", "0", "(over", "by", "2)", "project"]
    assert lines[4] == ["disks", "unlimited", "12", "-", "project"]
    assert quotas.seen == [("GetQuota", quotas_pb2.GetQuotaRequest())]
    bmi("quota", "show", "--project", "bob")
    assert quotas.seen[-1][1].project == "bob"


def test_show_json_has_every_field(bmi):
    data = json.loads(bmi("--json", "quota", "show").output)
    assert data["project"] == "alice"
    assert data["disks"] == {"limit": "0", "used": "12", "overridden": True}
    assert data["virtual_bytes"]["overridden"] is False


def test_set_sends_only_the_limits_given(bmi, quotas):
    out = bmi("quota", "set", "alice", "--bytes", "10T", "--images", "0")
    assert out.exit_code == 0, out.output
    assert "quota of project alice" in out.output
    method, request = quotas.seen[-1]
    assert (method, request.project, request.max_virtual_bytes, request.max_images) == (
        "SetQuota", "alice", 10 * TIB, 0)
    assert request.HasField("max_images") and not request.HasField("max_disks")
    assert not request.reset
    bmi("quota", "set", "alice", "--disks", "20", "--reset")
    request = quotas.seen[-1][1]
    assert (request.max_disks, request.reset) == (20, True)
    assert not request.HasField("max_virtual_bytes")
    for size, expected in (("500G", 500 << 30), ("1.5TiB", 3 * TIB // 2), ("4096", 4096)):
        bmi("quota", "set", "alice", "--bytes", size)
        assert quotas.seen[-1][1].max_virtual_bytes == expected


@pytest.mark.parametrize("args", [["alice"], ["alice", "--bytes", "10X"],
                                  ["alice", "--images", "-1"], ["--images", "3"]])
def test_set_refuses_bad_input_before_calling(bmi, quotas, args):
    out = bmi("quota", "set", *args)
    assert out.exit_code == 2
    assert quotas.seen == []


def test_a_refusal_is_one_line(bmi):
    out = bmi("quota", "set", "full", "--images", "3")
    assert out.exit_code == 1
    assert out.output == "error: PERMISSION_DENIED: only admins may set quotas\n"
