"""Wires adapters, core and gRPC servicers into a running server."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import grpc
from bmi.v1 import (
    boot_pb2,
    boot_pb2_grpc,
    disks_pb2,
    disks_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
    nodes_pb2,
    nodes_pb2_grpc,
    quotas_pb2,
    quotas_pb2_grpc,
)
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .adapters.qemu_img import DEFAULT_MAX_VIRTUAL_BYTES
from .adapters.spool import LocalSpool
from .api import reflection
from .api.admission import AdmissionInterceptor, AdmissionLimits
from .api.boot_servicer import BootServicer
from .api.deadline import DeadlineInterceptor
from .api.disk_servicer import DiskServicer
from .api.errors import ErrorMappingInterceptor
from .api.gateway_servicer import GatewayServicer
from .api.image_servicer import ImageServicer
from .api.logging_setup import RequestIdInterceptor
from .api.metrics import Metrics, MetricsInterceptor
from .api.node_servicer import NodeServicer
from .api.quota_servicer import QuotaServicer
from .api.rpc_executor import RpcExecutor
from .core import image_digests, tracked
from .core.agent import AgentPolicy, AgentService
from .core.boot import BootPlanner, DiscoveryMode, SessionWatcher
from .core.disks import DiskService
from .core.events import NodeEvents
from .core.gateways import GatewayDirectory
from .core.images import ImageCatalogue
from .core.isolation import NodeOwnership
from .core.models import QuotaAmounts
from .core.node_config import ConfigDrives
from .core.nodes import NodeRegistry
from .core.ports import (
    Authenticator,
    GatewayAuthenticator,
    ImageFileInspector,
    ImageStore,
    Isolator,
    NodeEventBus,
    PortalSource,
    ReplicaStore,
    StateStore,
    TargetDriver,
    UrlFetcher,
)
from .core.provisioning import IqnScheme, Provisioner
from .core.quotas import DEFAULT_LIMITS, QuotaBook
from .core.reconcile import ReconcileReport, has_orphans, reconcile
from .core.replicas import ReplicaLease, single_server
from .core.uploads import begin_upload
from .core.url_imports import UrlImports

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 8 << 20
SERVICE_NAMES = (
    images_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name,
    disks_pb2.DESCRIPTOR.services_by_name["DiskService"].full_name,
    nodes_pb2.DESCRIPTOR.services_by_name["NodeService"].full_name,
    boot_pb2.DESCRIPTOR.services_by_name["BootService"].full_name,
    quotas_pb2.DESCRIPTOR.services_by_name["QuotaService"].full_name,
)
GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


@dataclass
class Core:
    """The domain services, built on the ports."""

    state: StateStore
    store: ImageStore
    images: ImageCatalogue
    disks: DiskService
    registry: NodeRegistry
    ownership: NodeOwnership
    provisioner: Provisioner
    planner: BootPlanner
    sessions: SessionWatcher
    agents: AgentService
    quotas: QuotaBook
    gateways: GatewayDirectory | None = None  # gateway mode only
    # Several replicas on one database: this one's lease, and the cluster-wide job locks.
    lease: ReplicaLease | None = None
    replicas: ReplicaStore | None = None
    targets: TargetDriver | None = None  # the adapter, for what the server logs of it
    digests: image_digests.DigestBackfill | None = None  # made from state and store if None

    def __post_init__(self) -> None:
        if self.digests is None:
            self.digests = image_digests.DigestBackfill(self.state, self.store)

    @classmethod
    def build(
        cls,
        state: StateStore,
        store: ImageStore,
        targets: TargetDriver,
        *,
        advertised_portals: list[str] | None = None,
        retry_seconds: int = 30,
        iqns: IqnScheme | None = None,
        isolator: Isolator | None = None,
        agent_policy: AgentPolicy | None = None,
        discovery_mode: DiscoveryMode | str = DiscoveryMode.WAIT,
        portal_source: PortalSource | None = None,
        gateways: GatewayDirectory | None = None,
        events: NodeEventBus | None = None,
        lease: ReplicaLease | None = None,
        replicas: ReplicaStore | None = None,
        quota_defaults: QuotaAmounts = DEFAULT_LIMITS,
    ) -> Core:
        """``isolator`` None: standalone (BMI's own node records, no network changes).
        ``portal_source`` None: every target on ``advertised_portals`` (single host).
        ``gateways``: gateway mode's GatewayService side (``targets`` is its exports).
        ``lease`` None: the only server on its database (every in-flight record found by
        reconcile is a crash's orphan)."""
        if isolator is None:
            from .adapters.standalone import StandaloneIsolator

            isolator = StandaloneIsolator(state)
        quotas = QuotaBook(state, quota_defaults)
        images = ImageCatalogue(state, store, quotas)
        disks = DiskService(state, store, images, state)
        registry = NodeRegistry(state, events if events is not None else NodeEvents())
        ownership = NodeOwnership(registry, state, isolator)
        provisioner = Provisioner(
            registry, images, disks, state, state, targets, iqns, advertised_portals,
            ownership=ownership, portal_source=portal_source, drives=ConfigDrives(store, state),
        )
        # The SQL state store keeps agents' inventories and tokens too (AgentStateStore).
        agents = AgentService(registry, state, state, provisioner, agent_policy)
        planner = BootPlanner(
            registry, state, provisioner, retry_seconds, agents,
            DiscoveryMode(discovery_mode),
        )  # fmt: skip
        return cls(
            state,
            store,
            images,
            disks,
            registry,
            ownership,
            provisioner,
            planner,
            SessionWatcher(registry, state, targets),
            agents,
            quotas,
            gateways,
            lease,
            replicas,
            targets,
        )

    def retry_rollbacks(self) -> int:
        """Retry undoing creations whose rollback failed (the store or database was
        unreachable then); returns how many are still pending."""
        return tracked.retry_undos(self.disks.ops, self.store) + tracked.retry_undos(
            self.images.ops, self.store
        )

    def fill_digests(self) -> int | None:
        """Hash images that have no content digest yet, by one replica at a time (None:
        another one is doing it now)."""
        if self.replicas is None:
            return self.digests.run()
        with self.replicas.exclusive("digests") as mine:
            return self.digests.run() if mine else None

    def reconcile(self, *, full: bool = True) -> ReconcileReport | None:
        """Repair in-flight work no live replica owns, and re-create targets tgtd lost:
        nodes first (their disks may be deleted), then images and disks with Ceph.

        ``full`` False (the periodic round): Ceph is listed, and targets checked, only if
        some image or disk was left in flight by a dead replica; otherwise only database
        rows are read. Runs under the cluster-wide ``reconcile`` lock; None (nothing done)
        when another replica holds it, i.e. is doing this right now."""
        if self.replicas is None:
            return self._reconcile(full)
        with self.replicas.exclusive("reconcile") as mine:
            return self._reconcile(full) if mine else None

    def _reconcile(self, full: bool) -> ReconcileReport:
        orphaned = self.lease.orphaned() if self.lease is not None else single_server
        nodes = self.provisioner.reconcile(orphaned, ensure=full)
        for line in nodes.repaired:
            log.warning("reconcile repaired: %s", line)
        for line in nodes.problems:
            log.error("reconcile found: %s", line)
        if full or has_orphans(self.state, orphaned):
            catalogue = reconcile(
                self.state, self.store, orphaned=orphaned, drives=self.provisioner.drives
            )
        else:
            catalogue = ReconcileReport()
        self.images.requests.prune()
        return ReconcileReport(
            repaired=nodes.repaired + catalogue.repaired,
            problems=nodes.problems + catalogue.problems,
        )

    def sweep_sessions(self) -> tuple[int, int] | None:
        """Record the iSCSI sessions seen and ended on every node's target, by one replica
        at a time (None: another one is doing it now)."""
        if self.replicas is None:
            return self.sessions.sweep()
        with self.replicas.exclusive("sessions") as mine:
            return self.sessions.sweep() if mine else None

    def audit_targets(self) -> ReconcileReport | None:
        """Re-create targets tgtd lost, by one replica at a time (None: another one is)."""
        if self.replicas is None:
            return self.provisioner.ensure_targets()
        with self.replicas.exclusive("reconcile") as mine:
            return self.provisioner.ensure_targets() if mine else None


def build_grpc_server(
    core: Core,
    inspector: ImageFileInspector,
    authenticator: Authenticator,
    spool_dir,
    *,
    max_image_virtual_bytes: int = DEFAULT_MAX_VIRTUAL_BYTES,
    spool_reserve_bytes: int = 1 << 30,
    workers: int = 16,
    metrics: Metrics | None = None,
    gateway_authenticator: GatewayAuthenticator | None = None,
    url_fetcher: UrlFetcher | None = None,
    url_import_max_bytes: int = DEFAULT_MAX_VIRTUAL_BYTES,
    url_import_timeout: float | None = None,
    limits: AdmissionLimits | None = None,
) -> grpc.Server:
    """GatewayService is served in gateway mode (``core.gateways``), with its own
    credentials (``gateway_authenticator``). Without ``url_fetcher`` URL import is off.
    ``limits`` None: the defaults of AdmissionLimits with ``workers``."""
    limits = limits or AdmissionLimits(workers=workers)
    executor = RpcExecutor(limits.workers, limits.stream_threads)
    gateways = gateway_authenticator if core.gateways is not None else None
    # Metrics outermost: it sees the status code the error mapping ended the call with.
    interceptors = [MetricsInterceptor(metrics)] if metrics else []
    interceptors.append(RequestIdInterceptor())  # around the error mapping, which logs
    # Admission before anything costly; its refusals are counted and carry a request id.
    admission = AdmissionInterceptor(
        limits, executor, authenticator, gateways,
        on_refused=(lambda reason: metrics.grpc_refused.labels(reason).inc()) if metrics
        else (lambda reason: None),
    )
    if metrics:
        metrics.serving["unary"] = lambda: admission.unary_in_flight
        metrics.serving["stream"] = lambda: admission.open_streams
    interceptors.append(admission)
    server = grpc.server(
        executor,
        interceptors=[*interceptors, ErrorMappingInterceptor(), DeadlineInterceptor()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    spool = LocalSpool(spool_dir, spool_reserve_bytes)
    spool.sweep()  # files a crashed run left; live uploads (other processes) keep theirs
    upload = partial(begin_upload, core.images, core.store, inspector, spool=spool,
                     max_virtual_bytes=max_image_virtual_bytes)
    url_imports = UrlImports(
        core.images, core.store, inspector, spool, url_fetcher,
        max_virtual_bytes=max_image_virtual_bytes, max_file_bytes=url_import_max_bytes,
        timeout=url_import_timeout,
    )
    images_pb2_grpc.add_ImageServiceServicer_to_server(
        ImageServicer(core.images, upload, authenticator, url_imports=url_imports,
                      verify=partial(image_digests.verify, core.state, core.store)),
        server,
    )
    disks_pb2_grpc.add_DiskServiceServicer_to_server(
        DiskServicer(core.disks, authenticator), server
    )
    nodes_pb2_grpc.add_NodeServiceServicer_to_server(
        NodeServicer(
            core.registry, core.ownership, core.provisioner, authenticator, agents=core.agents
        ),
        server,
    )
    boot_pb2_grpc.add_BootServiceServicer_to_server(BootServicer(core.agents), server)
    quotas_pb2_grpc.add_QuotaServiceServicer_to_server(
        QuotaServicer(core.quotas, authenticator), server
    )
    names = SERVICE_NAMES
    if core.gateways is not None and gateway_authenticator is not None:
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(
            GatewayServicer(core.gateways, gateway_authenticator), server
        )
        names = (*names, GATEWAY_SERVICE)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (*names, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME), server)
    return server
