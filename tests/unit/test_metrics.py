"""Prometheus metrics: RPC counts by method and final status code, phase durations,
node counts by state."""

from __future__ import annotations

import contextlib

import grpc
from bmi.v1 import images_pb2, images_pb2_grpc
from principals import ADMIN
from prometheus_client import generate_latest

from bmi_server.api.metrics import Metrics, NodeStateCollector, PhaseTimer
from bmi_server.core.errors import Unauthenticated
from bmi_server.core.models import NodeState
from bmi_server.server import build_grpc_server


class _AdminOnly:
    def authenticate(self, credentials, *_):
        if credentials != "Bearer admin":
            raise Unauthenticated("invalid token")
        return ADMIN


def _scrape(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_rpcs_are_counted_with_the_code_they_ended_with(core, inspector, tmp_path):
    metrics = Metrics()
    server = build_grpc_server(core, inspector, _AdminOnly(), tmp_path, workers=2,
                               metrics=metrics)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = images_pb2_grpc.ImageServiceStub(channel)
            ok = (("authorization", "Bearer admin"),)
            stub.ListImages(images_pb2.ListImagesRequest(), metadata=ok)
            for metadata in (ok, (("authorization", "Bearer wrong"),)):
                with contextlib.suppress(grpc.RpcError):
                    stub.GetImage(images_pb2.GetImageRequest(image="nope"), metadata=metadata)
    finally:
        server.stop(0)
    text = _scrape(metrics)
    assert 'bmi_rpc_total{code="OK",method="/bmi.v1.ImageService/ListImages"} 1.0' in text
    assert 'bmi_rpc_total{code="NOT_FOUND",method="/bmi.v1.ImageService/GetImage"} 1.0' in text
    assert ('bmi_rpc_total{code="UNAUTHENTICATED",method="/bmi.v1.ImageService/GetImage"} 1.0'
            in text)
    assert 'bmi_rpc_seconds_count{method="/bmi.v1.ImageService/ListImages"} 1.0' in text


def test_phase_durations_and_node_counts(core):
    metrics = Metrics()
    timer = PhaseTimer(metrics, core.registry.events)
    timer.record("n1", NodeState.PROVISIONING, 100.0)
    timer.record("n1", NodeState.PROVISIONED, 100.4)
    timer.record("n1", NodeState.BOOTING, 110.0)
    timer.record("n1", NodeState.ACTIVE, 112.5)
    timer.stop()
    text = _scrape(metrics)
    assert 'bmi_node_phase_seconds_sum{phase="provision"} 0.4' in text
    assert 'bmi_node_phase_seconds_sum{phase="boot"} 2.5' in text
    core.registry.enrol(ADMIN, name="n1", project="p", macs=["52:54:00:00:00:07"])
    core.registry.enrol(ADMIN, name="n2", project="p", macs=["52:54:00:00:00:08"])
    metrics.registry.register(NodeStateCollector(core.state))
    text = _scrape(metrics)
    assert 'bmi_nodes{state="available"} 2.0' in text
    assert 'bmi_nodes{state="active"} 0.0' in text


def test_nodes_are_counted_by_session(core, state, store, inspector, targets, tmp_path):
    from datetime import UTC, datetime

    from test_catalogue import upload

    from bmi_server.api.metrics import NodeSessionCollector
    from bmi_server.core.models import SessionState, Visibility

    upload(core, store, inspector, tmp_path, ADMIN, "golden", project="p",
           visibility=Visibility.PUBLIC)
    for n in range(3):
        core.registry.enrol(ADMIN, name=f"m{n}", project="p", macs=[f"52:54:00:00:01:0{n}"])
        core.provisioner.provision(ADMIN, f"m{n}", image="golden")
    core.registry.enrol(ADMIN, name="bare", project="p", macs=["52:54:00:00:01:09"])
    iqns = sorted(state.target_sessions())
    state.record_session(iqns[0], SessionState.LOGGED_IN, datetime.now(UTC))
    state.record_session(iqns[1], SessionState.ENDED, datetime.now(UTC))
    metrics = Metrics()
    metrics.registry.register(NodeSessionCollector(core.state))
    text = _scrape(metrics)
    assert 'bmi_node_sessions{session="logged_in"} 1.0' in text
    assert 'bmi_node_sessions{session="ended"} 1.0' in text
    assert 'bmi_node_sessions{session="none"} 1.0' in text  # "bare" has no target: not counted
