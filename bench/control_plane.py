"""Control-plane latency: List/Get RPCs with many nodes and images in the catalogue.

The images are catalogue rows written straight into the server's database (List/Get
read only the database; uploading thousands of images would measure Ceph instead).
Baseline: a bare grpcio server answering the same RPC with a constant response of the
same size, same client, same run.
"""

from __future__ import annotations

from concurrent import futures

import grpc
from bmi.v1 import images_pb2, images_pb2_grpc
from bmi_client.client import BmiClient

from bench.common import Figure, Results, median, percentile, scale, timed
from bmi_server.adapters.sql.store import SqlStateStore
from bmi_server.core.models import Image, ImageKind, ResourceState
from bmi_server.core.naming import new_id, volume_name
from bmi_server.devenv.stack import DevStack

NODES = 1000
IMAGES = scale(1000, 5000)
CALLS = scale(200, 1000)
PAGE = 50


class _Constant(images_pb2_grpc.ImageServiceServicer):
    def __init__(self, reply: images_pb2.ListImagesResponse) -> None:
        self.reply = reply

    def ListImages(self, request, context):
        return self.reply


def _bare_server(reply: images_pb2.ListImagesResponse) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(16))
    images_pb2_grpc.add_ImageServiceServicer_to_server(_Constant(reply), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def _latencies(call) -> list[float]:
    for _ in range(20):
        call()  # warm up
    return [timed(call) for _ in range(CALLS)]


def run(results: Results) -> None:
    with DevStack() as stack, BmiClient(stack.address, stack.admin_token) as bmi:
        state = SqlStateStore(f"sqlite:///{stack.dir / 'server' / 'bmi.sqlite3'}")
        for i in range(IMAGES):
            image_id = new_id("img-")
            state.add_image(Image(id=image_id, name=f"img{i:05d}", project=f"p{i % 50}",
                                  kind=ImageKind.GOLDEN, size_bytes=1 << 30,
                                  volume=volume_name(image_id), state=ResourceState.READY))
        state.close()
        for i in range(NODES):
            bmi.enroll_node(f"n{i:05d}", f"p{i % 50}",
                            macs=["52:54:04:" + ":".join(f"{b:02x}" for b in i.to_bytes(3, "big"))])
        some_image = next(iter(bmi.list_images_page(page_size=1).images)).id
        calls = {
            "ListImages": lambda: bmi.list_images_page(page_size=PAGE),
            "GetImage": lambda: bmi.get_image(some_image),
            "ListNodes": lambda: bmi.list_nodes_page(page_size=PAGE),
            "GetNode": lambda: bmi.get_node("n00500"),
        }
        measured = {name: _latencies(call) for name, call in calls.items()}
        reply = bmi.list_images_page(page_size=PAGE)
    bare, address = _bare_server(reply)
    with grpc.insecure_channel(address) as channel:
        stub = images_pb2_grpc.ImageServiceStub(channel)
        base = _latencies(lambda: stub.ListImages(images_pb2.ListImagesRequest(), timeout=10))
    bare.stop(0)
    for name, lat in measured.items():
        for p, value, ref in ((50, median(lat), median(base)),
                              (99, percentile(lat, 99), percentile(base, 99))):
            results.add(Figure("control plane", f"{name} p{p} ({NODES} nodes, {IMAGES} images)",
                               value * 1000, "ms", ref * 1000,
                               f"bare grpcio, constant {PAGE}-image page"))
