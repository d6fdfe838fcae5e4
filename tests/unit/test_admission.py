"""Admission control of the gRPC server: streams cannot take the unary calls' capacity,
callers are capped, anonymous callers only watch health, refusals carry a retry hint,
and every slot comes back when its call ends."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import pytest
from bmi.v1 import images_pb2, images_pb2_grpc, nodes_pb2, nodes_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from principals import ADMIN

from bmi_server.api.admission import RETRY_AFTER_METADATA, AdmissionInterceptor, AdmissionLimits
from bmi_server.api.rpc_executor import ElasticExecutor, RpcExecutor
from bmi_server.core.errors import Unauthenticated
from bmi_server.core.models import Principal
from bmi_server.server import build_grpc_server

LIMITS = AdmissionLimits(workers=2, max_queued=2, max_streams=8, max_streams_per_caller=3)
ALICE = (("authorization", "Bearer alice"),)
BOB = (("authorization", "Bearer bob"),)


class _Tokens:
    def authenticate(self, credentials, *_):
        if credentials == "Bearer admin":
            return ADMIN
        for name in ("alice", "bob", "carol"):
            if credentials == f"Bearer {name}":
                return Principal(name=name, project=name)
        raise Unauthenticated("invalid token")


@pytest.fixture
def served(core, inspector, tmp_path):
    server = build_grpc_server(core, inspector, _Tokens(), tmp_path / "spool", limits=LIMITS)
    admission = next(i for i in server._state.interceptor_pipeline.interceptors
                     if isinstance(i, AdmissionInterceptor))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel, admission
    channel.close()
    server.stop(0)


def _watch(channel, metadata=()):
    call = nodes_pb2_grpc.NodeServiceStub(channel).WatchNodes(
        nodes_pb2.WatchNodesRequest(), metadata=metadata, timeout=30)
    return call


def _health_watch(channel, metadata=()):
    call = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(), metadata=metadata, timeout=30)
    assert next(call).status == health_pb2.HealthCheckResponse.SERVING  # open and live
    return call


def _refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        for _ in call:
            pass
    return caught.value


def _retry_after(error: grpc.RpcError) -> int | None:
    for key, value in error.trailing_metadata() or ():
        if key == RETRY_AFTER_METADATA:
            return int(value)
    return None


def _wait(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _list_images(channel, metadata=ALICE):
    return images_pb2_grpc.ImageServiceStub(channel).ListImages(
        images_pb2.ListImagesRequest(), metadata=metadata, timeout=5)


def test_only_health_is_open_to_anonymous_callers(served):
    channel, admission = served
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    assert _refusal(reflection).code() == grpc.StatusCode.UNAUTHENTICATED
    assert _refusal(_watch(channel)).code() == grpc.StatusCode.UNAUTHENTICATED
    bogus = (("authorization", "Bearer nobody"),)
    assert _refusal(_watch(channel, bogus)).code() == grpc.StatusCode.UNAUTHENTICATED
    watches = [_health_watch(channel) for _ in range(LIMITS.max_streams_per_caller)]
    # A bogus token does not make a new caller: it is anonymous too.
    error = _refusal(health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(), metadata=bogus, timeout=5))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _retry_after(error) > 0
    # Health checks (unary) and other callers' streams are still served.
    assert health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    ours = _health_watch(channel, ALICE)
    for call in [*watches, ours]:
        call.cancel()
    assert _wait(lambda: admission.open_streams == 0)


def test_streams_take_nothing_from_unary_calls_and_are_capped_per_caller(served):
    channel, admission = served
    held = [_watch(channel, who) for who in (ALICE, BOB) for _ in range(3)]
    for call in held:
        call.initial_metadata()  # the watch is live
    assert _watch(channel, ALICE).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    carol = (("authorization", "Bearer carol"),)
    held += [_watch(channel, carol), _watch(channel, carol)]
    for call in held[-2:]:
        call.initial_metadata()
    assert admission.open_streams == LIMITS.max_streams
    # The server's stream budget is spent: anyone's next stream is refused, with a hint.
    error = _refusal(_watch(channel, (("authorization", "Bearer admin"),)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and _retry_after(error) > 0
    # Unary calls are served meanwhile, many of them, at once.
    with futures.ThreadPoolExecutor(LIMITS.workers) as pool:
        answers = list(pool.map(lambda _: _list_images(channel), range(40)))
    assert len(answers) == 40
    for call in held:
        call.cancel()
    assert _wait(lambda: admission.open_streams == 0)
    _watch(channel, ALICE).initial_metadata()  # a slot again


def test_uploads_that_send_only_their_header_are_streams(served):
    channel, admission = served
    stop = threading.Event()

    def header_only():
        yield images_pb2.UploadImageRequest(header=images_pb2.UploadImageHeader(
            name="x", file_size_bytes=1 << 20, format=images_pb2.IMAGE_FORMAT_RAW))
        stop.wait(30)

    stub = images_pb2_grpc.ImageServiceStub(channel)
    uploads = [stub.UploadImage.future(header_only(), metadata=ALICE, timeout=30)
               for _ in range(4)]
    assert _wait(lambda: admission.open_streams == 3 and sum(u.done() for u in uploads) == 1)
    refused = next(u for u in uploads if u.done()).exception()
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _list_images(channel) is not None
    stop.set()
    for upload in uploads:
        upload.cancel()
    assert _wait(lambda: admission.open_streams == 0)


def test_long_unary_calls_take_the_streams_lane_not_a_unary_worker(served, core, monkeypatch):
    """An import (a copy of a whole volume, or an hours-long URL fetch) held open: unary
    calls are still served by every worker, and the caller's cap applies to imports."""
    channel, admission = served
    release = threading.Event()

    def slow_import(*args, **kwargs):
        release.wait(20)
        raise Unauthenticated("stopped")  # any answer: the call only has to end

    monkeypatch.setattr(core.images, "import_volume", slow_import)
    stub = images_pb2_grpc.ImageServiceStub(channel)
    imports = [stub.ImportImage.future(images_pb2.ImportImageRequest(
        name=f"i{n}", source_rbd_image="vol"), metadata=ALICE, timeout=30) for n in range(4)]
    assert _wait(lambda: admission.open_streams == 3 and sum(i.done() for i in imports) == 1)
    refused = next(i for i in imports if i.done()).exception()
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert admission.unary_in_flight == 0
    with futures.ThreadPoolExecutor(LIMITS.workers) as pool:
        assert len(list(pool.map(lambda _: _list_images(channel), range(10)))) == 10
    release.set()
    assert _wait(lambda: admission.open_streams == 0)


