"""ImageStore on Ceph RBD (librados/librbd through Debian's Python bindings).

Which images are BMI's: librbd copies a parent's image metadata into clones and copies,
so a ``bmi.*`` key alone does not prove an image is BMI's own. The adapter therefore
writes ``bmi.self = <image name>`` as the first step after creating any volume: an image
is BMI's only when that key names the image itself. ``bmi.complete`` is "0" from the
start and becomes "1" as the very last step of ``seal`` / ``clone`` / ``mark_complete``.
Both keys are the adapter's own and are not returned in ``VolumeInfo.metadata``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import rados
import rbd

from bmi_server.core import deadlines, digests
from bmi_server.core.errors import (
    AlreadyExists,
    BmiError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from bmi_server.core.faults import crash_point
from bmi_server.core.models import ExternalVolume, VolumeInfo
from bmi_server.core.naming import (
    NOT_IMPORTABLE,
    TEMP_SNAPSHOT_PREFIX,
    is_bmi_volume_name,
    temporary_snapshot,
)

GOLDEN_SNAPSHOT = "bmi-golden"
KEY_PREFIX = "bmi."
KEY_COMPLETE = "bmi.complete"
KEY_SELF = "bmi.self"
_OWN_KEYS = frozenset({KEY_COMPLETE, KEY_SELF})
# Explicit rather than the cluster's default, so clones and fast used-bytes always work.
FEATURES = (
    rbd.RBD_FEATURE_LAYERING
    | rbd.RBD_FEATURE_EXCLUSIVE_LOCK
    | rbd.RBD_FEATURE_OBJECT_MAP
    | rbd.RBD_FEATURE_FAST_DIFF
    | rbd.RBD_FEATURE_DEEP_FLATTEN
)
_LIST_WORKERS = 16  # opening an image costs a few round trips; overlap them
# How far an import source's clone chain is followed to see whether it leads to BMI's.
_MAX_CLONE_DEPTH = 16


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Turn librados/librbd exceptions into domain errors with a one-line message."""
    try:
        yield
    except BmiError:
        raise
    except rbd.ImageNotFound:
        raise NotFound(f"{what}: no such volume") from None
    except (rbd.ImageExists, rados.ObjectExists):
        raise AlreadyExists(f"{what}: volume already exists") from None
    except rbd.ImageBusy:
        raise FailedPrecondition(f"{what}: volume is busy (in use or has clones)") from None
    except rbd.OperationCanceled:
        raise DeadlineExceeded(f"{what}: stopped, the caller's deadline passed") from None
    except rbd.ImageHasSnapshots:
        raise FailedPrecondition(f"{what}: volume has snapshots") from None
    except (rbd.InvalidArgument, rbd.ArgumentOutOfRange) as e:
        raise InvalidArgument(f"{what}: {_strerror(e)}") from None
    except (rbd.Error, rados.Error) as e:
        # Timeouts, lost connections, I/O errors, full cluster: retrying may succeed.
        raise Unavailable(f"ceph: {what}: {_strerror(e)}") from None


