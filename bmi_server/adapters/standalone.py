"""Standalone isolation: no HIL. Nodes are those enrolled in BMI's own database, networks
are left alone, and power goes through an optional command per node from the config.

Small sites and the demo run this way; taking and giving back nodes needs HIL.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Callable, Mapping

from ..core.errors import FailedPrecondition, NotFound, Unavailable
from ..core.models import IsolatedNode, NodeNic, Principal
from ..core.ports import NodeStateStore

log = logging.getLogger(__name__)

DEFAULT_COMMAND_KEY = "*"  # power_commands entry used for nodes without their own
POWER_TIMEOUT_SECONDS = 120


class StandaloneIsolator:
    has_free_pool = False

    def __init__(
        self,
        nodes: NodeStateStore,
        power_commands: Mapping[str, str] | None = None,
        *,
        run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
    ) -> None:
        self._nodes = nodes
        self._power = dict(power_commands or {})
        self._run = run

    def node(self, caller: Principal, name: str) -> IsolatedNode:
        node = self._nodes.find_node_by_name(name)
        if node is None or not node.visible_to(caller):
            raise NotFound(f"node {name!r} not found")
        nics = tuple(NodeNic(label=f"mac{i}", mac=mac) for i, mac in enumerate(node.macs))
        return IsolatedNode(node.name, node.project, nics, nics[0].label if nics else "")

    def attach_provisioning_network(self, caller: Principal, node: IsolatedNode) -> None:
        """Nothing to do: without HIL the site's network is static."""

    def detach_provisioning_network(
        self, caller: Principal, name: str, *, wait: bool = True
    ) -> None:
        """Nothing to do: without HIL the site's network is static."""

    def project_nodes(self, caller: Principal, project: str) -> None:
        """BMI's own records say which nodes are in which project."""
        return None

    def power_cycle(self, caller: Principal, name: str) -> None:
        template = self._power.get(name) or self._power.get(DEFAULT_COMMAND_KEY)
        if not template:
            raise FailedPrecondition(f"no power command is configured for node {name!r}")
        # No shell: the node name is one argument wherever {node} appears.
        argv = [part.replace("{node}", name) for part in shlex.split(template)]
        log.info("power-cycling node %s: %s", name, argv[0])
        try:
            done = self._run(
                argv, capture_output=True, text=True, timeout=POWER_TIMEOUT_SECONDS, check=False
            )
        except subprocess.TimeoutExpired:
            raise Unavailable(
                f"power command for node {name!r} did not finish in {POWER_TIMEOUT_SECONDS}s"
            ) from None
        except OSError as exc:
            raise FailedPrecondition(
                f"power command for node {name!r} cannot run: {exc.strerror or exc}"
            ) from None
        if done.returncode != 0:
            tail = " ".join((done.stderr or done.stdout or "").split())[-200:]
            raise FailedPrecondition(
                f"power command for node {name!r} failed (exit {done.returncode}): {tail}"
            )

    def free_nodes(self, caller: Principal) -> list[str]:
        return []  # no free pool: admins enrol nodes into projects

    def connect_node(self, caller: Principal, project: str, name: str) -> None:
        raise FailedPrecondition(
            "taking nodes needs HIL (isolator = \"hil\"); here admins enrol nodes"
        )

    def detach_node(self, caller: Principal, project: str, name: str) -> None:
        raise FailedPrecondition(
            "giving nodes back needs HIL (isolator = \"hil\"); here admins enrol nodes"
        )
