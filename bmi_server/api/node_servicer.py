"""bmi.v1.NodeService: translation only; registry, ownership and provisioner decide."""

from __future__ import annotations

import grpc
from bmi.v1 import nodes_pb2, nodes_pb2_grpc

from ..core.agent import AgentService
from ..core.errors import PermissionDenied
from ..core.isolation import NodeOwnership
from ..core.models import Node, Principal
from ..core.node_config import ConfigRequest
from ..core.nodes import NodeRegistry
from ..core.ports import Authenticator
from ..core.provisioning import Provisioner
from . import convert
from .auth import principal_of

WATCH_POLL_SECONDS = 1.0


class NodeServicer(nodes_pb2_grpc.NodeServiceServicer):
    def __init__(
        self,
        registry: NodeRegistry,
        ownership: NodeOwnership,
        provisioner: Provisioner,
        authenticator: Authenticator,
        *,
        agents: AgentService | None = None,
    ) -> None:
        self._registry = registry
        self._ownership = ownership
        self._provisioner = provisioner
        self._authn = authenticator
        self._agents = agents

    def _who(self, context: grpc.ServicerContext) -> Principal:
        return principal_of(context, self._authn)

    def _message(
        self, node: Node, who: Principal, with_history: bool = False
    ) -> nodes_pb2.Node:
        history = self._registry.history(node, viewer=who) if with_history else None
        inventory = self._agents.inventory(node) if with_history and self._agents else None
        config = self._registry.config(node) if with_history else None
        portals = self._provisioner.portals_for(node.target.iqn) if node.target else []
        return convert.node_message(node, portals, history, inventory, config)

    def ListNodes(self, request, context):
        who = self._who(context)
        page = self._ownership.list(
            who,
            project=request.project,
            state=convert.node_state_of(request.state),
            size=request.page_size,
            token=request.page_token,
        )
        free = (
            self._ownership.free_nodes(who)
            if request.include_free and not request.page_token
            else []
        )
        return nodes_pb2.ListNodesResponse(
            nodes=[self._message(n, who) for n in page.items],
            next_page_token=page.next_token,
            free_nodes=free,
        )

    def GetNode(self, request, context):
        who = self._who(context)
        return self._message(self._ownership.get(who, request.node), who, True)

    def EnrollNode(self, request, context):
        who = self._who(context)
        node = self._registry.enrol(
            who,
            name=request.name,
            project=request.project,
            macs=list(request.macs),
            discovered_node=request.discovered_node,
        )
        return self._message(node, who, True)

    def ProvisionNode(self, request, context):
        who = self._who(context)
        node = self._provisioner.provision(
            who,
            request.node,
            image=request.image,
            disk=request.disk,
            request_id=request.request_id,
            power_cycle=request.power_cycle,
            boot_mode=convert.boot_mode_of(request.boot_mode),
            config=_config_of(request),
        )
        return self._message(node, who, True)

    def DeprovisionNode(self, request, context):
        who = self._who(context)
        node = self._provisioner.deprovision(
            who, request.node, keep_disk=request.keep_disk, request_id=request.request_id
        )
        return self._message(node, who, True)

    def ReprovisionNode(self, request, context):
        who = self._who(context)
        node = self._provisioner.reprovision(
            who, request.node, request_id=request.request_id, config=_config_of(request)
        )
        return self._message(node, who, True)

    def TakeNode(self, request, context):
        who = self._who(context)
        return self._message(self._ownership.take(who, request.node, request.project), who, True)

    def GiveBackNode(self, request, context):
        self._ownership.give_back(self._who(context), request.node)
        return nodes_pb2.GiveBackNodeResponse()

    def WatchNodes(self, request, context):
        who = self._who(context)
        only = self._ownership.get(who, request.node).id if request.node else None
        if request.project and not who.can_access_project(request.project):
            raise PermissionDenied(f"you may not watch project {request.project!r}")

        def wants(node: Node) -> bool:
            return (
                node.visible_to(who)
                and (only is None or node.id == only)
                and (not request.project or node.project == request.project)
            )

        subscription = self._registry.events.subscribe(wants)
        # Headers now tell the client the watch is live: it misses nothing from here on.
        context.send_initial_metadata(())
        try:
            while context.is_active():
                event = subscription.next(WATCH_POLL_SECONDS)
                if event is not None:
                    yield nodes_pb2.NodeEvent(
                        node=self._message(event.node, who),
                        transition=convert.transition_message(event.transition),
                    )
        finally:
            subscription.close()


def _config_of(request) -> ConfigRequest | None:
    return convert.config_request_of(request.config) if request.HasField("config") else None
