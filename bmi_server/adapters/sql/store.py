"""SqlStateStore: the catalogue's records in SQLite or PostgreSQL (SQLAlchemy Core)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    and_,
    create_engine,
    event,
    or_,
    select,
    tuple_,
)
from sqlalchemy.exc import IntegrityError, OperationalError

from ...core.errors import AlreadyExists, Unavailable
from ...core.models import Disk, Image, ImageKind, ResourceState, Visibility, utcnow
from ...core.ports import Admission
from . import migrate
from .agent_store import SqlAgentStore
from .gateway_store import SqlGatewayStore
from .node_store import SqlNodeStore, _aware
from .placement_store import SqlPlacementStore
from .quota_store import SqlQuotaStore
from .replica_store import SqlReplicaStore
from .schema import disks, images, request_log

IN_FLIGHT = frozenset({ResourceState.CREATING, ResourceState.DELETING})
# PostgreSQL's serialization failure and deadlock: the transaction may simply be retried.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})


class SqlStateStore(
    SqlNodeStore, SqlAgentStore, SqlGatewayStore, SqlReplicaStore, SqlQuotaStore,
    SqlPlacementStore,
):
    """``replica_id`` names this server among several sharing the database: records it
    writes in flight (creating/deleting, provisioning/deprovisioning) carry it as owner."""

    def __init__(
        self, url: str, *, replica_id: str = "", timeout: float = 5.0, upgrade: bool = True
    ) -> None:
        """``timeout``: the longest wait for the database (SQLite's write lock, a
        PostgreSQL connection) before a call fails with Unavailable. ``upgrade``: bring
        the schema to this release's first (migrate.py); without, refuse one that is not."""
        self.url = url
        self.replica_id = replica_id
        self.is_postgres = url.startswith("postgresql")
        self.timeout = timeout
        self._engine = make_engine(url, timeout)
        # SQLite admits one writer; concurrent ones back off in its busy handler with
        # sleeps of up to 100 ms. Queueing them here instead keeps the latency flat.
        self._serial = _Queue(timeout) if url.startswith("sqlite") else contextlib.nullcontext()
        try:
            with self._serial, self._guard():
                if upgrade:
                    migrate.upgrade(self._engine)
                else:
                    migrate.require_head(self._engine)
        except BaseException:
            self._engine.dispose()
            raise

    def close(self) -> None:
        self._engine.dispose()

    # -- images ------------------------------------------------------------------------

    def add_image(self, image: Image, admit: Admission | None = None) -> None:
        self._insert(
            images,
            _image_row(image, self._owner(image.state)),
            f"image {image.name!r}",
            image.project,
            admit,
        )

    def update_image(self, image: Image) -> None:
        self._update(
            images,
            image.id,
            _image_row(image, self._owner(image.state)),
            f"image {image.name!r}",
            image.project,
        )

    def delete_image(self, image_id: str) -> None:
        with self._begin() as conn:
            conn.execute(images.delete().where(images.c.id == image_id))

    def get_image(self, image_id: str) -> Image | None:
        return self._one(images, images.c.id == image_id, _image)

    def find_images_by_name(self, name: str, projects: Iterable[str] | None) -> list[Image]:
        cond = images.c.name == name
        if projects is not None:
            cond = and_(cond, images.c.project.in_(list(projects)))
        return self._many(select(images).where(cond).order_by(images.c.project), _image)

    def find_image_by_request(self, request_id: str) -> Image | None:
        return self._one(images, images.c.request_id == request_id, _image)

    def list_images(
        self,
        *,
        projects: Iterable[str] | None,
        include_public: bool,
        after: tuple[str, str] | None,
        limit: int,
    ) -> list[Image]:
        query = select(images)
        if projects is not None:
            cond = images.c.project.in_(list(projects))
            if include_public:
                cond = or_(cond, images.c.visibility == Visibility.PUBLIC.value)
            query = query.where(cond)
        return self._many(_page(query, images, after, limit), _image)

    def all_images(self) -> list[Image]:
        return self._many(select(images), _image)

    def images_missing_digest(self, limit: int) -> list[Image]:
        query = (select(images)
                 .where(and_(images.c.state == ResourceState.READY.value,
                             images.c.content_sha256.is_(None)))
                 .order_by(images.c.create_time).limit(limit))
        return self._many(query, _image)

    def record_image_digest(self, image_id: str, sha256: str) -> bool:
        with self._begin() as conn:
            done = conn.execute(
                images.update()
                .where(and_(images.c.id == image_id, images.c.content_sha256.is_(None),
                            images.c.state == ResourceState.READY.value))
                .values(content_sha256=sha256)
            )
            return done.rowcount == 1

    # -- disks -------------------------------------------------------------------------

    def add_disk(self, disk: Disk, admit: Admission | None = None) -> None:
        self._insert(
            disks,
            _disk_row(disk, self._owner(disk.state)),
            f"disk {disk.name!r}",
            disk.project,
            admit,
        )

    def update_disk(self, disk: Disk) -> None:
        self._update(
            disks,
            disk.id,
            _disk_row(disk, self._owner(disk.state)),
            f"disk {disk.name!r}",
            disk.project,
        )

    def delete_disk(self, disk_id: str) -> None:
        with self._begin() as conn:
            conn.execute(disks.delete().where(disks.c.id == disk_id))

    def get_disk(self, disk_id: str) -> Disk | None:
        return self._one(disks, disks.c.id == disk_id, _disk)

    def find_disks_by_name(self, name: str, projects: Iterable[str] | None) -> list[Disk]:
        cond = disks.c.name == name
        if projects is not None:
            cond = and_(cond, disks.c.project.in_(list(projects)))
        return self._many(select(disks).where(cond).order_by(disks.c.project), _disk)

    def find_disk_by_request(self, request_id: str) -> Disk | None:
        return self._one(disks, disks.c.request_id == request_id, _disk)

    def list_disks(
        self,
        *,
        projects: Iterable[str] | None,
        image_id: str | None,
        after: tuple[str, str] | None,
        limit: int,
    ) -> list[Disk]:
        query = select(disks)
        if projects is not None:
            query = query.where(disks.c.project.in_(list(projects)))
        if image_id is not None:
            query = query.where(disks.c.image_id == image_id)
        return self._many(_page(query, disks, after, limit), _disk)

    def disks_of_image(self, image_id: str) -> list[Disk]:
        return self._many(select(disks).where(disks.c.image_id == image_id), _disk)

    def all_disks(self) -> list[Disk]:
        return self._many(select(disks), _disk)

    # -- idempotency keys of updates and deletes ---------------------------------------

    def record_request(self, request_id: str, action: str, resource_id: str) -> None:
        row = {"request_id": request_id, "action": action, "resource_id": resource_id,
               "create_time": utcnow()}
        try:
            with self._begin() as conn:
                conn.execute(request_log.insert().values(**row))
        except IntegrityError as exc:
            raise AlreadyExists(f"request {request_id!r} is already recorded") from exc

    def recall_request(self, request_id: str) -> tuple[str, str] | None:
        with self._begin() as conn:
            row = conn.execute(
                select(request_log.c.action, request_log.c.resource_id).where(
                    request_log.c.request_id == request_id
                )
            ).first()
        return (row.action, row.resource_id) if row is not None else None

    def forget_requests(self, before: datetime) -> int:
        with self._begin() as conn:
            done = conn.execute(request_log.delete().where(request_log.c.create_time < before))
        return done.rowcount

    # -- plumbing ----------------------------------------------------------------------

    def _owner(self, state: ResourceState) -> str | None:
        return self.replica_id or None if state in IN_FLIGHT else None

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) in RETRYABLE_SQLSTATES:
                # Another replica's transaction won a conflict; nothing of ours was kept.
                raise Unavailable(
                    f"database conflict with a concurrent change, retry: {exc.orig}"
                ) from exc
            raise Unavailable(f"database unavailable: {exc.orig or exc}") from exc

    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        with self._serial, self._guard(), self._engine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """For reads only: WAL lets them run beside the writer, so they skip its queue."""
        with self._guard(), self._engine.connect() as conn:
            yield conn

    def _insert(
        self,
        table: Table,
        row: dict[str, Any],
        label: str,
        project: str,
        admit: Admission | None = None,
    ) -> None:
        """``admit``: the quota check, in the insert's transaction (quota_store.py)."""
        try:
            with self._begin() as conn:
                if admit is not None:
                    self._admit(conn, project, admit)
                conn.execute(table.insert().values(**row))
        except IntegrityError as exc:
            raise AlreadyExists(f"{label} already exists in project {project!r}") from exc

    def _update(
        self, table: Table, row_id: str, row: dict[str, Any], label: str, project: str
    ) -> None:
        try:
            with self._begin() as conn:
                conn.execute(table.update().where(table.c.id == row_id).values(**row))
        except IntegrityError as exc:
            raise AlreadyExists(f"{label} already exists in project {project!r}") from exc

    def _one(self, table: Table, cond, convert):
        with self._read() as conn:
            row = conn.execute(select(table).where(cond)).mappings().first()
        return convert(row) if row is not None else None

    def _many(self, query, convert) -> list:
        with self._read() as conn:
            return [convert(r) for r in conn.execute(query).mappings()]


