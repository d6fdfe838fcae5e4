"""Prometheus metrics: RPCs by method and status code, node lifecycle phase durations
and node counts by state. Served on `metrics_listen` (off when empty)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from ..core.events import NodeEvents
from ..core.models import NodeState, SessionState
from ..core.ports import NodeStateStore

RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
PHASE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
# Lifecycle phases timed from one transition to the next, by (start state, end state).
PHASES = {
    (NodeState.PROVISIONING, NodeState.PROVISIONED): "provision",
    (NodeState.PROVISIONED, NodeState.BOOTING): "wait_for_boot",
    (NodeState.BOOTING, NodeState.ACTIVE): "boot",
    (NodeState.DEPROVISIONING, NodeState.AVAILABLE): "deprovision",
}


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.rpcs = Counter("bmi_rpc_total", "RPCs handled, by method and status code",
                            ["method", "code"], registry=self.registry)
        self.rpc_seconds = Histogram("bmi_rpc_seconds", "RPC latency, by method", ["method"],
                                     buckets=RPC_BUCKETS, registry=self.registry)
        self.ceph_seconds = Histogram(
            "bmi_ceph_op_seconds", "Image store (Ceph RBD) operations, by operation",
            ["op"], buckets=RPC_BUCKETS, registry=self.registry,
        )
        self.boot_rate_limited = Counter(
            "bmi_boot_rate_limited_total",
            "Boot script requests refused with 429, by bucket (node: one MAC asked too "
            "often; source: one address asked for too many unknown MACs)",
            ["bucket"], registry=self.registry,
        )
        self.phase_seconds = Histogram(
            "bmi_node_phase_seconds",
            "Time nodes spend in each lifecycle phase (provision, wait_for_boot, boot, "
            "deprovision)",
            ["phase"], buckets=PHASE_BUCKETS, registry=self.registry,
        )

        self.grpc_refused = Counter(
            "bmi_grpc_refused_total",
            "gRPC calls refused by admission control with RESOURCE_EXHAUSTED, by reason "
            "(queue: unary calls waiting are at max_queued_rpcs; streams: max_streams "
            "open; caller: the caller's max_streams_per_caller open)",
            ["reason"], registry=self.registry,
        )
        self.http_refused = Counter(
            "bmi_http_connections_refused_total",
            "HTTP boot connections answered 503 at once: http_max_connections were open",
            registry=self.registry,
        )
        # What the serving layer holds now, by kind (filled in by whoever serves).
        self.serving: dict[str, Callable[[], int]] = {}
        self.registry.register(ServingCollector(self.serving))

    def observe_rpc(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.rpcs.labels(method, code.name).inc()
        self.rpc_seconds.labels(method).observe(seconds)


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every RPC with the status code it ended with (outermost interceptor)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        for kind in ("unary_unary", "stream_unary"):
            if getattr(handler, kind):
                return handler._replace(**{kind: self._unary(getattr(handler, kind), method)})
        for kind in ("unary_stream", "stream_stream"):
            if getattr(handler, kind):
                return handler._replace(**{kind: self._stream(getattr(handler, kind), method)})
        return handler

    def _unary(self, behavior: Callable, method: str) -> Callable:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                return behavior(request, context)
            finally:
                self._metrics.observe_rpc(method, _code(context),
                                          time.perf_counter() - started)

        return wrapped

    def _stream(self, behavior: Callable, method: str) -> Callable:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator:
            started = time.perf_counter()
            try:
                yield from behavior(request, context)
            finally:
                self._metrics.observe_rpc(method, _code(context),
                                          time.perf_counter() - started)

        return wrapped


def _code(context: grpc.ServicerContext) -> grpc.StatusCode:
    code = context.code() if hasattr(context, "code") else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK


class PhaseTimer:
    """Times lifecycle phases from the node transitions the core publishes."""

    def __init__(self, metrics: Metrics, events: NodeEvents) -> None:
        self._metrics = metrics
        self._events = events
        self._subscription = events.subscribe(lambda node: True)
        self._entered: dict[str, tuple[NodeState, float]] = {}
        self._thread = threading.Thread(target=self._run, name="phase-timer", daemon=True)
        self._stop = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._subscription.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                event = self._subscription.next(0.5)
            except Exception:  # fell behind: timings restart from the next transitions
                self._subscription.close()
                self._subscription = self._events.subscribe(lambda node: True)
                self._entered.clear()
                continue
            if event is not None:
                self.record(event.node.id, event.transition.to_state,
                            event.transition.time.timestamp())

    def record(self, node_id: str, state: NodeState, at: float) -> None:
        previous = self._entered.get(node_id)
        if previous is not None and (phase := PHASES.get((previous[0], state))):
            self._metrics.phase_seconds.labels(phase).observe(max(0.0, at - previous[1]))
        self._entered[node_id] = (state, at)


class NodeStateCollector:
    """Node counts by state, read from the database at scrape time."""

    def __init__(self, nodes: NodeStateStore) -> None:
        self._nodes = nodes

    def collect(self):
        counts = {state: 0 for state in NodeState}
        counts.update(self._nodes.count_nodes_by_state())  # one COUNT ... GROUP BY
        family = GaugeMetricFamily("bmi_nodes", "Nodes by lifecycle state", labels=["state"])
        for state, count in counts.items():
            family.add_metric([state.value], count)
        yield family


class NodeSessionCollector:
    """Nodes with a target by the state of their iSCSI session, from the database at scrape
    time: ``logged_in``, ``ended`` (a machine powered off keeps its lifecycle state; this
    says its session is gone) and ``none`` (none seen on its target yet)."""

    def __init__(self, nodes: NodeStateStore) -> None:
        self._nodes = nodes

    def collect(self):
        counts = {None: 0, **{state: 0 for state in SessionState}}
        counts.update(self._nodes.count_node_sessions())  # one COUNT ... GROUP BY
        family = GaugeMetricFamily(
            "bmi_node_sessions", "Nodes with a target, by the state of its iSCSI session",
            labels=["session"])
        for state, count in counts.items():
            family.add_metric([state.value if state else "none"], count)
        yield family


class TimedImageStore:
    """Wraps an ImageStore so every call's latency lands in bmi_ceph_op_seconds{op}."""

    def __init__(self, store: Any, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._store, name)
        if not callable(attribute) or name.startswith("_"):
            return attribute
        histogram = self._metrics.ceph_seconds.labels(name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            with histogram.time():
                return attribute(*args, **kwargs)

        return timed


class TargetCountCollector:
    """Targets under BMI's prefix that tgtd holds now (one `tgtadm show` per scrape)."""

    def __init__(self, targets: Any) -> None:
        self._targets = targets

    def collect(self):
        per_process = getattr(self._targets, "process_targets", None)
        if per_process is not None:  # several tgtd processes (adapters/tgt/pool.py)
            yield from self._per_process(per_process())
            return
        family = GaugeMetricFamily("bmi_tgt_targets", "iSCSI targets tgtd holds for BMI")
        try:
            family.add_metric([], len(self._targets.list_exports()))
        except Exception:  # tgtd down: report nothing rather than fail the scrape
            return
        yield family

    @staticmethod
    def _per_process(counts: list):
        total = GaugeMetricFamily("bmi_tgt_targets", "iSCSI targets tgtd holds for BMI")
        held = GaugeMetricFamily("bmi_tgt_process_targets",
                                 "iSCSI targets each tgtd process holds for BMI",
                                 labels=["process"])
        up = GaugeMetricFamily("bmi_tgt_process_up", "1 while the tgtd process answers, else 0",
                               labels=["process"])
        for process, count in enumerate(counts):
            up.add_metric([str(process)], 0 if count is None else 1)
            if count is not None:
                held.add_metric([str(process)], count)
        total.add_metric([], sum(c for c in counts if c is not None))
        yield total
        yield held
        yield up


class GatewayCollector:
    """Gateway mode: whether each gateway is live, and its targets by reported status."""

    def __init__(self, exports: Any) -> None:
        self._exports = exports  # core.gateways.GatewayExports

    def collect(self):
        try:
            gateways = self._exports.store.list_gateways()
            live = self._exports.live_gateways()
            rows = self._exports.store.all_assignments()
        except Exception:  # database down: report nothing rather than fail the scrape
            return
        up = GaugeMetricFamily("bmi_gateway_up", "1 while the gateway heartbeats, else 0",
                               labels=["gateway"])
        for gateway in gateways:
            up.add_metric([gateway.name], 1 if gateway.name in live else 0)
        targets = GaugeMetricFamily("bmi_gateway_targets", "Targets assigned to each gateway "
                                    "by what it reported", labels=["gateway", "status"])
        counts: dict[tuple[str, str], int] = {}
        for row in rows:
            key = (row.gateway, row.status.value)
            counts[key] = counts.get(key, 0) + 1
        for (gateway, status), count in sorted(counts.items()):
            targets.add_metric([gateway, status], count)
        yield up
        yield targets


class ServingCollector:
    """What admission control and the HTTP endpoint hold now, read at scrape time:
    ``bmi_serving_in_flight{kind}`` (unary: running or queued gRPC calls; stream: open
    gRPC streams; http: open HTTP boot connections)."""

    def __init__(self, readers: dict[str, Callable[[], int]]) -> None:
        self._readers = readers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "bmi_serving_in_flight",
            "gRPC unary calls running or queued, gRPC streams open, HTTP boot connections "
            "open", labels=["kind"])
        for kind, read in self._readers.items():
            family.add_metric([kind], read())
        yield family
