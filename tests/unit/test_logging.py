"""Structured logs: JSON lines carrying the request id of the RPC, which the caller can
choose (x-request-id) and always gets back."""

from __future__ import annotations

import json
import logging

import grpc
from bmi.v1 import images_pb2, images_pb2_grpc
from principals import ADMIN

from bmi_server.api import logging_setup
from bmi_server.server import build_grpc_server


class _Admin:
    def authenticate(self, credentials, *_):
        logging.getLogger("bmi_server.test").warning("authenticating")
        return ADMIN


def test_json_logs_carry_the_request_id_and_the_caller_gets_it_back(core, inspector, tmp_path,
                                                                    capfd):
    logging_setup.configure("INFO", "json")
    server = build_grpc_server(core, inspector, _Admin(), tmp_path, workers=2)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = images_pb2_grpc.ImageServiceStub(channel)
            _, call = stub.ListImages.with_call(images_pb2.ListImagesRequest(),
                                                metadata=(("x-request-id", "req-42"),))
            chosen = dict(call.trailing_metadata())["x-request-id"]
            _, call = stub.ListImages.with_call(images_pb2.ListImagesRequest(),
                                                metadata=(("x-request-id", "bad id"),))
            generated = dict(call.trailing_metadata())["x-request-id"]
    finally:
        server.stop(0)
        logging.getLogger().handlers.clear()
    assert chosen == "req-42"
    assert generated != "bad id" and len(generated) == 16
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.strip()]
    ours = [e for e in lines if e["message"] == "authenticating"]
    assert [e["request_id"] for e in ours] == ["req-42", generated]
    assert all({"time", "level", "logger"} <= e.keys() for e in ours)
