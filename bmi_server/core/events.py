"""Fan-out of node transitions to watchers (WatchNodes), in process: the NodeEventBus.

With several replicas, each has its own bus; a relay (adapters/sql/pg_events.py) publishes
the other replicas' transitions on it as they commit.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from .errors import Unavailable
from .models import Node, Transition

MAX_BACKLOG = 1000


@dataclass(frozen=True)
class NodeEvent:
    node: Node
    transition: Transition


class Subscription:
    def __init__(self, bus: NodeEvents, wants: Callable[[Node], bool]) -> None:
        self._bus = bus
        self._wants = wants
        self._queue: queue.Queue[NodeEvent] = queue.Queue(MAX_BACKLOG)
        self.overflowed = False
        self.cut_off = ""  # why the bus could not give this watcher every event

    def offer(self, event: NodeEvent) -> None:
        if not self._wants(event.node):
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            # A stalled watcher must not hold the server's memory: it is cut off.
            self.overflowed = True

    def next(self, timeout: float) -> NodeEvent | None:
        if self.overflowed:
            raise Unavailable("watch fell behind; list the nodes again and watch anew")
        if self.cut_off:
            raise Unavailable(f"{self.cut_off}; list the nodes again and watch anew")
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._bus.unsubscribe(self)


class NodeEvents:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscriptions: set[Subscription] = set()

    def subscribe(self, wants: Callable[[Node], bool]) -> Subscription:
        subscription = Subscription(self, wants)
        with self._lock:
            self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            self._subscriptions.discard(subscription)

    def publish(self, node: Node, transition: Transition) -> None:
        event = NodeEvent(node=_snapshot(node), transition=transition)
        with self._lock:
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            subscription.offer(event)

    def cut_off_all(self, reason: str) -> None:
        """End every watch (with ``reason``): events were lost that cannot be replayed."""
        with self._lock:
            subscriptions = list(self._subscriptions)
        for subscription in subscriptions:
            subscription.cut_off = reason


def _snapshot(node: Node) -> Node:
    return replace(node, macs=list(node.macs))