class _Queue:
    """This process's SQLite callers, one at a time; waiting no longer than ``timeout``
    (a caller ahead may itself be waiting for another process's write lock)."""

    def __init__(self, timeout: float) -> None:
        self._lock = threading.Lock()
        self._timeout = timeout

    def __enter__(self) -> None:
        if not self._lock.acquire(timeout=self._timeout):
            raise Unavailable(f"database unavailable: busy for more than {self._timeout:g}s")

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def make_engine(url: str, timeout: float) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"timeout": timeout, "check_same_thread": False}
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:
            # WAL lets readers run beside the one writer; foreign processes see commits.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    connect_args = {"connect_timeout": max(1, round(timeout))} if "postgresql" in url else {}
    return create_engine(
        url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args=connect_args,
        pool_timeout=timeout,
    )


def _page(query, table: Table, after: tuple[str, str] | None, limit: int):
    if after is not None:
        query = query.where(tuple_(table.c.project, table.c.name) > tuple_(*after))
    return query.order_by(table.c.project, table.c.name).limit(limit)


def _image_row(image: Image, owner: str | None) -> dict[str, Any]:
    return {
        "id": image.id,
        "name": image.name,
        "project": image.project,
        "kind": image.kind.value,
        "visibility": image.visibility.value,
        "state": image.state.value,
        "size_bytes": image.size_bytes,
        "volume": image.volume,
        "source": image.source,
        "request_id": image.request_id or None,
        "create_time": image.create_time,
        "owner": owner,
        "content_sha256": image.content_sha256 or None,
        "file_digest": image.file_digest or None,
        "fetched_bytes": image.fetched_bytes or None,
        "fetch_total_bytes": image.fetch_total_bytes or None,
    }


