"""The Isolator port on HIL: ownership, the provisioning network and power through HIL.

Calls for a caller carry the caller's own HIL credentials, so HIL authorises the
caller; calls for BMI itself (reconcile) use BMI's account (the client's default).
Network changes are asynchronous in HIL: ``connect_network``/``detach_network`` answer
202 with a ``status_id``, polled at ``/v0/networking_action/<id>`` until DONE or ERROR.
HIL's network daemon does them 1-2.5 s later, or never while it is down: a change not
done within the action timeout (or the caller's deadline) is DeadlineExceeded, saying
the action is still pending. A NIC with a pending action refuses another (409): a
detach waits for it (retrying the detach, which has no effect while refused).

Power goes through HIL's out-of-band management (OBM): HIL refuses it while the node's
OBM is disabled, and refuses to give back a node whose OBM is enabled. Members of the
node's project may switch it, so BMI enables it for a power call HIL refused for that
reason, and disables it to give a node back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ...core import deadlines
from ...core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from ...core.models import IsolatedNode, NodeNic, Principal
from .client import HilClient, api_path
from .errors import hil_type
from .membership import ProjectMembers

log = logging.getLogger(__name__)

# An answer must reach the caller before its own deadline does, or the caller sees a bare
# DEADLINE_EXCEEDED instead of HIL's reason: waits end this long before it.
REPLY_MARGIN_SECONDS = 1.0


def _blocked(exc: FailedPrecondition, text: str) -> bool:
    """Whether HIL refused with 409 BlockedError saying ``text``."""
    return hil_type(exc) == "BlockedError" and text.lower() in exc.message.lower()


class HilIsolator:
    has_free_pool = True

    def __init__(
        self,
        client: HilClient,
        provisioning_network: str,
        *,
        boot_nic: str = "",
        channel: str = "",
        action_timeout: float = 60.0,
        poll_interval: float = 0.25,
        members: ProjectMembers | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``boot_nic``: label of the NIC nodes boot from (empty: each node's NIC whose
        label sorts first; HIL lists NICs in no fixed order). ``channel``: where the
        network goes on it (empty: HIL's default, untagged). ``members``: the cache of
        projects' node lists (default: 5 s)."""
        if not provisioning_network:
            raise ValueError("a provisioning network is required")
        self.client = client
        self.network = provisioning_network
        self._boot_nic = boot_nic
        self._channel = channel
        self._action_timeout = action_timeout
        self._poll = poll_interval
        self._clock = clock
        self._sleep = sleep
        self.members = members if members is not None else ProjectMembers(clock=clock)

    # -- reading -----------------------------------------------------------------------

    def node(self, caller: Principal, name: str) -> IsolatedNode:
        data = self.client.get(api_path("node", name), as_=caller.credentials)
        return self._parse_node(name, data)

    def free_nodes(self, caller: Principal) -> list[str]:
        names = self.client.get(api_path("nodes", "free"), as_=caller.credentials)
        if not isinstance(names, list):
            raise Unavailable("HIL answered GET /v0/nodes/free with something not a list")
        return [str(n) for n in names]

    def project_nodes(self, caller: Principal, project: str) -> frozenset[str]:
        def fetch() -> list[str]:
            path = api_path("project", project, "nodes")
            names = self.client.get(path, as_=caller.credentials)
            if not isinstance(names, list):
                raise Unavailable(f"HIL answered GET {path} with something not a list")
            return [str(n) for n in names]

        return self.members.get(project, fetch)

    # -- the provisioning network ------------------------------------------------------

    def attach_provisioning_network(self, caller: Principal, node: IsolatedNode) -> None:
        # ``node`` was read for the ownership check just before: no second read.
        name = node.name
        nic = self._nic(node, node.boot_nic)
        if self.network in nic.networks:
            return
        body: dict[str, Any] = {"network": self.network}
        if self._channel:
            body["channel"] = self._channel
        path = api_path("node", name, "nic", nic.label, "connect_network")
        deadline = self._deadline()
        reply = self.client.post(path, body, as_=caller.credentials)
        self._wait(caller, _status_id(reply, path), name, nic.label, deadline, attached=True)

    def detach_provisioning_network(
        self, caller: Principal, name: str, *, wait: bool = True
    ) -> None:
        deadline = self._deadline()
        view = self.node(caller, name)
        labels = [n.label for n in view.nics if self.network in n.networks]
        if not labels and view.boot_nic:
            # Not attached as far as HIL shows; but a connect may still be pending (its
            # effect not visible yet), which HIL reports as 409 rather than "not attached".
            labels = [view.boot_nic]
        for label in labels:
            path = api_path("node", name, "nic", label, "detach_network")
            delay = self._poll
            while True:
                try:
                    reply = self.client.post(
                        path, {"network": self.network}, as_=caller.credentials
                    )
                    break
                except InvalidArgument as exc:
                    if hil_type(exc) == "BadArgumentError":
                        reply = None  # "The network is not attached to the nic.": nothing to undo
                        break
                    raise
                except FailedPrecondition as exc:
                    if not _blocked(exc, "networking operation is already active"):
                        raise
                    # An earlier change (ours that timed out, or anyone's) is still
                    # pending: refused with no effect, so asking again is safe.
                    left = deadline.left()
                    if not wait or left <= 0:
                        raise DeadlineExceeded(
                            f"HIL is still busy with an earlier network change on "
                            f"{name}/{label} ({exc.message}); HIL's network daemon may be "
                            "down or slow. BMI takes the node off the provisioning network "
                            "once HIL has finished; deprovisioning it again then does too"
                        ) from None
                    self._sleep(min(delay, left))
                    delay = min(delay * 1.5, 2.0)
            if reply is not None:
                self._wait(caller, _status_id(reply, path), name, label, deadline,
                           attached=False)

    # -- power and ownership -----------------------------------------------------------

    def power_cycle(self, caller: Principal, name: str) -> None:
        # HIL hands this off (307) to the out-of-band management service; the client
        # follows with the same method and body.
        path = api_path("node", name, "power_cycle")
        try:
            self.client.post(path, {"force": False}, as_=caller.credentials)
            return
        except FailedPrecondition as exc:
            if not _blocked(exc, "OBM is not enabled"):
                raise
        # Enabled only when needed: enabling gets the node a new OBM token, which would
        # end a console the tenant has open. It stays enabled (the tenant's to use);
        # giving the node back disables it.
        log.info("enabling the OBM of node %s for a power cycle", name)
        self._set_obm(caller, name, enabled=True)
        self.client.post(path, {"force": False}, as_=caller.credentials)

    def connect_node(self, caller: Principal, project: str, name: str) -> None:
        try:
            self.client.post(
                api_path("project", project, "connect_node"), {"node": name},
                as_=caller.credentials,
            )
        finally:
            self.members.forget(project)

    def detach_node(self, caller: Principal, project: str, name: str) -> None:
        path = api_path("project", project, "detach_node")
        try:
            try:
                self.client.post(path, {"node": name}, as_=caller.credentials)
                return
            except FailedPrecondition as exc:
                if not _blocked(exc, "obm is enabled"):
                    raise
            # HIL checks the OBM first: a node goes back with its OBM off, so the next
            # project starts without the previous one's OBM token.
            log.info("disabling the OBM of node %s to give it back", name)
            self._set_obm(caller, name, enabled=False)
            self.client.post(path, {"node": name}, as_=caller.credentials)
        finally:
            self.members.forget(project)

    def _set_obm(self, caller: Principal, name: str, *, enabled: bool) -> None:
        # HIL asks obmd for (or to drop) the node's token; obmd unreachable is a 500.
        self.client.put(api_path("node", name, "obm"), {"enabled": enabled},
                        as_=caller.credentials)

    # -- helpers -----------------------------------------------------------------------

    def _deadline(self) -> _Deadline:
        """How long a network change may take: the action timeout, within the caller's
        deadline (less a margin, so the answer with HIL's reason reaches the caller)."""
        limit = self._clock() + self._action_timeout
        caller = deadlines.remaining()
        if caller is not None and self._clock() + caller - REPLY_MARGIN_SECONDS < limit:
            limit = self._clock() + max(caller - REPLY_MARGIN_SECONDS, 0.0)
            return _Deadline(limit, self._clock, "the call's deadline")
        return _Deadline(limit, self._clock, f"{self._action_timeout:g}s")

    def _wait(
        self, caller: Principal, status_id: str, node: str, nic: str, deadline: _Deadline,
        *, attached: bool,
    ) -> None:
        verb = "attach" if attached else "detach"
        what = f"{verb} network {self.network} {'to' if attached else 'from'} {node}/{nic}"
        delay = self._poll
        while True:
            try:
                record = self.client.get(
                    api_path("networking_action", status_id), as_=caller.credentials
                )
            except NotFound:
                # HIL drops the record once a newer action is queued on the NIC, which it
                # allows only after ours ended: the NIC itself says how it ended.
                if self._attached(caller, node, nic) == attached:
                    return
                raise FailedPrecondition(
                    f"HIL could not {what}: its networking action {status_id} is gone "
                    "and the NIC is not as asked"
                ) from None
            status = record.get("status") if isinstance(record, dict) else None
            if status == "DONE":
                log.info("HIL did %s (action %s)", what, status_id)
                return
            if status == "ERROR":
                raise FailedPrecondition(
                    f"HIL could not {what}: networking action {status_id} ended in ERROR"
                )
            remaining = deadline.left()
            if remaining <= 0:
                raise DeadlineExceeded(
                    f"HIL did not {what} within {deadline.what} (networking action "
                    f"{status_id} is still {status}; HIL's network daemon may be down "
                    "or slow)"
                )
            self._sleep(min(delay, remaining))
            delay = min(delay * 1.5, 2.0)

    def _attached(self, caller: Principal, node: str, label: str) -> bool:
        view = self.node(caller, node)
        return any(n.label == label and self.network in n.networks for n in view.nics)

    def _nic(self, view: IsolatedNode, label: str) -> NodeNic:
        for nic in view.nics:
            if nic.label == label:
                return nic
        wanted = f"NIC {self._boot_nic!r}" if self._boot_nic else "NICs"
        raise FailedPrecondition(f"node {view.name!r} has no {wanted} in HIL")

    def _parse_node(self, name: str, data: Any) -> IsolatedNode:
        try:
            project = data["project"]
            nics = tuple(
                NodeNic(
                    label=str(nic["label"]),
                    mac=str(nic.get("macaddr") or ""),
                    networks=tuple(str(v) for v in (nic.get("networks") or {}).values()),
                )
                for nic in data["nics"]
            )
        except (KeyError, TypeError, AttributeError):
            raise Unavailable(f"HIL described node {name!r} in an unexpected shape") from None
        # HIL lists NICs in no fixed order: sorted, so "the first NIC" is always the same.
        nics = tuple(sorted(nics, key=lambda n: n.label))
        labels = [n.label for n in nics]
        if self._boot_nic:
            boot = self._boot_nic if self._boot_nic in labels else ""
        else:
            boot = labels[0] if labels else ""
        return IsolatedNode(str(data.get("name") or name), project, nics, boot,
                            boot_nic_configured=bool(self._boot_nic))


class _Deadline:
    def __init__(self, at: float, clock: Callable[[], float], what: str) -> None:
        self.at, self._clock, self.what = at, clock, what

    def left(self) -> float:
        return self.at - self._clock()


def _status_id(reply: Any, path: str) -> str:
    if isinstance(reply, dict) and reply.get("status_id"):
        return str(reply["status_id"])
    raise Unavailable(f"HIL accepted POST {path} but gave no status_id to follow")
