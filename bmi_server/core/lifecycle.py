"""The node state machine: one explicit table of allowed transitions."""

from __future__ import annotations

from .errors import FailedPrecondition
from .models import Node, NodeState, Transition, utcnow

S = NodeState

ALLOWED: dict[NodeState, frozenset[NodeState]] = {
    S.DISCOVERED: frozenset({S.AVAILABLE, S.FAILED}),
    # DISCOVERED again: given back to the isolation layer's free pool (in no project).
    S.AVAILABLE: frozenset({S.PROVISIONING, S.DISCOVERED, S.FAILED}),
    # Back to AVAILABLE when provisioning is rolled back.
    S.PROVISIONING: frozenset({S.PROVISIONED, S.AVAILABLE, S.FAILED}),
    S.PROVISIONED: frozenset({S.BOOTING, S.PROVISIONING, S.DEPROVISIONING, S.FAILED}),
    # BOOTING again: the node rebooted and fetched its script once more.
    S.BOOTING: frozenset({S.BOOTING, S.ACTIVE, S.PROVISIONING, S.DEPROVISIONING, S.FAILED}),
    S.ACTIVE: frozenset({S.BOOTING, S.PROVISIONING, S.DEPROVISIONING, S.FAILED}),
    S.DEPROVISIONING: frozenset({S.AVAILABLE, S.FAILED}),
    # May still hold the disk and target of what failed: DEPROVISIONING and PROVISIONING
    # remove them first; never AVAILABLE directly, which would orphan them.
    S.FAILED: frozenset({S.DEPROVISIONING, S.PROVISIONING}),
}

# States in which a node has a disk, a target and a boot plan.
HAS_EXPORT = frozenset({S.PROVISIONED, S.BOOTING, S.ACTIVE})
# States an operation is under way in (a crash here leaves an intent for reconcile).
IN_FLIGHT = frozenset({S.PROVISIONING, S.DEPROVISIONING})


def can_move(current: NodeState, target: NodeState) -> bool:
    return target in ALLOWED[current]


def move(node: Node, target: NodeState, reason: str) -> Transition:
    """Change ``node``'s state in memory and return the transition to record."""
    if not can_move(node.state, target):
        raise FailedPrecondition(
            f"node {node.name!r} is {node.state.value}; it cannot become {target.value}"
        )
    transition = Transition(node.state, target, reason, utcnow())
    node.state = target
    node.failure_reason = reason if target is S.FAILED else ""
    return transition