def _image(row) -> Image:
    return Image(
        id=row["id"],
        name=row["name"],
        project=row["project"],
        kind=ImageKind(row["kind"]),
        size_bytes=row["size_bytes"],
        volume=row["volume"],
        visibility=Visibility(row["visibility"]),
        state=ResourceState(row["state"]),
        source=row["source"],
        request_id=row["request_id"] or "",
        create_time=_aware(row["create_time"]),
        owner=row["owner"] or "",
        content_sha256=row["content_sha256"] or "",
        file_digest=row["file_digest"] or "",
        fetched_bytes=row["fetched_bytes"] or 0,
        fetch_total_bytes=row["fetch_total_bytes"] or 0,
    )


def _disk_row(disk: Disk, owner: str | None) -> dict[str, Any]:
    return {
        "id": disk.id,
        "name": disk.name,
        "project": disk.project,
        "image_id": disk.image_id,
        "image_name": disk.image_name,
        "state": disk.state.value,
        "size_bytes": disk.size_bytes,
        "volume": disk.volume,
        "request_id": disk.request_id or None,
        "create_time": disk.create_time,
        "owner": owner,
    }


def _disk(row) -> Disk:
    return Disk(
        id=row["id"],
        name=row["name"],
        project=row["project"],
        image_id=row["image_id"],
        image_name=row["image_name"],
        size_bytes=row["size_bytes"],
        volume=row["volume"],
        state=ResourceState(row["state"]),
        request_id=row["request_id"] or "",
        create_time=_aware(row["create_time"]),
        owner=row["owner"] or "",
    )
