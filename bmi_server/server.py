"""Wires adapters, core and gRPC servicers into a running server."""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass
from functools import partial

import grpc
from bmi.v1 import disks_pb2, disks_pb2_grpc, images_pb2, images_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .api.disk_servicer import DiskServicer
from .api.errors import ErrorMappingInterceptor
from .api.image_servicer import ImageServicer
from .core.disks import DiskService
from .core.images import ImageCatalogue
from .core.ports import Authenticator, ImageFileInspector, ImageStore, StateStore
from .core.reconcile import ReconcileReport, reconcile
from .core.uploads import begin_upload

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 8 << 20
SERVICE_NAMES = (
    images_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name,
    disks_pb2.DESCRIPTOR.services_by_name["DiskService"].full_name,
)


@dataclass
class Core:
    """The domain services, built on the ports."""

    state: StateStore
    store: ImageStore
    images: ImageCatalogue
    disks: DiskService

    @classmethod
    def build(cls, state: StateStore, store: ImageStore) -> Core:
        images = ImageCatalogue(state, store)
        return cls(state, store, images, DiskService(state, store, images))

    def reconcile(self) -> ReconcileReport:
        return reconcile(self.state, self.store)


def build_grpc_server(
    core: Core,
    inspector: ImageFileInspector,
    authenticator: Authenticator,
    spool_dir,
    *,
    workers: int = 16,
) -> grpc.Server:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
        interceptors=[ErrorMappingInterceptor()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    spool_dir.mkdir(parents=True, exist_ok=True)
    upload = partial(begin_upload, core.images, core.store, inspector, spool_dir=spool_dir)
    images_pb2_grpc.add_ImageServiceServicer_to_server(
        ImageServicer(core.images, upload, authenticator), server
    )
    disks_pb2_grpc.add_DiskServiceServicer_to_server(
        DiskServicer(core.disks, authenticator), server
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (*SERVICE_NAMES, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    return server
