"""The Isolator port on HIL: ownership, the provisioning network and power through HIL.

Calls for a caller carry the caller's own HIL credentials, so HIL authorises the
caller; calls for BMI itself (reconcile) use BMI's account (the client's default).
Network changes are asynchronous in HIL: ``connect_network``/``detach_network`` answer
202 with a ``status_id``, polled at ``/v0/networking_action/<id>`` until DONE or ERROR.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ...core.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from ...core.models import IsolatedNode, NodeNic, Principal
from .client import HilClient, api_path
from .errors import hil_type

log = logging.getLogger(__name__)


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
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``boot_nic``: label of the NIC nodes boot from (empty: each node's first NIC).
        ``channel``: where the network goes on it (empty: HIL's default, untagged)."""
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

    # -- reading -----------------------------------------------------------------------

    def node(self, caller: Principal, name: str) -> IsolatedNode:
        data = self.client.get(api_path("node", name), as_=caller.credentials)
        return self._parse_node(name, data)

    def free_nodes(self, caller: Principal) -> list[str]:
        names = self.client.get(api_path("nodes", "free"), as_=caller.credentials)
        if not isinstance(names, list):
            raise Unavailable("HIL answered GET /v0/nodes/free with something not a list")
        return [str(n) for n in names]

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
        reply = self.client.post(path, body, as_=caller.credentials)
        self._wait(caller, _status_id(reply, path), name, nic.label, attached=True)

    def detach_provisioning_network(self, caller: Principal, name: str) -> None:
        view = self.node(caller, name)
        labels = [n.label for n in view.nics if self.network in n.networks]
        if not labels and view.boot_nic:
            # Not attached as far as HIL shows; but a connect may still be pending (its
            # effect not visible yet), which HIL reports as 409 rather than "not attached".
            labels = [view.boot_nic]
        for label in labels:
            path = api_path("node", name, "nic", label, "detach_network")
            try:
                reply = self.client.post(path, {"network": self.network}, as_=caller.credentials)
            except InvalidArgument as exc:
                if hil_type(exc) == "BadArgumentError":
                    continue  # "The network is not attached to the nic.": nothing to undo
                raise
            self._wait(caller, _status_id(reply, path), name, label, attached=False)

    # -- power and ownership -----------------------------------------------------------

    def power_cycle(self, caller: Principal, name: str) -> None:
        # HIL hands this off (307) to the out-of-band management service; the client
        # follows with the same method and body.
        self.client.post(
            api_path("node", name, "power_cycle"), {"force": False}, as_=caller.credentials
        )

    def connect_node(self, caller: Principal, project: str, name: str) -> None:
        self.client.post(
            api_path("project", project, "connect_node"), {"node": name}, as_=caller.credentials
        )

    def detach_node(self, caller: Principal, project: str, name: str) -> None:
        self.client.post(
            api_path("project", project, "detach_node"), {"node": name}, as_=caller.credentials
        )

    # -- helpers -----------------------------------------------------------------------

    def _wait(self, caller: Principal, status_id: str, node: str, nic: str, *, attached: bool):
        verb = "attach" if attached else "detach"
        what = f"{verb} network {self.network} {'to' if attached else 'from'} {node}/{nic}"
        deadline = self._clock() + self._action_timeout
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
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise Unavailable(
                    f"HIL did not {what} within {self._action_timeout:g}s "
                    f"(networking action {status_id} is still {status})"
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
        labels = [n.label for n in nics]
        if self._boot_nic:
            boot = self._boot_nic if self._boot_nic in labels else ""
        else:
            boot = labels[0] if labels else ""
        return IsolatedNode(str(data.get("name") or name), project, nics, boot)


def _status_id(reply: Any, path: str) -> str:
    if isinstance(reply, dict) and reply.get("status_id"):
        return str(reply["status_id"])
    raise Unavailable(f"HIL accepted POST {path} but gave no status_id to follow")
