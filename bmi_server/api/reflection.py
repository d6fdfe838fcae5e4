"""gRPC server reflection under both names clients ask for: ``grpc.reflection.v1``
(grpcurl and current tools) and ``grpc.reflection.v1alpha`` (older ones).

grpcio-reflection (1.85) ships only v1alpha. v1 is the same protocol, message for
message and field for field, in another package, so v1 is served by the same servicer
with v1alpha's messages on the wire, and its descriptor (v1alpha's, renamed) is added
to the pool so reflection can describe itself under either name.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha

V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
V1ALPHA_SERVICE = reflection.SERVICE_NAME
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(_V1_FILE)
        return  # added already (another server in this process), or the real one
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha.DESCRIPTOR.CopyToProto(proto)
    old = "." + proto.package + "."
    proto.name, proto.package = _V1_FILE, V1_PACKAGE
    proto.options.Clear()
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = f".{V1_PACKAGE}." + field.type_name[len(old):]
    for service in proto.service:
        for method in service.method:
            method.input_type = f".{V1_PACKAGE}." + method.input_type[len(old):]
            method.output_type = f".{V1_PACKAGE}." + method.output_type[len(old):]
    pool.Add(proto)


def enable_server_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """Serve reflection (both versions) listing ``service_names`` and the two
    reflection services themselves."""
    _add_v1_descriptor(descriptor_pool.Default())
    servicer = reflection.ReflectionServicer((*service_names, V1_SERVICE, V1ALPHA_SERVICE))
    for name in (V1ALPHA_SERVICE, V1_SERVICE):
        handler = grpc.method_handlers_generic_handler(name, {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=v1alpha.ServerReflectionRequest.FromString,
                response_serializer=v1alpha.ServerReflectionResponse.SerializeToString,
            ),
        })
        server.add_generic_rpc_handlers((handler,))
