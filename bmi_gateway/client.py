"""The gateway's side of bmi.v1.GatewayService: protobuf in and out of core records."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import grpc
from bmi.v1 import gateway_pb2, gateway_pb2_grpc

from bmi_server.core.models import ExportStatus, TargetChange, TargetReport, TargetSpec, WatchBatch

_OUTCOME = {
    ExportStatus.APPLIED: gateway_pb2.TARGET_OUTCOME_APPLIED,
    ExportStatus.FAILED: gateway_pb2.TARGET_OUTCOME_FAILED,
    None: gateway_pb2.TARGET_OUTCOME_REMOVED,
}
CALL_TIMEOUT = 20.0


class GatewayClient:
    def __init__(self, address: str, token: str,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        """``credentials``: TLS (see bmi_client.client.channel_credentials); None: plain."""
        self._channel = (grpc.secure_channel(address, credentials) if credentials
                         else grpc.insecure_channel(address))
        self._stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._watch: grpc.Call | None = None

    def close(self) -> None:
        self.cancel_watch()
        self._channel.close()

    def heartbeat(self, name: str, portals: Sequence[str], incarnation: str,
                  logged_in: Iterable[str]) -> tuple[int, int]:
        """(heartbeat_seconds, expiry_seconds) the server asks for."""
        reply = self._stub.HeartbeatGateway(
            gateway_pb2.HeartbeatGatewayRequest(
                name=name, portals=list(portals), incarnation=incarnation,
                logged_in_iqns=sorted(logged_in)),
            metadata=self._metadata, timeout=CALL_TIMEOUT)
        return reply.heartbeat_seconds, reply.expiry_seconds

    def watch(self, name: str, revision: int) -> Iterator[WatchBatch]:
        """Batches until the stream ends or fails (grpc.RpcError) or cancel_watch()."""
        call = self._stub.WatchTargets(
            gateway_pb2.WatchTargetsRequest(name=name, revision=revision),
            metadata=self._metadata)
        self._watch = call
        try:
            for message in call:
                yield batch_of(message)
        finally:
            self._watch = None

    def cancel_watch(self) -> None:
        call = self._watch
        if call is not None:
            call.cancel()

    def report(self, name: str, reports: Sequence[TargetReport]) -> None:
        self._stub.ReportTargets(
            gateway_pb2.ReportTargetsRequest(name=name, reports=[
                gateway_pb2.TargetReport(iqn=r.iqn, revision=r.revision,
                                         outcome=_OUTCOME[r.status], detail=r.detail,
                                         portals=list(r.portals))
                for r in reports]),
            metadata=self._metadata, timeout=CALL_TIMEOUT)


def batch_of(message: gateway_pb2.WatchTargetsResponse) -> WatchBatch:
    changes = [
        TargetChange(t.revision, t.iqn, TargetSpec(
            iqn=t.iqn, volume=t.volume, initiator_iqn=t.initiator_iqn, chap_user=t.chap_user,
            chap_secret=t.chap_secret, config_volume=t.config_volume))
        for t in message.targets
    ]
    changes += [TargetChange(r.revision, r.iqn, None) for r in message.removed]
    return WatchBatch(message.revision, message.reset, tuple(changes))
