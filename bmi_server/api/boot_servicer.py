"""bmi.v1.BootService: the node agent's calls. Translation only; AgentService decides.

The agent authenticates with its one-boot token in the ``bmi-boot-token`` metadata
entry, never with ``authorization`` (see core/agent.py for the token design).
"""

from __future__ import annotations

import grpc
from bmi.v1 import boot_pb2, boot_pb2_grpc

from ..core.agent import AgentPhase, AgentService, BootPlan, FailurePolicy, PlanAction
from ..core.errors import InvalidArgument
from . import convert

TOKEN_METADATA = "bmi-boot-token"

_ACTION = {
    PlanAction.WAIT: boot_pb2.BOOT_PLAN_ACTION_WAIT,
    PlanAction.ATTACH: boot_pb2.BOOT_PLAN_ACTION_ATTACH,
    PlanAction.REBOOT: boot_pb2.BOOT_PLAN_ACTION_REBOOT,
}
_ON_FAILURE = {
    FailurePolicy.SHELL: boot_pb2.FAILURE_POLICY_SHELL,
    FailurePolicy.REBOOT: boot_pb2.FAILURE_POLICY_REBOOT,
}
_PHASE = {
    boot_pb2.AGENT_PHASE_ATTACHING: AgentPhase.ATTACHING,
    boot_pb2.AGENT_PHASE_ATTACHED: AgentPhase.ATTACHED,
    boot_pb2.AGENT_PHASE_MOUNTED: AgentPhase.MOUNTED,
    boot_pb2.AGENT_PHASE_PIVOTING: AgentPhase.PIVOTING,
    boot_pb2.AGENT_PHASE_FAILED: AgentPhase.FAILED,
}


def boot_token(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == TOKEN_METADATA:
            return value
    return ""


def plan_message(plan: BootPlan) -> boot_pb2.BootPlan:
    """The only message that carries a node's CHAP secret, to that node's agent."""
    message = boot_pb2.BootPlan(action=_ACTION[plan.action], reason=plan.reason)
    policy = plan.policy
    if plan.action is PlanAction.WAIT:
        message.retry_after_seconds = policy.wait_seconds
    if plan.action is PlanAction.ATTACH and plan.target is not None:
        target = plan.target
        message.target.CopyFrom(
            boot_pb2.IscsiLogin(
                portals=list(plan.portals),
                iqn=target.iqn,
                lun=plan.lun,
                initiator_iqn=target.initiator_iqn,
                chap_user=target.chap_user,
                chap_secret=target.chap_secret,
            )
        )
        message.root.CopyFrom(
            boot_pb2.RootDeviceHint(partition=policy.root_partition, fs_type=policy.root_fs_type)
        )
        message.init = policy.init
        message.kernel_args.extend(policy.init_args)
        message.attach_attempts = policy.attach_attempts
        message.retry_delay_seconds = policy.retry_delay_seconds
        message.on_failure = _ON_FAILURE[policy.on_failure]
    return message


class BootServicer(boot_pb2_grpc.BootServiceServicer):
    def __init__(self, agents: AgentService) -> None:
        self._agents = agents

    def Register(self, request, context):
        inventory = convert.inventory_of(request.inventory)
        node = self._agents.register(request.node_id, boot_token(context), inventory)
        return boot_pb2.RegisterResponse(
            node_id=node.id,
            name=node.name,
            heartbeat_seconds=self._agents.policy.heartbeat_seconds,
        )

    def GetBootPlan(self, request, context):
        return plan_message(self._agents.boot_plan(request.node_id, boot_token(context)))

    def ReportStatus(self, request, context):
        phase = _PHASE.get(request.phase)
        if phase is None:
            raise InvalidArgument("phase is required")
        self._agents.report(
            request.node_id,
            boot_token(context),
            phase,
            request.detail,
            attempt=request.attempt,
            will_retry=request.will_retry,
        )
        return boot_pb2.ReportStatusResponse()

    def Heartbeat(self, request, context):
        ready = self._agents.heartbeat(request.node_id, boot_token(context))
        return boot_pb2.HeartbeatResponse(
            plan_ready=ready, heartbeat_seconds=self._agents.policy.heartbeat_seconds
        )
