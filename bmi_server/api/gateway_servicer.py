"""bmi.v1.GatewayService: the gateway daemons' calls. Translation only; GatewayDirectory
decides. Callers present a gateway credential and may speak only for their own gateway."""

from __future__ import annotations

import grpc
from bmi.v1 import gateway_pb2, gateway_pb2_grpc

from ..core.errors import InvalidArgument, PermissionDenied
from ..core.gateways import GatewayDirectory
from ..core.models import ExportStatus, TargetReport, WatchBatch
from ..core.ports import GatewayAuthenticator

_OUTCOME = {
    gateway_pb2.TARGET_OUTCOME_APPLIED: ExportStatus.APPLIED,
    gateway_pb2.TARGET_OUTCOME_FAILED: ExportStatus.FAILED,
    gateway_pb2.TARGET_OUTCOME_REMOVED: None,
}
MAX_REPORTS = 10000
MAX_LOGGED_IN = 10000  # far above a gateway's sessions; keeps the SQL IN list bounded


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, directory: GatewayDirectory, authenticator: GatewayAuthenticator) -> None:
        self._directory = directory
        self._authn = authenticator

    def _check(self, context: grpc.ServicerContext, name: str) -> str:
        credentials = next(
            (v for k, v in context.invocation_metadata() or () if k == "authorization"), None
        )
        owner = self._authn.authenticate(credentials)
        if name != owner:
            raise PermissionDenied(f"this credential is gateway {owner!r}'s, not {name[:64]!r}'s")
        return name

    def HeartbeatGateway(self, request, context):
        name = self._check(context, request.name)
        if len(request.logged_in_iqns) > MAX_LOGGED_IN:
            raise InvalidArgument(f"at most {MAX_LOGGED_IN} logged-in targets per heartbeat")
        self._directory.heartbeat(
            name, request.portals, request.incarnation, request.logged_in_iqns
        )
        policy = self._directory.policy
        return gateway_pb2.HeartbeatGatewayResponse(
            heartbeat_seconds=max(1, round(policy.heartbeat_seconds)),
            expiry_seconds=max(1, round(policy.expiry_seconds)),
        )

    def WatchTargets(self, request, context):
        name = self._check(context, request.name)
        for batch in self._directory.watch(name, request.revision, context.is_active):
            yield _batch_message(batch)

    def ReportTargets(self, request, context):
        name = self._check(context, request.name)
        if len(request.reports) > MAX_REPORTS:
            raise InvalidArgument(f"at most {MAX_REPORTS} reports per call")
        reports = []
        for report in request.reports:
            if report.outcome not in _OUTCOME:
                raise InvalidArgument(f"report on {report.iqn[:255]!r} has no outcome")
            reports.append(TargetReport(report.iqn, report.revision, _OUTCOME[report.outcome],
                                        report.detail, tuple(report.portals)))
        self._directory.report(name, reports)
        return gateway_pb2.ReportTargetsResponse()


def _batch_message(batch: WatchBatch) -> gateway_pb2.WatchTargetsResponse:
    message = gateway_pb2.WatchTargetsResponse(reset=batch.reset, revision=batch.revision)
    for change in batch.changes:
        if change.spec is None:
            message.removed.add(iqn=change.iqn, revision=change.revision)
        else:
            spec = change.spec
            message.targets.add(
                iqn=spec.iqn, volume=spec.volume, initiator_iqn=spec.initiator_iqn,
                chap_user=spec.chap_user, chap_secret=spec.chap_secret, revision=change.revision,
                config_volume=spec.config_volume,
            )
    return message