def _strerror(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _validate_metadata(metadata: Mapping[str, str]) -> None:
    reserved = sorted(_OWN_KEYS.intersection(metadata))
    if reserved:
        raise InvalidArgument(f"metadata keys reserved by the image store: {reserved}")


class RbdImageStore:
    def __init__(
        self,
        conf_path: str,
        pool: str,
        client_name: str = "client.admin",
        op_timeout: int = 30,
        busy_grace: float = 35.0,
    ) -> None:
        self.conf_path = str(conf_path)
        self.pool = pool
        self.client_name = client_name
        self.busy_grace = busy_grace
        # Fail instead of hanging forever when the cluster is unreachable.
        self._conf = {
            "rados_osd_op_timeout": str(op_timeout),
            "rados_mon_op_timeout": str(op_timeout),
            "client_mount_timeout": str(op_timeout),
        }
        self._lock = threading.Lock()  # guards connecting/closing only; librados is thread-safe
        self._cluster: rados.Rados | None = None
        self._ioctx: rados.Ioctx | None = None
        self._rbd = rbd.RBD()

    # --- connection ------------------------------------------------------------------

    def _io(self) -> rados.Ioctx:
        """The pool's ioctx, connecting on first use (and again after a failed connect)."""
        ioctx = self._ioctx
        if ioctx is not None:
            return ioctx
        with self._lock:
            if self._ioctx is None:
                cluster = rados.Rados(
                    conffile=self.conf_path, name=self.client_name, conf=self._conf
                )
                try:
                    cluster.connect(timeout=int(self._conf["client_mount_timeout"]))
                    self._ioctx = cluster.open_ioctx(self.pool)
                except rados.ObjectNotFound:
                    cluster.shutdown()
                    raise Unavailable(f"ceph: pool {self.pool!r} does not exist") from None
                except rados.Error as e:
                    cluster.shutdown()
                    raise Unavailable(f"ceph: cannot connect: {_strerror(e)}") from None
                self._cluster = cluster
            return self._ioctx

    def fence_previous_instance(self, record: Path) -> str | None:
        """Blocklist the Ceph client of this server's previous run, if it died.

        A killed process leaves watches on the images it had open; until they time out
        (30 s) Ceph refuses to remove those images, so reconcile after a crash would stall.
        Blocklisting the dead client drops them at once (what `rbd lock break` does).
        The current client's address is recorded for the next start. Returns the address
        fenced, if any.
        """
        self._io()
        assert self._cluster is not None
        previous = record.read_text().strip() if record.exists() else ""
        mine = self._cluster.get_addrs()
        fenced = None
        if previous and previous != mine:
            with _mapped("blocklist the previous server instance"):
                self._cluster.blocklist_add(previous, 3600)
            fenced = previous
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(mine + "\n")
        return fenced

    def close(self) -> None:
        with self._lock:
            if self._ioctx is not None:
                self._ioctx.close()
                self._ioctx = None
            if self._cluster is not None:
                self._cluster.shutdown()
                self._cluster = None

    def _image(self, volume: str, read_only: bool = False) -> rbd.Image:
        return rbd.Image(self._io(), volume, read_only=read_only)

    # --- creating volumes ------------------------------------------------------------

    def create(self, volume: str, size_bytes: int, metadata: Mapping[str, str]) -> None:
        _validate_metadata(metadata)
        if size_bytes <= 0:
            raise InvalidArgument(f"volume size must be positive, not {size_bytes}")
        with _mapped(f"create {volume}"):
            self._rbd.create(self._io(), volume, size_bytes, old_format=False, features=FEATURES)
            with self._image(volume) as image:
                self._claim(image, volume, metadata)

    def _claim(self, image: rbd.Image, volume: str, metadata: Mapping[str, str]) -> None:
        """Mark a new image BMI's and incomplete, drop inherited keys, set its metadata."""
        image.metadata_set(KEY_COMPLETE, "0")  # first: a copied parent may say "1"
        image.metadata_set(KEY_SELF, volume)
        for key, _ in list(image.metadata_list()):
            if key not in _OWN_KEYS and key not in metadata:
                image.metadata_remove(key)  # inherited from a parent or copy source
        for key, value in metadata.items():
            image.metadata_set(key, value)

    def write(self, volume: str, offset: int, data: bytes) -> None:
        with _mapped(f"write {volume}"), self._image(volume) as image:
            if offset < 0 or offset + len(data) > image.size():
                raise InvalidArgument(
                    f"write {volume}: {len(data)} bytes at {offset} exceed size {image.size()}"
                )
            image.write(data, offset)

    def import_raw_file(self, volume: str, path: Path) -> None:
        with _mapped(f"import into {volume}"), self._image(volume) as image:
            self._require_bmi(image, volume)
            file_size = path.stat().st_size
            if file_size > image.size():
                raise InvalidArgument(
                    f"the image file ({file_size} bytes) is larger than its volume"
                )
            with path.open("rb") as f:
                for offset, length in _data_extents(f.fileno(), file_size):
                    _copy_range(lambda at, n: os.pread(f.fileno(), n, at), image,
                                offset, length, f"import into {volume}")

    def external_volume(self, source: str) -> ExternalVolume:
        with _mapped(f"external volume {source}"), self._image(source, read_only=True) as image:
            return ExternalVolume(size_bytes=image.size(), from_bmi=self._from_bmi(image))

    def copy_external(self, source: str, volume: str, metadata: Mapping[str, str]) -> None:
        """Copied extent by extent (not librbd's one-call copy) so that the caller's
        deadline can stop it; a stopped copy is removed by the caller's rollback."""
        _validate_metadata(metadata)
        # Errors name the source only: ``volume`` is internal (the caller's image has an id).
        with _mapped(f"copy {source}"):
            self._refuse_existing(volume, f"copy {source}")
            with self._image(source, read_only=True) as src:
                # Checked again on the very image copied: the name may lead elsewhere by now.
                if self._from_bmi(src):
                    raise PermissionDenied(NOT_IMPORTABLE)
                size = src.size()
                self._rbd.create(self._io(), volume, size, old_format=False, features=FEATURES)
                with self._image(volume) as image:
                    self._claim(image, volume, metadata)
                    extents: list[tuple[int, int]] = []
                    src.diff_iterate(0, size, None,
                                     lambda o, n, exists: exists and extents.append((o, n)),
                                     include_parent=True, whole_object=True)
                    for offset, length in extents:
                        _copy_range(src.read, image, offset, length, f"copy {source}")

    def _from_bmi(self, image: rbd.Image) -> bool:
        """Whether ``image`` is BMI's or made from BMI's: a ``bmi.*`` key of its own or
        inherited (librbd copies metadata into clones and copies, so a copy of a BMI disk
        carries it), or an ancestor along its clone chain named or marked as BMI's (a
        clone whose inherited keys were removed still reads its parent's data)."""
        with contextlib.ExitStack() as opened:
            for _ in range(_MAX_CLONE_DEPTH):
                if any(key.startswith(KEY_PREFIX) for key, _ in image.metadata_list()):
                    return True
                try:
                    parent = image.get_parent_image_spec()
                    parent_id = image.parent_id()
                except rbd.ImageNotFound:
                    return False  # not a clone, or flattened: its data is its own
                if is_bmi_volume_name(parent["image_name"]):
                    return True
                image = self._open_parent(opened, parent, parent_id)
        return True  # a chain this deep is not followed to its end: not vouched for

    def _open_parent(
        self, opened: contextlib.ExitStack, parent: Mapping[str, str], parent_id: str
    ) -> rbd.Image:
        """The parent of a clone, at the snapshot it was cloned from where that is still
        readable by name (else its head), opened read-only until ``opened`` closes."""
        ioctx = self._io()
        if parent["pool_name"] != self.pool or parent["pool_namespace"]:
            assert self._cluster is not None  # connected by self._io()
            ioctx = self._cluster.open_ioctx(parent["pool_name"])
            opened.callback(ioctx.close)
            ioctx.set_namespace(parent["pool_namespace"])
        try:
            image = rbd.Image(ioctx, image_id=parent_id, snapshot=parent["snap_name"],
                              read_only=True)  # fmt: skip
        except rbd.ImageNotFound:  # its snapshot went to the trash: the head will do
            image = rbd.Image(ioctx, image_id=parent_id, read_only=True)
        return opened.enter_context(image)

    def _refuse_existing(self, volume: str, what: str) -> None:
        try:
            with self._image(volume, read_only=True):
                pass
        except rbd.ImageNotFound:
            return
        raise AlreadyExists(f"{what}: volume already exists")

    def copy_flattened(self, source: str, volume: str, metadata: Mapping[str, str]) -> None:
        _validate_metadata(metadata)
        snap = temporary_snapshot(volume)
        with _mapped(f"copy {source} to {volume}"):
            self._refuse_existing(volume, f"copy {source} to {volume}")
            with self._image(source) as src:
                if snap not in {s["name"] for s in src.list_snaps()}:
                    src.create_snap(snap)
                if not src.is_protected_snap(snap):
                    src.protect_snap(snap)
            crash_point("rbd.copy.after_snapshot")
            created = False
            try:
                self._rbd.clone(self._io(), source, snap, self._io(), volume, features=FEATURES)
                created = True
                crash_point("rbd.copy.after_clone")
                with self._image(volume) as image:
                    self._claim(image, volume, metadata)
                    # Now independent of the temporary snapshot. Long for a big disk:
                    # it stops (OperationCanceled) once the caller's deadline passes.
                    image.flatten(on_progress=_cancel_after_deadline())
            except BaseException:
                if created:  # a half-made copy still pins the snapshot; it is ours to drop
                    with contextlib.suppress(rbd.Error, rados.Error):
                        self._rbd.remove(self._io(), volume)
                raise
            finally:
                # Best effort; a leftover shows in VolumeInfo.temporary_snapshots.
                with contextlib.suppress(rbd.Error, rados.Error, BmiError):
                    self._drop_snapshot(source, snap)

    def seal(self, volume: str) -> None:
        with _mapped(f"seal {volume}"), self._image(volume) as image:
            self._require_bmi(image, volume)
            if GOLDEN_SNAPSHOT not in {s["name"] for s in image.list_snaps()}:
                image.create_snap(GOLDEN_SNAPSHOT)
            if not image.is_protected_snap(GOLDEN_SNAPSHOT):
                image.protect_snap(GOLDEN_SNAPSHOT)
            crash_point("rbd.seal.before_complete")
            image.metadata_set(KEY_COMPLETE, "1")

    def clone(self, image_volume: str, volume: str, metadata: Mapping[str, str]) -> None:
        _validate_metadata(metadata)
        with _mapped(f"clone {image_volume} to {volume}"):
            # The hot path of provisioning: read and write the header objects directly
            # (one op each) rather than opening images and setting keys one at a time.
            try:
                parent = _header_metadata(self._io(), _image_id(self._io(), image_volume))
            except rados.ObjectNotFound:
                raise NotFound(f"volume {image_volume} not found") from None
            if parent.get(KEY_SELF) != image_volume or parent.get(KEY_COMPLETE) != "1":
                raise FailedPrecondition(f"volume {image_volume} is not a sealed image")
            try:
                self._rbd.clone(self._io(), image_volume, GOLDEN_SNAPSHOT, self._io(), volume,
                                features=FEATURES)
            except rbd.ImageNotFound:
                raise FailedPrecondition(f"volume {image_volume} is not a sealed image") from None
            crash_point("rbd.clone.before_claim")
            # One atomic write: the clone turns BMI's, labelled and complete at once, and
            # loses the keys it inherited from its parent.
            image_id = _image_id(self._io(), volume)
            inherited = _header_metadata(self._io(), image_id)
            # Empty values are left out: absent and empty mean the same to readers.
            own = {**{k: v for k, v in metadata.items() if v}, KEY_SELF: volume,
                   KEY_COMPLETE: "1"}
            with rados.WriteOpCtx() as op:
                stale = tuple(f"metadata_{k}" for k in inherited if k not in own)
                if stale:
                    self._io().remove_omap_keys(op, stale)
                self._io().set_omap(
                    op, tuple(f"metadata_{k}" for k in own), tuple(v.encode() for v in own.values())
                )
                self._io().operate_write_op(op, f"rbd_header.{image_id}")

    def mark_complete(self, volume: str) -> None:
        with _mapped(f"complete {volume}"), self._image(volume) as image:
            self._require_bmi(image, volume)
            image.metadata_set(KEY_COMPLETE, "1")

    def set_metadata(self, volume: str, metadata: Mapping[str, str]) -> None:
        _validate_metadata(metadata)
        with _mapped(f"set metadata of {volume}"), self._image(volume) as image:
            self._require_bmi(image, volume)
            for key, value in metadata.items():
                image.metadata_set(key, value)

    @staticmethod
    def _require_bmi(image: rbd.Image, volume: str) -> None:
        if dict(image.metadata_list()).get(KEY_SELF) != volume:
            raise FailedPrecondition(f"volume {volume} was not made by BMI")

    # --- removing --------------------------------------------------------------------

    def remove(self, volume: str) -> None:
        with _mapped(f"remove {volume}"):
            try:
                image = self._image(volume)
            except rbd.ImageNotFound:
                return
            with image:
                children = sorted(c["image"] for c in image.list_children2())
                if children:
                    raise FailedPrecondition(
                        f"volume {volume} still has clones: {', '.join(children)}"
                    )
                for snap in list(image.list_snaps()):
                    if image.is_protected_snap(snap["name"]):
                        image.unprotect_snap(snap["name"])
                    image.remove_snap(snap["name"])
            crash_point("rbd.remove.after_snapshots")
            self._remove_when_closed(volume)

    def _remove_when_closed(self, volume: str) -> None:
        """Remove, waiting out watches a killed client left behind (a crashed tgtd or
        server): Ceph drops them after osd_client_watch_timeout (30 s by default)."""
        deadline = time.monotonic() + self.busy_grace
        delay = 0.5
        while True:
            try:
                self._rbd.remove(self._io(), volume)
                return
            except rbd.ImageNotFound:
                return  # removed concurrently: still the outcome asked for
            except rbd.ImageBusy:
                if time.monotonic() + delay > deadline:
                    raise FailedPrecondition(
                        f"volume {volume} is in use (open by a target or another client)"
                    ) from None
            time.sleep(delay)
            delay = min(delay * 2, 4.0)

    def remove_temporary_snapshot(self, volume: str, snapshot: str) -> None:
        if not snapshot.startswith(TEMP_SNAPSHOT_PREFIX):
            raise InvalidArgument(f"{snapshot!r} is not a temporary snapshot")
        with _mapped(f"remove snapshot {volume}@{snapshot}"):
            try:
                self._drop_snapshot(volume, snapshot)
            except rbd.ImageNotFound:
                return

    def _drop_snapshot(self, volume: str, snapshot: str) -> None:
        with self._image(volume) as image:
            if snapshot not in {s["name"] for s in image.list_snaps()}:
                return
            if image.is_protected_snap(snapshot):
                image.set_snap(snapshot)
                children = sorted(c["image"] for c in image.list_children2())
                image.set_snap(None)
                if children:
                    raise FailedPrecondition(
                        f"snapshot {volume}@{snapshot} still has clones: {', '.join(children)}"
                    )
                image.unprotect_snap(snapshot)
            image.remove_snap(snapshot)

    # --- reading ---------------------------------------------------------------------

    def get(self, volume: str) -> VolumeInfo | None:
        with _mapped(f"read {volume}"):
            return self._info(volume)

    def _info(self, volume: str) -> VolumeInfo | None:
        try:
            image = self._image(volume, read_only=True)
        except rbd.ImageNotFound:
            return None
        with image:
            raw = dict(image.metadata_list())
            if raw.get(KEY_SELF) != volume:
                return None  # not BMI's (or a copy not yet claimed)
            try:
                parent: str | None = image.get_parent_image_spec()["image_name"]
            except rbd.ImageNotFound:
                parent = None  # no parent (or the clone was flattened)
            temporary = tuple(sorted(
                s["name"] for s in image.list_snaps() if s["name"].startswith(TEMP_SNAPSHOT_PREFIX)
            ))
            return VolumeInfo(
                name=volume,
                size_bytes=image.size(),
                metadata={k: v for k, v in raw.items() if k not in _OWN_KEYS},
                parent=parent,
                complete=raw.get(KEY_COMPLETE) == "1",
                temporary_snapshots=temporary,
            )

    def list_volumes(self) -> list[VolumeInfo]:
        with _mapped("list volumes"):
            names_by_id = {e["id"]: e["name"] for e in self._rbd.list2(self._io())}
            with ThreadPoolExecutor(max_workers=_LIST_WORKERS) as pool:
                infos = list(pool.map(lambda item: self._listed_info(*item, names_by_id),
                                      names_by_id.items()))
        return [info for info in infos if info is not None]

    def _listed_info(
        self, image_id: str, volume: str, names_by_id: Mapping[str, str]
    ) -> VolumeInfo | None:
        """Opening an image with librbd costs ~7 ms (~16 ms for a clone) here; one omap
        read of its header costs well under 1 ms. Anything the header reader does not
        understand falls back to librbd."""
        if image_id:
            try:
                return _header_info(self._io(), image_id, volume, names_by_id)
            except rados.ObjectNotFound:
                return None  # removed since it was listed
            except _HeaderFormatError:
                pass
        return self._info(volume)

    def content_digest(self, volume: str) -> str:
        what = f"hash {volume}"
        hasher = digests.new_hasher()
        with _mapped(what), self._image(volume, read_only=True) as image:
            if GOLDEN_SNAPSHOT in {s["name"] for s in image.list_snaps()}:
                image.set_snap(GOLDEN_SNAPSHOT)  # what clones are made from
            size = image.size()
            extents: list[tuple[int, int]] = []
            image.diff_iterate(0, size, None,
                               lambda o, n, exists: exists and extents.append((o, n)),
                               include_parent=True, whole_object=True)
            header = f"rbd_header.{image.id()}"

            def still_there() -> None:
                self._io().stat(header)  # ObjectNotFound once the volume is removed

            at = 0
            for offset, length in sorted(extents):
                digests.update_zeros(hasher, offset - at, what, still_there)  # never read
                end = offset + length
                while offset < end:
                    deadlines.check(what)
                    piece = image.read(offset, min(_COPY_CHUNK, end - offset))
                    if not piece:
                        raise Unavailable(f"ceph: {what}: short read at {offset}")
                    hasher.update(piece)
                    offset += len(piece)
                at = end
            digests.update_zeros(hasher, size - at, what, still_there)
        return hasher.hexdigest()

    def modified_since_sealed(self, volume: str) -> bool:
        changed = False

        def seen(_offset: int, _length: int, _exists: bool) -> None:
            nonlocal changed
            changed = True

        with _mapped(f"compare {volume}"), self._image(volume, read_only=True) as image:
            if GOLDEN_SNAPSHOT not in {s["name"] for s in image.list_snaps()}:
                return False
            # With fast-diff this reads the object maps only, not the data.
            image.diff_iterate(0, image.size(), GOLDEN_SNAPSHOT, seen,
                               include_parent=False, whole_object=True)
        return changed

    def used_bytes(self, volume: str) -> int:
        total = 0

        def count(_offset: int, length: int, exists: bool) -> None:
            nonlocal total
            if exists:
                total += length

        with _mapped(f"usage of {volume}"), self._image(volume, read_only=True) as image:
            image.diff_iterate(0, image.size(), None, count,
                               include_parent=False, whole_object=True)
        return total


class _HeaderFormatError(Exception):
    """The image header holds something ``_header_info`` does not decode."""


_OMAP_MAX = 10_000  # header keys: a dozen fixed ones, plus metadata and snapshots


def _header_info(
    ioctx: rados.Ioctx, image_id: str, volume: str, names_by_id: Mapping[str, str]
) -> VolumeInfo | None:
    """A VolumeInfo read straight from the omap of a format-2 image's header object.

    Layout (cls_rbd, stable since Nautilus): ``size`` le64; ``metadata_<key>`` raw value;
    ``snapshot_<id>`` a versioned struct starting with le64 id and the name; ``parent``
    a versioned struct of pool id, (v2+) namespace, image id, snap id, overlap.
    """
    with rados.ReadOpCtx() as op:
        values, _ = ioctx.get_omap_vals(op, "", "", _OMAP_MAX)
        ioctx.operate_read_op(op, f"rbd_header.{image_id}")
        omap = dict(values)
    if len(omap) >= _OMAP_MAX:
        raise _HeaderFormatError("too many header keys")
    try:
        raw = {k.removeprefix("metadata_"): (v or b"").decode()
               for k, v in omap.items() if k.startswith("metadata_")}
        if raw.get(KEY_SELF) != volume:
            return None
        (size,) = struct.unpack("<Q", omap["size"])
        temporary = tuple(sorted(
            name for k, v in omap.items() if k.startswith("snapshot_")
            if (name := _decode_string(v, 6 + 8)[0]).startswith(TEMP_SNAPSHOT_PREFIX)
        ))
        parent = None
        if "parent" in omap:
            parent_id = _decode_parent_id(omap["parent"], ioctx.get_pool_id())
            parent = names_by_id[parent_id] if parent_id else None
    except (KeyError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise _HeaderFormatError(str(e)) from None
    return VolumeInfo(
        name=volume,
        size_bytes=size,
        metadata={k: v for k, v in raw.items() if k not in _OWN_KEYS},
        parent=parent,
        complete=raw.get(KEY_COMPLETE) == "1",
        temporary_snapshots=temporary,
    )


def _image_id(ioctx: rados.Ioctx, volume: str) -> str:
    """A format-2 image's id, from its ``rbd_id.<name>`` object (an encoded string)."""
    return _decode_string(ioctx.read(f"rbd_id.{volume}", 4096), 0)[0]


def _header_metadata(ioctx: rados.Ioctx, image_id: str) -> dict[str, str]:
    with rados.ReadOpCtx() as op:
        values, _ = ioctx.get_omap_vals(op, "", "metadata_", _OMAP_MAX)
        ioctx.operate_read_op(op, f"rbd_header.{image_id}")
        # An empty value comes back as None.
        return {k.removeprefix("metadata_"): (v or b"").decode() for k, v in values}


def _decode_string(buf: bytes, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<I", buf, pos)
    end = pos + 4 + length
    if end > len(buf):
        raise ValueError("string past the end of its struct")
    return buf[pos + 4 : end].decode(), end


def _decode_parent_id(buf: bytes, pool_id: int) -> str | None:
    version, _compat, _length, parent_pool = struct.unpack_from("<BBIq", buf, 0)
    if version not in (1, 2):
        raise ValueError(f"parent struct version {version}")
    if parent_pool == -1:
        return None  # no parent
    pos = 6 + 8
    if version >= 2:
        namespace, pos = _decode_string(buf, pos)
        if namespace:
            raise ValueError("parent in a pool namespace")
    if parent_pool != pool_id:
        raise ValueError("parent in another pool")  # librbd resolves that one
    return _decode_string(buf, pos)[0]


_COPY_CHUNK = 4 << 20  # one RBD object


def _cancel_after_deadline() -> Callable[[int, int], int]:
    """A librbd progress callback that stops the operation (a negative errno) once the
    caller's deadline passes. librbd calls it from its own threads, which do not see the
    caller's context: the deadline is read here, in the caller's thread."""
    left = deadlines.remaining()
    if left is None:
        return lambda _done, _total: 0
    deadline = time.monotonic() + left
    return lambda _done, _total: -errno.ECANCELED if time.monotonic() >= deadline else 0


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the data in a sparse file; holes read as zeros and are
    skipped (the volume is fresh, hence zero)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return  # only a hole is left
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size) - start
        offset = end


def _copy_range(read, image: rbd.Image, offset: int, length: int, what: str) -> None:
    """Copy ``length`` bytes at ``offset`` into ``image`` in object-sized pieces, skipping
    zeros (the target is fresh), checking the caller's deadline between pieces."""
    end = offset + length
    while offset < end:
        deadlines.check(what)
        piece = read(offset, min(_COPY_CHUNK, end - offset))
        if not piece:
            raise InvalidArgument(f"{what}: source ended early")
        if piece.count(0) != len(piece):
            image.write(piece, offset)
        offset += len(piece)
