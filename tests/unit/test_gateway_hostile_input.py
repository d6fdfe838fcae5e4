"""GatewayService under hostile input, over a real gRPC server: whatever a gateway (or
anyone) sends, the answer is a clear status, never INTERNAL, and a refused request changes
no gateway or target."""

from __future__ import annotations

import grpc
import pytest
from bmi.v1 import gateway_pb2, gateway_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hostile_input import CLEAR_CODES, hostile_int, hostile_text

from bmi_server.core.gateways import GatewayDirectory, GatewayExports
from bmi_server.server import Core, build_grpc_server

CASES = settings(max_examples=100, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])
GOOD = (("authorization", "Bearer gw1-token"),)


class _GatewayTokens:
    def authenticate(self, credentials):
        from bmi_server.core.errors import Unauthenticated

        if credentials == "Bearer gw1-token":
            return "gw1"
        raise Unauthenticated("invalid gateway token")


class _NoTenants:
    def authenticate(self, credentials, *_):
        from bmi_server.core.errors import Unauthenticated

        raise Unauthenticated("no tenants here")


@pytest.fixture
def stub(state, store, inspector, tmp_path):
    exports = GatewayExports(state)
    core = Core.build(state, store, exports, advertised_portals=[], portal_source=exports,
                      gateways=GatewayDirectory(exports))
    server = build_grpc_server(core, inspector, _NoTenants(), tmp_path / "spool", workers=4,
                               gateway_authenticator=_GatewayTokens())
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield gateway_pb2_grpc.GatewayServiceStub(channel), state
    channel.close()
    server.stop(0)


def world(state):
    return ([(g.name, g.portals) for g in state.list_gateways()],
            sorted((a.gateway, a.iqn, a.status) for a in state.all_assignments()))


@CASES
@given(name=hostile_text, portals=st.lists(hostile_text, max_size=10), incarnation=hostile_text,
       logged_in=st.lists(hostile_text, max_size=5), token=st.sampled_from([None, "x", "gw1"]))
def test_heartbeats(stub, name, portals, incarnation, logged_in, token):
    gateways, state = stub
    metadata = GOOD if token == "gw1" else ((("authorization", f"Bearer {token}"),) if token
                                            else ())
    before = world(state)
    request = gateway_pb2.HeartbeatGatewayRequest(name=name, portals=portals,
                                                  incarnation=incarnation,
                                                  logged_in_iqns=logged_in)
    try:
        gateways.HeartbeatGateway(request, metadata=metadata, timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() in CLEAR_CODES, exc.details()
        assert world(state) == before
        return
    assert token == "gw1" and name == "gw1"


@CASES
@given(iqn=hostile_text, revision=hostile_int, outcome=st.integers(-1, 5), detail=hostile_text)
def test_reports(stub, iqn, revision, outcome, detail):
    gateways, state = stub
    before = world(state)
    report = gateway_pb2.TargetReport(iqn=iqn, revision=revision, outcome=outcome, detail=detail)
    try:
        gateways.ReportTargets(gateway_pb2.ReportTargetsRequest(name="gw1", reports=[report]),
                               metadata=GOOD, timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() in CLEAR_CODES, exc.details()
    assert world(state) == before  # nothing was assigned: no report can change anything


@CASES
@given(name=hostile_text, revision=hostile_int)
def test_watches(stub, name, revision):
    gateways, _ = stub
    call = gateways.WatchTargets(gateway_pb2.WatchTargetsRequest(name=name, revision=revision),
                                 metadata=GOOD, timeout=10)
    try:
        first = next(call)
    except grpc.RpcError as exc:
        assert exc.code() in CLEAR_CODES, exc.details()
        return
    finally:
        call.cancel()
    assert name == "gw1" and revision >= 0 and (first.reset or revision > 0)