def test_unary_calls_past_the_queue_are_refused_with_a_hint(served, core, monkeypatch):
    channel, admission = served
    slow = threading.Event()
    listing = core.images.list

    def held(*args, **kwargs):
        slow.wait(10)
        return listing(*args, **kwargs)

    monkeypatch.setattr(core.images, "list", held)
    stub = images_pb2_grpc.ImageServiceStub(channel)
    calls = [stub.ListImages.future(images_pb2.ListImagesRequest(), metadata=ALICE, timeout=20)
             for _ in range(LIMITS.workers + LIMITS.max_queued + 2)]
    assert _wait(lambda: sum(c.done() for c in calls) == 2)
    for call in [c for c in calls if c.done()]:
        assert call.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _retry_after(call.exception()) > 0
    slow.set()
    assert sum(c.exception() is None for c in calls) == LIMITS.workers + LIMITS.max_queued
    assert _wait(lambda: admission.unary_in_flight == 0)


def test_idle_threads_end():
    executor = ElasticExecutor(8, idle_seconds=0.2)
    gate = threading.Event()
    results = [executor.submit(gate.wait, 5) for _ in range(8)]
    queued = executor.submit(lambda: "done")
    assert executor.threads == 8
    gate.set()
    assert queued.result(5) == "done" and all(r.result(5) for r in results)
    assert _wait(lambda: executor.threads == 0, 5)
    executor.shutdown()


def test_calls_go_to_their_lane_and_give_their_slot_back():
    executor = RpcExecutor(workers=1, stream_threads=4, idle_seconds=0.2)
    released = threading.Event()
    executor.route_next(unary=True, release=released.set)
    assert executor.submit(lambda: threading.current_thread().name).result(5).startswith("rpc_")
    assert released.wait(5)
    executor.route_next(unary=False)
    assert executor.submit(lambda: threading.current_thread().name).result(5).startswith(
        "rpc-stream")
    # A route never used (the call was not submitted) gives its slot back at the next one.
    stale = threading.Event()
    executor.route_next(unary=True, release=stale.set)
    executor.route_next(unary=True)
    assert stale.is_set()
    executor.shutdown()


class _Refused(grpc.RpcError):
    def __init__(self, code, trailing=()):
        self._code, self._trailing = code, trailing

    def code(self):
        return self._code

    def trailing_metadata(self):
        return self._trailing


def test_the_python_client_retries_a_busy_server_after_its_hint(monkeypatch):
    from bmi_client import client as bmi_client

    slept: list[float] = []
    monkeypatch.setattr(bmi_client.time, "sleep", slept.append)
    client = bmi_client.BmiClient("127.0.0.1:9", token="t", timeout=30)
    busy = _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, (("retry-after-ms", "200"),))
    answers = [busy] * 6 + ["done"]

    def call(left):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    # Even a call that is not retried otherwise: the server did nothing with it.
    assert client._retrying(call, retry=False) == "done"
    assert len(slept) == 6 and all(0.2 <= s <= 0.3 for s in slept)
    quota = _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED)  # a quota: no hint, no retry
    answers[:] = [quota, "done"]
    with pytest.raises(grpc.RpcError):
        client._retrying(call, retry=True)
    client.close()


def test_refusals_and_what_is_held_are_metrics(core, inspector, tmp_path):
    from prometheus_client import generate_latest

    from bmi_server.api.metrics import Metrics

    metrics = Metrics()
    limits = AdmissionLimits(workers=1, max_queued=0, max_streams=4, max_streams_per_caller=1)
    server = build_grpc_server(core, inspector, _Tokens(), tmp_path / "spool", limits=limits,
                               metrics=metrics)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            held = _health_watch(channel, ALICE)
            assert _refusal(_watch(channel, ALICE)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            def scraped() -> str:
                return generate_latest(metrics.registry).decode()

            assert 'bmi_grpc_refused_total{reason="caller"} 1.0' in scraped()
            # The refused stream's slot comes back once its thread is done with it.
            assert _wait(lambda: 'bmi_serving_in_flight{kind="stream"} 1.0' in scraped())
            held.cancel()
    finally:
        server.stop(0)
