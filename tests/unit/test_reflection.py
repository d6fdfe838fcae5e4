"""gRPC server reflection is served as grpc.reflection.v1 (what grpcurl and current
tools ask for) and as v1alpha (older clients), each able to describe the API, to callers
with credentials."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2 as messages
from principals import ADMIN

from bmi_server.core.errors import Unauthenticated
from bmi_server.server import build_grpc_server

TOKEN = (("authorization", "Bearer admin"),)


class _Tokens:
    def authenticate(self, credentials, *_):
        if credentials != "Bearer admin":
            raise Unauthenticated("invalid token")
        return ADMIN


@pytest.fixture
def channel(core, inspector, tmp_path):
    server = build_grpc_server(core, inspector, _Tokens(), tmp_path / "spool", workers=2)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    server.stop(0)


def ask(channel, version: str, metadata=TOKEN, **request) -> messages.ServerReflectionResponse:
    info = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=messages.ServerReflectionRequest.SerializeToString,
        response_deserializer=messages.ServerReflectionResponse.FromString,
    )
    (reply,) = info(iter([messages.ServerReflectionRequest(**request)]), timeout=10,
                    metadata=metadata)
    return reply


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_is_served_as_v1_and_v1alpha(channel, version):
    listed = ask(channel, version, list_services="")
    names = {s.name for s in listed.list_services_response.service}
    assert {"bmi.v1.ImageService", "bmi.v1.DiskService", "bmi.v1.NodeService",
            "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    for symbol, package in [("bmi.v1.NodeService", "bmi.v1"),
                            ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1")]:
        reply = ask(channel, version, file_containing_symbol=symbol)
        files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                 for raw in reply.file_descriptor_response.file_descriptor_proto]
        assert package in {f.package for f in files}, reply


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_needs_credentials(channel, version):
    with pytest.raises(grpc.RpcError) as refused:
        ask(channel, version, metadata=(), list_services="")
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
