"""A thin typed client for the bmi.v1 ImageService, DiskService, NodeService and
QuotaService."""

from __future__ import annotations

import base64
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from bmi.v1 import (
    disks_pb2,
    disks_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
    nodes_pb2,
    nodes_pb2_grpc,
    quotas_pb2,
    quotas_pb2_grpc,
)

CHUNK_SIZE = 1024 * 1024
QCOW2_MAGIC = b"QFI\xfb"
# Uploads get a deadline that grows with the file: `timeout` plus this many seconds per
# MiB, so a link slower than ~1 MiB/s is the only thing that can hit it.
UPLOAD_SECONDS_PER_MIB = 1.0
# URL imports and verifications last as long as the server's download or read: hours
# for a large image.
URL_IMPORT_TIMEOUT = 6 * 3600.0
# A retry is not started with less time than this left before the call's deadline.
MIN_ATTEMPT_SECONDS = 0.05

ProgressCallback = Callable[[int, int], None]
"""Called as ``callback(bytes_sent, total_bytes)``; may go back to 0 when a retry restarts."""

_T = TypeVar("_T")


def guess_format(path: str | Path) -> images_pb2.ImageFormat.ValueType:
    """qcow2 if the file starts with the qcow2 magic, else raw."""
    with open(path, "rb") as f:
        magic = f.read(len(QCOW2_MAGIC))
    return images_pb2.IMAGE_FORMAT_QCOW2 if magic == QCOW2_MAGIC else images_pb2.IMAGE_FORMAT_RAW


def new_request_id() -> str:
    return str(uuid.uuid4())


def node_config(
    hostname: str = "",
    ssh_authorized_keys: Sequence[str] = (),
    user_data: bytes | str = b"",
    network_config: bytes | str = b"",
    metadata: dict[str, str] | None = None,
) -> nodes_pb2.NodeConfig:
    """A node's config for provision_node / reprovision_node (see NodeConfig in api.md)."""
    return nodes_pb2.NodeConfig(
        hostname=hostname,
        ssh_authorized_keys=list(ssh_authorized_keys),
        user_data=user_data.encode() if isinstance(user_data, str) else user_data,
        network_config=(
            network_config.encode() if isinstance(network_config, str) else network_config
        ),
        metadata=metadata or {},
    )


def read_ssh_keys(path: str | Path) -> list[str]:
    """The public keys in a file: one per line, as in ``id_ed25519.pub`` or an
    ``authorized_keys`` without options (blank lines and ``#`` comments skipped)."""
    lines = Path(path).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def call_metadata(
    token: str = "", user: str = "", password: str = "", project: str = ""
) -> tuple[tuple[str, str], ...]:
    """Credentials as gRPC metadata: a bearer token, or (servers backed by HIL) a HIL user
    name and password as HTTP Basic; ``project`` names the project the caller acts in."""
    if token:
        metadata = [("authorization", f"Bearer {token}")]
    elif user and password:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
        metadata = [("authorization", f"Basic {pair}")]
    else:
        raise ValueError("a token, or a user name and password, is required")
    if project:
        metadata.append(("bmi-project", project))
    return tuple(metadata)


def channel_credentials(
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials: trust ``ca_file`` (default: the system's CAs) and, for servers
    that require client certificates, present ``cert_file`` with ``key_file``."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes() if ca_file else None,
        private_key=Path(key_file).read_bytes() if key_file else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
    )


class BmiClient:
    """Connection to a BMI server.

    Every call carries credentials (``authorization: Bearer <token>``, or a HIL user and
    password as ``Basic``, plus ``bmi-project`` when a project is named) and a deadline:
    ``timeout`` seconds bound the whole call, retries and pauses included. Only calls that
    are safe to repeat are retried on UNAVAILABLE: reads, and mutations that carry a
    request_id (which this client always sets on create/import/copy/snapshot, provision
    and deprovision). Update and delete have no request_id in the API, so they are never
    retried.

    ``server`` may name several replicas of one BMI service (a list, or comma-separated):
    calls go to one of them until it answers UNAVAILABLE, then a retry goes to the next
    one, with the same request id; ``max_attempts`` counts rounds over all of them.

    With ``tls`` (implied by any of ``ca_file``, ``cert_file``, ``key_file``) the channel
    uses TLS: the server's certificate must be signed by ``ca_file`` (default: the
    system's CAs); ``cert_file`` and ``key_file`` are for servers requiring client
    certificates. Otherwise the channel is plaintext.
    """

    def __init__(
        self,
        server: str | Sequence[str],
        token: str = "",
        timeout: float = 30.0,
        *,
        user: str = "",
        password: str = "",
        project: str = "",
        max_attempts: int = 4,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
        tls: bool = False,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
    ) -> None:
        self._metadata = call_metadata(token, user, password, project)
        self.servers = _addresses(server)
        self.timeout = timeout
        self.max_attempts = max(1, max_attempts)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        if tls or ca_file or cert_file or key_file:
            credentials = channel_credentials(ca_file, cert_file, key_file)
            self._channels = [grpc.secure_channel(a, credentials) for a in self.servers]
        else:
            self._channels = [grpc.insecure_channel(address) for address in self.servers]
        self._stubs = [
            (
                images_pb2_grpc.ImageServiceStub(channel),
                disks_pb2_grpc.DiskServiceStub(channel),
                nodes_pb2_grpc.NodeServiceStub(channel),
                quotas_pb2_grpc.QuotaServiceStub(channel),
            )
            for channel in self._channels
        ]
        self._current = 0  # index of the server calls go to (until it fails)
        self._images = _FailoverStub(self, 0)
        self._disks = _FailoverStub(self, 1)
        self._nodes = _FailoverStub(self, 2)
        self._quotas = _FailoverStub(self, 3)

    @property
    def server(self) -> str:
        """The server calls go to now."""
        return self.servers[self._current]

    # -- plumbing -----------------------------------------------------------------

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> BmiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _backoff(self, attempt: int) -> float:
        # Full jitter: spreads out clients that all saw the same outage.
        cap = min(self.backoff_max, self.backoff_initial * (2**attempt))
        return random.uniform(0, cap)

    def _retrying(
        self, call: Callable[[float], _T], retry: bool, timeout: float | None = None
    ) -> _T:
        """``call(seconds_left)`` until it answers, or fails other than UNAVAILABLE, or the
        call's one deadline (``timeout``, default the client's) has passed: attempts and
        the pauses between them all fit in it, however slow each attempt is."""
        count = len(self.servers)
        attempts = self.max_attempts * count
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        attempt = 0
        while True:
            try:
                return call(max(deadline - time.monotonic(), 0.0))
            except grpc.RpcError as e:
                hint = retry_after(e)
                if hint is not None:
                    # Refused by admission control before anything was done, so safe to
                    # send again whatever the call; such refusals use up no attempt.
                    pause = hint * random.uniform(1.0, 1.5)  # jitter: not all at once
                else:
                    last = attempt == attempts - 1
                    if not retry or last or _code(e) != grpc.StatusCode.UNAVAILABLE:
                        raise
                    # The next server at once; a pause only after a round over all of them.
                    attempt += 1
                    pause = self._backoff((attempt - 1) // count) if attempt % count == 0 else 0.0
                if time.monotonic() + pause + MIN_ATTEMPT_SECONDS >= deadline:
                    raise  # no time left for another try: the last answer stands
            self._current = (self._current + 1) % count
            if pause:
                time.sleep(pause)

    def _unary(
        self, method: Any, request: Any, *, retry: bool, timeout: float | None = None
    ) -> Any:
        """``timeout``: the call's one deadline (default the client's)."""
        return self._retrying(
            lambda left: method(request, timeout=left, metadata=self._metadata), retry,
            timeout,
        )

    # -- images -------------------------------------------------------------------

    def list_images_page(
        self, project: str = "", page_size: int = 0, page_token: str = ""
    ) -> images_pb2.ListImagesResponse:
        """One page of images; pass the response's next_page_token to continue."""
        req = images_pb2.ListImagesRequest(
            project=project, page_size=page_size, page_token=page_token
        )
        return self._unary(self._images.ListImages, req, retry=True)

    def list_images(self, project: str = "", page_size: int = 0) -> Iterator[images_pb2.Image]:
        """Every image the caller may see, fetching pages lazily."""
        for page in _pages(lambda tok: self.list_images_page(project, page_size, tok)):
            yield from page.images

    def get_image(self, image: str) -> images_pb2.Image:
        return self._unary(
            self._images.GetImage, images_pb2.GetImageRequest(image=image), retry=True
        )

    def import_image(
        self,
        name: str,
        source_rbd_image: str,
        project: str = "",
        visibility: images_pb2.Visibility.ValueType = images_pb2.VISIBILITY_UNSPECIFIED,
        request_id: str | None = None,
    ) -> images_pb2.Image:
        req = images_pb2.ImportImageRequest(
            name=name,
            project=project,
            source_rbd_image=source_rbd_image,
            visibility=visibility,
            request_id=request_id or new_request_id(),
        )
        return self._unary(self._images.ImportImage, req, retry=True)

    def import_image_from_url(
        self,
        name: str,
        url: str,
        expected_digest: str,
        format: images_pb2.ImageFormat.ValueType = images_pb2.IMAGE_FORMAT_UNSPECIFIED,
        project: str = "",
        visibility: images_pb2.Visibility.ValueType = images_pb2.VISIBILITY_UNSPECIFIED,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> images_pb2.Image:
        """Have the server fetch ``url`` and check it against ``expected_digest``
        ("sha256:<hex>" or "sha512:<hex>"). The call lasts as long as the download:
        ``timeout`` (default: URL_IMPORT_TIMEOUT) bounds it. A retry (UNAVAILABLE: a
        broken download, a server restart) fetches the file again under the same
        request id; ``get_image(name)`` shows the bytes fetched meanwhile."""
        req = images_pb2.ImportImageRequest(
            name=name,
            project=project,
            source_url=url,
            expected_digest=expected_digest,
            format=format,
            visibility=visibility,
            request_id=request_id or new_request_id(),
        )
        return self._unary(self._images.ImportImage, req, retry=True,
                           timeout=URL_IMPORT_TIMEOUT if timeout is None else timeout)

    def verify_image(
        self, image: str, timeout: float | None = None
    ) -> images_pb2.VerifyImageResponse:
        """Hash the image's content in the store again and compare it with the recorded
        SHA-256 (reads the whole image: ``timeout`` default URL_IMPORT_TIMEOUT)."""
        req = images_pb2.VerifyImageRequest(image=image)
        return self._unary(self._images.VerifyImage, req, retry=True,
                           timeout=URL_IMPORT_TIMEOUT if timeout is None else timeout)

    def upload_image(
        self,
        path: str | Path,
        name: str,
        format: images_pb2.ImageFormat.ValueType | None = None,
        project: str = "",
        visibility: images_pb2.Visibility.ValueType = images_pb2.VISIBILITY_UNSPECIFIED,
        progress_callback: ProgressCallback | None = None,
        request_id: str | None = None,
    ) -> images_pb2.Image:
        """Stream a local file as a new image: a header, then 1 MiB chunks.

        A retry re-sends the whole file under the same request_id.
        """
        path = Path(path)
        size = path.stat().st_size
        header = images_pb2.UploadImageHeader(
            name=name,
            project=project,
            format=format or guess_format(path),
            file_size_bytes=size,
            visibility=visibility,
            request_id=request_id or new_request_id(),
        )
        deadline = self.timeout + UPLOAD_SECONDS_PER_MIB * size / CHUNK_SIZE

        def attempt(left: float) -> images_pb2.Image:
            return self._images.UploadImage(
                _upload_stream(path, header, size, progress_callback),
                timeout=left,
                metadata=self._metadata,
            )

        return self._retrying(attempt, retry=True, timeout=deadline)

    def copy_image(
        self, image: str, project: str = "", name: str = "", request_id: str | None = None
    ) -> images_pb2.Image:
        req = images_pb2.CopyImageRequest(
            image=image, project=project, name=name, request_id=request_id or new_request_id()
        )
        return self._unary(self._images.CopyImage, req, retry=True)

    def update_image(
        self,
        image: str,
        name: str = "",
        visibility: images_pb2.Visibility.ValueType = images_pb2.VISIBILITY_UNSPECIFIED,
        request_id: str | None = None,
    ) -> images_pb2.Image:
        req = images_pb2.UpdateImageRequest(
            image=image, name=name, visibility=visibility,
            request_id=request_id or new_request_id(),
        )
        # Safe to retry: the server acts on the image the first try did, even renamed.
        return self._unary(self._images.UpdateImage, req, retry=True)

    def delete_image(
        self, image: str, request_id: str | None = None
    ) -> images_pb2.DeleteImageResponse:
        req = images_pb2.DeleteImageRequest(image=image, request_id=request_id or new_request_id())
        return self._unary(self._images.DeleteImage, req, retry=True)

    # -- disks --------------------------------------------------------------------

    def list_disks_page(
        self, project: str = "", image: str = "", page_size: int = 0, page_token: str = ""
    ) -> disks_pb2.ListDisksResponse:
        req = disks_pb2.ListDisksRequest(
            project=project, image=image, page_size=page_size, page_token=page_token
        )
        return self._unary(self._disks.ListDisks, req, retry=True)

    def list_disks(
        self, project: str = "", image: str = "", page_size: int = 0
    ) -> Iterator[disks_pb2.Disk]:
        for page in _pages(lambda tok: self.list_disks_page(project, image, page_size, tok)):
            yield from page.disks

    def get_disk(self, disk: str) -> disks_pb2.Disk:
        return self._unary(self._disks.GetDisk, disks_pb2.GetDiskRequest(disk=disk), retry=True)

    def create_disk(
        self, name: str, image: str, project: str = "", request_id: str | None = None
    ) -> disks_pb2.Disk:
        req = disks_pb2.CreateDiskRequest(
            name=name, image=image, project=project, request_id=request_id or new_request_id()
        )
        return self._unary(self._disks.CreateDisk, req, retry=True)

    def delete_disk(self, disk: str, request_id: str | None = None) -> disks_pb2.DeleteDiskResponse:
        req = disks_pb2.DeleteDiskRequest(disk=disk, request_id=request_id or new_request_id())
        return self._unary(self._disks.DeleteDisk, req, retry=True)

    def snapshot_disk(
        self, disk: str, image_name: str, request_id: str | None = None
    ) -> images_pb2.Image:
        req = disks_pb2.SnapshotDiskRequest(
            disk=disk, image_name=image_name, request_id=request_id or new_request_id()
        )
        return self._unary(self._disks.SnapshotDisk, req, retry=True)

    # -- nodes --------------------------------------------------------------------

    def list_nodes_page(
        self,
        project: str = "",
        state: nodes_pb2.NodeState.ValueType = nodes_pb2.NODE_STATE_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
        include_free: bool = False,
    ) -> nodes_pb2.ListNodesResponse:
        req = nodes_pb2.ListNodesRequest(
            project=project,
            state=state,
            page_size=page_size,
            page_token=page_token,
            include_free=include_free,
        )
        return self._unary(self._nodes.ListNodes, req, retry=True)

    def free_nodes(self) -> list[str]:
        """Names of the nodes in no project (HIL's free pool), which a tenant may take."""
        return list(self.list_nodes_page(page_size=1, include_free=True).free_nodes)

    def list_nodes(
        self,
        project: str = "",
        state: nodes_pb2.NodeState.ValueType = nodes_pb2.NODE_STATE_UNSPECIFIED,
        page_size: int = 0,
    ) -> Iterator[nodes_pb2.Node]:
        for page in _pages(lambda tok: self.list_nodes_page(project, state, page_size, tok)):
            yield from page.nodes

    def get_node(self, node: str) -> nodes_pb2.Node:
        return self._unary(self._nodes.GetNode, nodes_pb2.GetNodeRequest(node=node), retry=True)

    def enroll_node(
        self, name: str, project: str, macs: list[str] | None = None, discovered_node: str = ""
    ) -> nodes_pb2.Node:
        req = nodes_pb2.EnrollNodeRequest(
            name=name, project=project, macs=macs or [], discovered_node=discovered_node
        )
        # Safe to retry: enrolling a node again exactly so returns it unchanged.
        return self._unary(self._nodes.EnrollNode, req, retry=True)

    def provision_node(
        self,
        node: str,
        image: str = "",
        disk: str = "",
        request_id: str | None = None,
        power_cycle: bool = False,
        boot_mode: nodes_pb2.BootMode.ValueType = nodes_pb2.BOOT_MODE_UNSPECIFIED,
        config: nodes_pb2.NodeConfig | None = None,
    ) -> nodes_pb2.Node:
        """``config``: what the node's OS is told about itself (``node_config(...)``);
        None: its name as host name, nothing else."""
        req = nodes_pb2.ProvisionNodeRequest(
            node=node,
            request_id=request_id or new_request_id(),
            power_cycle=power_cycle,
            boot_mode=boot_mode,
            config=config,
        )
        if image:
            req.image = image
        if disk:
            req.disk = disk
        return self._unary(self._nodes.ProvisionNode, req, retry=True)

    def deprovision_node(
        self, node: str, keep_disk: bool = False, request_id: str | None = None
    ) -> nodes_pb2.Node:
        req = nodes_pb2.DeprovisionNodeRequest(
            node=node, keep_disk=keep_disk, request_id=request_id or new_request_id()
        )
        return self._unary(self._nodes.DeprovisionNode, req, retry=True)

    def reprovision_node(
        self,
        node: str,
        request_id: str | None = None,
        config: nodes_pb2.NodeConfig | None = None,
    ) -> nodes_pb2.Node:
        """A fresh clone and a new instance id; ``config`` replaces the node's config
        (None: it keeps the one it had)."""
        req = nodes_pb2.ReprovisionNodeRequest(
            node=node, request_id=request_id or new_request_id(), config=config
        )
        return self._unary(self._nodes.ReprovisionNode, req, retry=True)

    def take_node(self, node: str, project: str = "") -> nodes_pb2.Node:
        """Take a free node into your project (admins: ``project``)."""
        req = nodes_pb2.TakeNodeRequest(node=node, project=project)
        # Safe to retry: taking a node already in the project returns it unchanged.
        return self._unary(self._nodes.TakeNode, req, retry=True)

    def give_back_node(self, node: str) -> nodes_pb2.GiveBackNodeResponse:
        """Give a node without a disk back to the free pool."""
        req = nodes_pb2.GiveBackNodeRequest(node=node)
        # Safe to retry: giving back a node already in the free pool changes nothing.
        return self._unary(self._nodes.GiveBackNode, req, retry=True)

    def watch_nodes(self, project: str = "", node: str = "") -> Iterator[nodes_pb2.NodeEvent]:
        """Transitions as they happen, until the caller stops iterating (no deadline)."""
        req = nodes_pb2.WatchNodesRequest(project=project, node=node)
        while True:
            stream = self._nodes.WatchNodes(req, metadata=self._metadata)
            stream.initial_metadata()  # live (or refused) from here: nothing is missed
            hint = retry_after(stream) if stream.done() else None
            if hint is None:
                return stream
            time.sleep(hint * random.uniform(1.0, 1.5))

    # -- quotas -------------------------------------------------------------------

    def get_quota(self, project: str = "") -> quotas_pb2.Quota:
        """A project's limits and use (default: yours; admins must name one)."""
        req = quotas_pb2.GetQuotaRequest(project=project)
        return self._unary(self._quotas.GetQuota, req, retry=True)

    def set_quota(
        self,
        project: str,
        max_virtual_bytes: int | None = None,
        max_images: int | None = None,
        max_disks: int | None = None,
        reset: bool = False,
    ) -> quotas_pb2.Quota:
        """Admins: give ``project`` limits of its own (0: no limit; None: unchanged, or
        with ``reset`` back to the server's default)."""
        req = quotas_pb2.SetQuotaRequest(
            project=project,
            max_virtual_bytes=max_virtual_bytes,
            max_images=max_images,
            max_disks=max_disks,
            reset=reset,
        )
        # Safe to retry: setting the same limits again changes nothing.
        return self._unary(self._quotas.SetQuota, req, retry=True)


class _FailoverStub:
    """``client._nodes.ProvisionNode(...)`` on whichever server is current at call time."""

    def __init__(self, client: BmiClient, service: int) -> None:
        self._client = client
        self._service = service

    def __getattr__(self, method: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            stub = self._client._stubs[self._client._current][self._service]
            return getattr(stub, method)(*args, **kwargs)

        return call


def _addresses(server: str | Sequence[str]) -> list[str]:
    listed = server.split(",") if isinstance(server, str) else list(server)
    addresses = [a.strip() for a in listed if a.strip()]
    if not addresses:
        raise ValueError("at least one server address is required")
    return addresses


RETRY_AFTER_METADATA = "retry-after-ms"


def retry_after(error: grpc.RpcError | grpc.Call) -> float | None:
    """Seconds to wait before trying again, when the server refused the call for lack of
    capacity (RESOURCE_EXHAUSTED with ``retry-after-ms``); None for any other answer.
    ``bmi_agent.client.retry_after`` is the same rule, kept apart on purpose: the agent's
    initramfs holds ``bmi_agent`` and the stubs only, not this package."""
    if _code(error) != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    trailing = getattr(error, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == RETRY_AFTER_METADATA:
            try:
                return min(max(int(value), 0), 60_000) / 1000
            except ValueError:
                return None
    return None


def _code(error: grpc.RpcError) -> grpc.StatusCode | None:
    code = getattr(error, "code", None)
    return code() if callable(code) else None


def _pages(fetch: Callable[[str], _T]) -> Iterator[_T]:
    token = ""
    seen: set[str] = set()
    while True:
        page = fetch(token)
        yield page
        token = page.next_page_token  # type: ignore[attr-defined]
        # Stop on a repeated token too, so a misbehaving server cannot loop us forever.
        if not token or token in seen:
            return
        seen.add(token)


def _upload_stream(
    path: Path,
    header: images_pb2.UploadImageHeader,
    size: int,
    progress: ProgressCallback | None,
) -> Iterator[images_pb2.UploadImageRequest]:
    yield images_pb2.UploadImageRequest(header=header)
    sent = 0
    if progress:
        progress(sent, size)
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_SIZE):
            yield images_pb2.UploadImageRequest(chunk=chunk)
            sent += len(chunk)
            if progress:
                progress(sent, size)
